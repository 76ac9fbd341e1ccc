"""Workers' own writes commit without waiting for the WAL flush, on every
thread's connection, and the setting is sent once per connection; the
handlers' own writes commit with the server's durability."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import OrmQ
from django_q.signals import pre_execute

from jobs.db.durability import relax_commit_durability
from jobs.engine import registry
from jobs.engine.registry import Payload
from jobs.engine.submission import submit_job
from jobs.models import Job, JobEvent, State
from jobs.worker import runner
from jobs.worker.lane import _in_db_thread, get_lane
from tests.conftest import release_lane_connection, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def _relaxed_here() -> tuple[str, int]:
    relax_commit_durability()
    with CaptureQueriesContext(connection) as again:
        relax_commit_durability()
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        setting = cursor.fetchone()[0]
    return setting, len(again.captured_queries)


def test_it_relaxes_each_threads_connection_once():
    results: list[tuple[str, int]] = []

    def other_thread() -> None:
        try:
            results.append(_relaxed_here())
        finally:
            connection.close()

    assert _relaxed_here() == ("off", 0)
    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join(timeout=30)
    assert results == [("off", 0)]
    # The other thread's connection did not evict this one's.
    with CaptureQueriesContext(connection) as after:
        relax_commit_durability()
    assert after.captured_queries == []


def test_a_new_connection_is_relaxed_even_when_it_has_a_closed_ones_address(db):
    from jobs.db import durability

    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit TO DEFAULT")
    # CPython may give a new connection the address (id) of a freed one: what
    # was remembered of the old one must not pass for the new one.
    durability._relaxed[threading.get_ident()] = id(connection.connection)

    relax_commit_durability()

    assert _setting() == "off"


# --- handlers' own writes keep the server's durability ------------------------
#
# The engine relaxes the worker's connection, and a handler runs on that same
# connection (a sync handler on the worker's thread, an async one's `run_db`
# on the lane's database thread): what the handler writes for itself must
# commit as the server says (`on`), not as the engine's bookkeeping does.


def _setting() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


def _handlers_own_write(mode: str) -> str:
    """A handler's own data, written in autocommit or in its own transaction;
    the durability its commit has."""
    if mode == "atomic":
        with transaction.atomic():
            JobEvent.objects.create(job=None, type="test.handler_data")
            return _setting()
    JobEvent.objects.create(job=None, type="test.handler_data")
    return _setting()


def _submits_a_job() -> str:
    """A handler's submission (one statement through jobs/db/sql.py's shared
    cursor); the durability its commit had, read past Django's execute
    wrappers so that reading it restores nothing."""
    submit_job("demo.noop", {})
    return connection.connection.execute("SHOW synchronous_commit").fetchone()[0]


class Probe(Payload):
    mode: str = "autocommit"
    progress: bool = False


def _sync_probe(ctx, payload: Probe) -> dict:
    if payload.mode == "submit":
        return {"synchronous_commit": _submits_a_job()}
    if payload.progress:
        ctx.report_progress(50, "half way")  # the engine's statement, before the handler's own
    return {"synchronous_commit": _handlers_own_write(payload.mode)}


async def _async_probe(ctx, payload: Probe) -> dict:
    if payload.progress:
        ctx.report_progress(50, "half way")
    return {"synchronous_commit": await ctx.run_db(_handlers_own_write, payload.mode)}


@pytest.fixture
def probes(monkeypatch):
    for kind, func in (("test.durability_sync", _sync_probe), ("test.durability_async", _async_probe)):
        monkeypatch.setitem(registry._registry, kind, registry.Handler(kind, func, Probe, "default", 1, 60, ""))
    yield
    release_lane_connection()


def _result(job: Job) -> dict:
    job.refresh_from_db()
    assert job.state == State.SUCCEEDED, (job.state, job.error_message)
    return job.result


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("mode", ["autocommit", "atomic"])
def test_a_sync_handlers_own_writes_commit_durably(probes, make_job, mode, progress):
    job = make_job("test.durability_sync", {"mode": mode, "progress": progress})

    runner.run_job(str(job.id))

    assert _result(job) == {"synchronous_commit": "on"}
    # The worker's own bookkeeping stays relaxed.
    assert _setting() == "off"


def test_a_job_a_sync_handler_submits_commits_durably(probes, make_job):
    job = make_job("test.durability_sync", {"mode": "submit"})

    runner.run_job(str(job.id))

    assert _result(job) == {"synchronous_commit": "on"}
    assert Job.objects.filter(kind="demo.noop", state=State.QUEUED).count() == 1


def test_every_handler_of_a_chain_writes_durably(probes, make_job, settings):
    # Time enough for the chain to reach all three on a loaded machine.
    settings.CONVEYOR = {**settings.CONVEYOR, "CHAIN_SECONDS": 30.0}
    jobs = [make_job("test.durability_sync", {"mode": mode}) for mode in ("atomic", "autocommit", "atomic")]
    row = OrmQ.objects.filter(key="default").order_by("id").first()
    assert row.task["args"] == (str(jobs[0].id),)
    # The broker's claim: the row is invisible for its visibility timeout.
    OrmQ.objects.filter(id=row.id).update(lock=timezone.now() + timedelta(seconds=60))
    task = {**row.task, "ack_id": row.id}

    # As a Django-Q2 worker runs a delivery: the chain then runs the others.
    pre_execute.send(sender="django_q", func=task["func"], task=task)
    task["func"](*task["args"], **task["kwargs"])

    assert [_result(job) for job in jobs] == [{"synchronous_commit": "on"}] * 3
    assert _setting() == "off"


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("mode", ["autocommit", "atomic"])
def test_an_async_handlers_own_writes_commit_durably(probes, make_job, mode, progress):
    job = make_job("test.durability_async", {"mode": mode, "progress": progress})

    runner.run_job(str(job.id))  # hands it to this process's lane

    wait_until(lambda: Job.objects.get(id=job.id).state == State.SUCCEEDED, timeout=30, message="the async job")
    assert _result(job) == {"synchronous_commit": "on"}
    # The lane's own statements stay relaxed.
    assert get_lane().db.submit(lambda: (_in_db_thread(lambda: None), _setting())[1]).result(timeout=10) == "off"
