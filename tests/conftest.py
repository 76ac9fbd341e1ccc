"""Shared test helpers: job factory, real subprocesses against the test database."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.1,
    message: str | Callable[[], str] = "",
) -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout`
    seconds. A callable `message` is asked at the failure (to describe the state)."""
    deadline = time.monotonic() + timeout
    while not (value := _poll(predicate, deadline, timeout, message)):
        time.sleep(interval)
    return value


async def wait_until_async(
    predicate: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] = "",
) -> object:
    """`wait_until` for a test on an event loop: polls without blocking the loop."""
    deadline = time.monotonic() + timeout
    while not (value := _poll(predicate, deadline, timeout, message)):
        await asyncio.sleep(interval)
    return value


def _poll(predicate: Callable[[], object], deadline: float, timeout: float, message: str | Callable[[], str]) -> object:
    """`predicate()`; fails the test if that is falsy past `deadline`."""
    value = predicate()
    if not value and time.monotonic() > deadline:
        described = message() if callable(message) else message
        pytest.fail(f"timed out after {timeout} s waiting for {described or predicate}")
    return value


def release_lane_connection(*, timeout: float = 30) -> None:
    """Wait until this process's asyncio lane is idle, then close the connections
    its database threads keep (they would hold the test database open)."""
    from jobs.worker.lane import get_lane

    lane = get_lane()
    lane.refill = None  # the next test's jobs are its own to deliver

    async def idle() -> bool:
        return not (lane.tasks or lane.waiting or lane.disarm or lane.pending or lane.refilling)

    # Asked on the lane's own loop, between two of its steps: whatever the
    # housekeeping took from these is then already queued on the database
    # thread, ahead of the close below.
    wait_until(
        lambda: asyncio.run_coroutine_threadsafe(idle(), lane.loop).result(10),
        timeout=timeout,
        message="the lane to go idle",
    )
    lane.close_connections()


@pytest.fixture(autouse=True, scope="session")
def _hash_each_test_password_once():
    """Hashing a password takes Django's PBKDF2 about 0.4 s (1,000,000 rounds),
    and hundreds of tests create a user. Each distinct password is hashed once
    per run: the hash is a real PBKDF2 one (a Daphne the test starts checks it
    as usual), only its salt is shared by the users that share the password."""
    from functools import cache

    from django.contrib.auth import base_user, models

    original = base_user.make_password
    hashed = cache(original)

    def make_password(password, *args):
        return hashed(password) if isinstance(password, str) and not args else original(password, *args)

    for module in (base_user, models):
        module.make_password = make_password
    yield
    for module in (base_user, models):
        module.make_password = original


# Rows that migrations create and no test changes: kept across the flush that
# ends each transactional test, so that its post_migrate does not rebuild them.
_KEPT_BY_FLUSH = frozenset({"django_content_type", "auth_permission"})


@pytest.fixture(autouse=True, scope="session")
def _flush_without_rebuilding_content_types():
    """A transactional test ends with Django's flush: every table truncated,
    then post_migrate, whose content types and permissions (every app's, read
    back and written again) took about 130 ms of each of some 350 teardowns.
    Here the flush keeps those two tables and runs every other post_migrate
    receiver (the project's own: its schedules) as before."""
    from django.contrib.auth.management import create_permissions
    from django.contrib.contenttypes.management import create_contenttypes
    from django.core.management.color import no_style
    from django.core.management.sql import emit_post_migrate_signal
    from django.db import connections
    from django.db.models.signals import post_migrate
    from django.test import TransactionTestCase

    original = TransactionTestCase._fixture_teardown

    def flush(self) -> None:
        if self.available_apps is not None or self.serialized_rollback:
            return original(self)  # Django's own flush for what it special-cases
        for db_name in self._databases_names(include_mirrors=False):
            connection = connections[db_name]
            tables = connection.introspection.django_table_names(only_existing=True, include_views=False)
            statements = connection.ops.sql_flush(no_style(), [t for t in tables if t not in _KEPT_BY_FLUSH])
            connection.ops.execute_sql_flush(statements)
            post_migrate.disconnect(create_contenttypes)
            post_migrate.disconnect(dispatch_uid="django.contrib.auth.management.create_permissions")
            try:
                emit_post_migrate_signal(verbosity=0, interactive=False, db=db_name)
            finally:
                post_migrate.connect(create_contenttypes)
                post_migrate.connect(
                    create_permissions, dispatch_uid="django.contrib.auth.management.create_permissions"
                )

    TransactionTestCase._fixture_teardown = flush
    yield
    TransactionTestCase._fixture_teardown = original


@pytest.fixture(autouse=True)
def _fresh_claim_floors():
    """Each test's claims start without the floors an earlier test's left (jobs/djangoq/broker.py)."""
    from jobs.djangoq import broker

    broker._floors.clear()
    yield
    broker._floors.clear()


@pytest.fixture
def make_job(db):
    """`make_job(kind="demo.noop", payload={}, **options)` submits through the real service."""
    from jobs.services import submit_job

    def make(kind: str = "demo.noop", payload: dict | None = None, **options):
        return submit_job(kind, payload if payload is not None else {}, **options).job

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_database_url() -> str:
    """A DATABASE_URL that points subprocesses at pytest-django's test database."""
    from django.db import connection

    from config.embedded_db import url_of

    return url_of(connection.settings_dict)


test_database_url.__test__ = False  # not a test, despite its name


def process_env(**overrides: str) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "CONVEYOR_LEASE_SECONDS": "3",
        "CONVEYOR_VISIBILITY_TIMEOUT": "4",
        "CONVEYOR_WORKERS": "2",
        "PYTHONUNBUFFERED": "1",
        "DJANGO_Q_LOG_LEVEL": "INFO",
    }
    env.update(overrides)
    return env


class Processes:
    """Starts subprocesses in their own sessions and always stops them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}-{len(self.started)}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            args, cwd=ROOT, env=process_env(**env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started.append((proc, log_path))
        return proc

    def daphne(self, port: int | None = None, **env: str) -> tuple[subprocess.Popen, str]:
        """`daphne config.asgi:application` on a loopback port (a free one by
        default), once /healthz answers: the process and its base URL."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        proc = self.start(
            "daphne",
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
            **env,
        )
        self.wait_healthy(proc, url)
        return proc, url

    def wait_healthy(self, proc: subprocess.Popen, url: str) -> None:
        """Wait until the Daphne `proc` answers /healthz at `url`."""

        def healthy() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"daphne exited:\n{self.log_of(proc)}")
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=60, interval=0.2, message=f"daphne on {url}")

    def qcluster(self, queue: str = "default", **env: str) -> subprocess.Popen:
        return self.start(f"qcluster-{queue}", [sys.executable, "manage.py", "qcluster"], Q_CLUSTER_NAME=queue, **env)

    def log_of(self, proc: subprocess.Popen) -> str:
        for started, path in self.started:
            if started is proc:
                return path.read_text(errors="replace")
        return ""

    def stop_all(self) -> None:
        for proc, _ in self.started:
            if proc.poll() is None:
                # Only the parent: qcluster's sentinel stops its own children.
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc, _ in self.started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            try:  # whatever is left of its process group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def processes(transactional_db, request) -> Iterator[Processes]:
    """Real subprocesses (qcluster, Daphne, manage.py) on the test database.
    Depends on transactional_db so the data they need is committed, and is torn
    down before the database is flushed."""
    procs = Processes(ARTIFACTS / "logs" / request.node.name)
    yield procs
    procs.stop_all()


def pytest_sessionfinish(session, exitstatus) -> None:
    """Stop the embedded server this test run started (after pytest-django has
    dropped the test database), unless another live process has it open."""
    from django.conf import settings

    if not getattr(settings, "EMBEDDED_POSTGRES", False):
        return
    from django.db import connections

    from config import embedded_db

    pgdata = settings.DATA_DIR / "pg"
    if not embedded_db.started_here(pgdata):
        return
    connections.close_all()
    users = embedded_db.stop_unless_used(pgdata)
    if users:
        print(f"\nembedded Postgres on {pgdata} left running: in use by pid {', '.join(map(str, users))}")


@contextmanager
def held_transaction(application_name: str = "held-by-test", *, database_url: str | None = None) -> Iterator[int]:
    """A transaction open on its own connection (`BEGIN; SELECT txid_current();`,
    then idle in transaction) for the duration of the block; yields its pid."""
    import psycopg

    with psycopg.connect(database_url or test_database_url(), application_name=application_name) as conn:
        cursor = conn.execute("BEGIN")
        cursor.execute("SELECT txid_current(), pg_backend_pid()")
        pid = cursor.fetchone()[1]
        try:
            yield pid
        finally:
            conn.rollback()


# --- fake cluster heartbeats (the metrics, health and dashboard tests) ---
def save_heartbeat(queue: str | None, *, workers: int = 2, age_seconds: float = 0, status: str = "Idle") -> None:
    """Store a Django-Q2 cluster heartbeat as a cluster serving `queue` would."""
    from django.utils import timezone
    from django_q.brokers import get_broker
    from django_q.signing import SignedPackage
    from django_q.status import Stat, Status

    beat = Status(pid=4321, cluster_id=uuid.uuid4())
    beat.status = status
    beat.workers = list(range(1000, 1000 + workers))
    beat.timestamp = timezone.now() - timedelta(seconds=age_seconds)
    if queue is not None:
        beat.queue = queue
    # 60 s rather than Django-Q2's 3: the test may be slow, the beat must not expire.
    get_broker().set_stat(Stat.get_key(beat.cluster_id), SignedPackage.dumps(beat, True), 60)


@pytest.fixture
def heartbeat(db):
    """`heartbeat("default", workers=2)`; clears every stored heartbeat first and after."""
    from django.core.cache import cache

    cache.clear()
    yield save_heartbeat
    cache.clear()


@pytest.fixture
def anyio_backend():
    return "asyncio"
