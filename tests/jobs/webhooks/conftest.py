"""Webhook test helpers: a real HTTP receiver on 127.0.0.1 that verifies every
message with `standardwebhooks` (the reference implementation), and ways to
finish jobs and run their deliveries."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from jobs.engine.states import transition
from jobs.models import Job, State, WebhookDelivery
from jobs.webhooks import messages
from jobs.worker import runner
from tests.dashboard.conftest import operator, operator_client, reader, reader_client  # noqa: F401 - fixtures
from tests.jobs.api.conftest import alice, api, bob, make_key  # noqa: F401 - fixtures (alice, bob: submit,read keys)


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    # Each secret the path expects, and whether the message verified with it.
    verified: dict[str, bool] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)

    @property
    def message_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """An HTTP server on a thread. `expect(path, secret, …)` makes every message
    to `path` verified with each secret; `answer(path, 500, 500, 200)` sets the
    statuses it answers in turn (the last one repeats; 200 by default), and
    `headers=` headers sent with each of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: dict[str, tuple[str, ...]] = {}
        self._plans: dict[str, list[int]] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self._received: list[Received] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, extra = receiver._record(self.path, dict(self.headers.items()), body)
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                for name, value in extra.items():
                    self.send_header(name, value)
                text = f"answered {status}".encode()
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="receiver", daemon=True)
        self._thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def expect(self, path: str, *secrets: str) -> None:
        with self._lock:
            self._secrets[path] = secrets

    def answer(self, path: str, *statuses: int, headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._plans[path] = list(statuses)
            self._headers[path] = headers or {}

    def received(self, path: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _record(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str]]:
        headers = {k.lower(): v for k, v in headers.items()}
        with self._lock:
            secrets = self._secrets.get(path, ())
            plan = self._plans.get(path, [200])
            status = plan.pop(0) if len(plan) > 1 else plan[0]
            extra = self._headers.get(path, {})
        received = Received(path, headers, body)
        for secret in secrets:
            try:
                Webhook(secret).verify(body, headers)
            except Exception:  # noqa: BLE001 - any failure is a failed verification
                received.verified[secret] = False
            else:
                received.verified[secret] = True
        with self._lock:
            self._received.append(received)
        return status, extra


@pytest.fixture(autouse=True)
def _fresh_subscriptions() -> Iterator[None]:
    """Each test's endpoints are rolled back with it: so is what this process
    remembers of them."""
    messages.forget_subscriptions()
    yield
    messages.forget_subscriptions()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def allow_private(settings) -> None:
    """Deliver to the loopback receiver from this process."""
    settings.CONVEYOR_WEBHOOKS = {**settings.CONVEYOR_WEBHOOKS, "ALLOW_PRIVATE": True}


def operator_owner() -> str:
    """The owner string of a new API key with `operate`: its endpoints hear
    about every owner's jobs (test jobs are mostly submitted with owner "")."""
    from jobs.engine.apikeys import create_api_key

    return create_api_key("operator", scopes=["operate"]).api_key.owner


def finish(job: Job, target: State = State.SUCCEEDED, **fields) -> Job:
    """Claim the job and move it to `target` as a worker would."""
    if target != State.CANCELLED:
        assert transition(job.id, target=State.RUNNING) is not None
    moved = transition(job.id, target=target, **fields)
    assert moved is not None
    return moved


def deliveries_of(job: Job) -> list[WebhookDelivery]:
    return list(
        WebhookDelivery.objects.filter(job=job).select_related("deliver_job", "endpoint").order_by("created_at")
    )


def run_delivery(delivery: WebhookDelivery) -> Job:
    """One broker delivery of the delivery's current job, in this process; the job as it is then."""
    delivery.refresh_from_db()
    runner.run_job(str(delivery.deliver_job_id))
    return Job.objects.get(id=delivery.deliver_job_id)
