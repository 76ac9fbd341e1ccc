"""Live updates across processes: two Daphne processes and one qcluster on the
test database. An event from a job the cluster runs reaches the SSE clients of
both Daphne processes, through Postgres alone."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.conftest import Processes, wait_until

pytestmark = pytest.mark.processes


def start_daphne(processes: Processes, **env: str) -> str:
    """Start `daphne config.asgi:application` on a free local port; its base URL."""
    return processes.daphne(**env)[1]


def session_cookie(user) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background into `messages`."""

    def __init__(self, url: str, cookie: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.cookie = cookie
        self.messages: list[dict] = []
        self.opened = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(5, read=30)) as client:
                with client.stream("GET", self.url, cookies={"sessionid": self.cookie}) as response:
                    assert response.status_code == 200, response.status_code
                    self.opened.set()
                    message: dict = {"data": []}
                    for line in response.iter_lines():
                        if self.stop.is_set():
                            return
                        if not line:
                            if message["data"]:
                                self.messages.append({**message, "data": "\n".join(message["data"])})
                            message = {"data": []}
                        elif line.startswith("id: "):
                            message["id"] = int(line[4:])
                        elif line.startswith("event: "):
                            message["event"] = line[7:]
                        elif line.startswith("data: "):
                            message["data"].append(line[6:])
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.opened.set()

    def events_of(self, job_id) -> list[tuple[int, str]]:
        found = []
        for m in list(self.messages):
            if m.get("event", "").startswith("job."):
                body = json.loads(m["data"])
                if body["job"] == str(job_id):
                    found.append((m["id"], m["event"]))
        return found


def test_an_event_from_the_cluster_reaches_sse_clients_of_both_daphnes(processes, make_job, django_user_model):
    from jobs.models import JobEvent

    user = django_user_model.objects.create_user("watcher", password="pw")
    cookie = session_cookie(user)
    daphnes = [start_daphne(processes), start_daphne(processes)]
    processes.qcluster()

    readers = [StreamReader(f"{url}/api/v1/events?queue=default", cookie) for url in daphnes]
    # And a dashboard page's stream (HTML fragments) on each process.
    overviews = [StreamReader(f"{url}/events/overview", cookie) for url in daphnes]
    for reader in readers + overviews:
        reader.start()
    # A stream's headers come once its hub listens and it is subscribed
    # (dashboard/consumers.py): an opened stream misses nothing from here on.
    for reader in readers + overviews:
        assert reader.opened.wait(30) and reader.error is None, reader.error

    job = make_job("demo.sleep", {"seconds": 0.6, "steps": 3})
    expected = ["job.created", "job.started", "job.progress", "job.progress", "job.progress", "job.succeeded"]

    def both_saw_it_all():
        # demo.sleep's log lines come as job.log events too (tests/jobs/worker/test_output.py covers them).
        return all([name for _, name in r.events_of(job.id) if name != "job.log"] == expected for r in readers)

    def cards_show_a_success(reader):
        return any(
            m.get("event") == "queue-cards" and "<dt>succeeded/min</dt><dd>1</dd>" in m["data"] for m in reader.messages
        )

    try:
        wait_until(
            both_saw_it_all, timeout=60, interval=0.2, message="both Daphne processes to stream the job's events"
        )
        wait_until(
            lambda: all(cards_show_a_success(r) for r in overviews),
            timeout=30,
            interval=0.2,
            message="both overviews to show the success in their queue cards",
        )
    finally:
        for reader in readers + overviews:
            reader.stop.set()
    logged = list(JobEvent.objects.filter(job=job).order_by("id").values_list("id", "type"))
    for reader in readers:
        assert reader.events_of(job.id) == logged  # same ids, same order, nothing twice

    # Both processes publish queue statistics, yet never twice within a second.
    stats = list(
        JobEvent.objects.filter(type="queue.stats", job__isnull=True)
        .order_by("id")
        .values_list("created_at", flat=True)
    )
    assert stats, "no queue.stats event was published"
    assert all((later - earlier).total_seconds() >= 0.99 for earlier, later in zip(stats, stats[1:], strict=False))
