"""Scaling out: two Django-Q2 clusters on one queue and two Daphne processes,
all on one Postgres. The clusters share the work and never run a job twice;
every job's events reach the SSE viewers of both Daphne processes; both
processes report the same metrics and readiness."""

from __future__ import annotations

import json
import threading
from collections import Counter

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobs.engine.apikeys import create_api_key
from jobs.models import Attempt, Job, JobEvent
from tests.conftest import Processes, wait_until

pytestmark = pytest.mark.processes

JOBS = 40
DAPHNE_ENV = {"CONVEYOR_QUEUES": "default", "METRICS_TOKEN": "scrape-me"}


def start_daphne(processes: Processes) -> str:
    return processes.daphne(**DAPHNE_ENV)[1]


class EventReader(threading.Thread):
    """Reads /api/v1/events (JSON SSE, API-key auth) in the background."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.messages: list[tuple[int, str, dict]] = []
        self.opened = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        try:
            with httpx.Client(timeout=httpx.Timeout(5, read=30)) as client:
                with client.stream("GET", f"{self.url}/api/v1/events?queue=default", headers=headers) as response:
                    assert response.status_code == 200, response.status_code
                    self.opened.set()
                    event_id, name, data = None, "", []
                    for line in response.iter_lines():
                        if self.stop.is_set():
                            return
                        if line.startswith("id: "):
                            event_id = int(line[4:])
                        elif line.startswith("event: "):
                            name = line[7:]
                        elif line.startswith("data: "):
                            data.append(line[6:])
                        elif not line and data:
                            self.messages.append((event_id, name, json.loads("\n".join(data))))
                            event_id, name, data = None, "", []
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.opened.set()

    def job_events(self) -> dict[str, list[tuple[int, str]]]:
        seen: dict[str, list[tuple[int, str]]] = {}
        for event_id, name, data in list(self.messages):
            if name.startswith("job."):
                seen.setdefault(data["job"], []).append((event_id, name))
        return seen


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer scrape-me"}, timeout=10)
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def worker_pids(cluster) -> set[int]:
    """Every process of a qcluster: its sentinel, workers, pusher, monitor."""
    return {child.pid for child in psutil.Process(cluster.pid).children(recursive=True)}


def test_two_clusters_and_two_daphnes_share_one_postgres(processes, make_job):
    # An operator's key: a key without `operate` would only see its own jobs.
    key = create_api_key("scaling test", scopes=["read", "operate"]).key
    daphnes = [start_daphne(processes), start_daphne(processes)]
    clusters = [processes.qcluster(LOG_FORMAT="json"), processes.qcluster(LOG_FORMAT="json")]

    # 1. Both Daphne processes see both clusters' heartbeats: ready.
    def both_ready() -> bool:
        for url in daphnes:
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code != 200 or response.json()["queues"]["default"]["clusters"] != 2:
                return False
        return True

    wait_until(both_ready, timeout=60, interval=0.5, message="both clusters to report to both Daphne processes")
    before = [scrape(url) for url in daphnes]
    for samples in before:
        assert samples[("conveyor_clusters_online", (("queue", "default"),))] == 2
        assert samples[("conveyor_workers_online", (("queue", "default"),))] == 4

    readers = [EventReader(url, key) for url in daphnes]
    for reader in readers:
        reader.start()
    # A stream's headers come once its hub listens and it is subscribed
    # (dashboard/consumers.py): an opened stream misses nothing from here on.
    for reader in readers:
        assert reader.opened.wait(30) and reader.error is None, reader.error

    # 2. Submit; the two clusters run them.
    jobs = [make_job("demo.sleep", {"seconds": 0.3, "steps": 1}) for _ in range(JOBS)]
    ids = {str(job.id) for job in jobs}
    try:
        wait_until(
            lambda: Job.objects.filter(state="succeeded").count() == JOBS,
            timeout=120,
            interval=0.5,
            message=f"{JOBS} jobs to succeed",
        )

        def both_saw_every_end() -> bool:
            for reader in readers:
                seen = reader.job_events()
                if not all((job_id in seen and seen[job_id][-1][1] == "job.succeeded") for job_id in ids):
                    return False
            return True

        wait_until(both_saw_every_end, timeout=30, interval=0.2, message="both Daphne processes to stream every job")
    finally:
        for reader in readers:
            reader.stop.set()

    # 3. Each job ran once: one attempt, and both clusters did some of the work.
    attempts = list(Attempt.objects.filter(job_id__in=ids).values_list("job_id", "outcome", "worker"))
    assert Counter(str(job_id) for job_id, _, _ in attempts) == Counter(ids)
    assert {outcome for _, outcome, _ in attempts} == {"succeeded"}
    pids = Counter(int(worker.rsplit(":", 1)[1]) for _, _, worker in attempts)
    by_cluster = [sum(n for pid, n in pids.items() if pid in worker_pids(cluster)) for cluster in clusters]
    assert sum(by_cluster) == JOBS, (pids, by_cluster)
    assert all(by_cluster), f"one cluster ran every job: {by_cluster}"

    # 4. Each viewer got each job's events in the event log's order, none
    # missing, none twice. (A message's SSE id is the stream's resume cursor:
    # an event that commits after a later-numbered one is sent under that
    # cursor, so the ids are compared for order, not equality.)
    logged: dict[str, list[str]] = {}
    for job_id, name in JobEvent.objects.filter(job_id__in=ids).order_by("id").values_list("job_id", "type"):
        logged.setdefault(str(job_id), []).append(name)
    for reader in readers:
        seen = reader.job_events()
        assert {job_id: [name for _, name in seen[job_id]] for job_id in ids} == logged
        cursors = [event_id for event_id, _, _ in reader.messages if event_id is not None]
        assert cursors == sorted(cursors)

    # 5. Both processes report the same counts, read from the database.
    after = [scrape(url) for url in daphnes]
    finished = (
        "conveyor_jobs_finished_total",
        (("kind", "demo.sleep"), ("outcome", "succeeded"), ("queue", "default")),
    )
    submitted = ("conveyor_jobs_submitted_total", (("kind", "demo.sleep"), ("queue", "default")))
    for old, new in zip(before, after, strict=True):
        assert new[finished] - old.get(finished, 0) == JOBS
        assert new[submitted] - old.get(submitted, 0) == JOBS
        assert new[("conveyor_queue_depth", (("queue", "default"), ("state", "queued")))] == 0

    # 6. The clusters log JSON.
    for cluster in clusters:
        lines = [line for line in processes.log_of(cluster).splitlines() if line.startswith("{")]
        assert any(json.loads(line)["logger"] == "django-q" for line in lines)
