"""`jobs.submit(...)` from Python: validated as the API validates, and part of
the caller's transaction (a rollback leaves nothing; nothing runs before the
commit), checked against a real cluster."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.utils import timezone

import jobs
from jobs.djangoq.broker import listen_params
from jobs.engine import registry
from jobs.errors import IdempotencyKeyReused, InvalidJob, UnknownKind
from jobs.models import Attempt, Job, JobEvent
from tests.conftest import ROOT, wait_until


def test_the_public_api_is_importable_from_the_jobs_package_without_loading_models():
    script = (
        "import sys; from jobs import handler, Payload, submit, RetryableError, PermanentError;"
        "print(sorted(m for m in ('jobs.models', 'jobs.engine.submission', 'django.db.models') if m in sys.modules))"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no DJANGO_SETTINGS_MODULE: Django is not set up
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_handler_keeps_a_schedule_and_a_description(monkeypatch):
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))

    @jobs.handler("tests.nightly", schema=jobs.Payload, schedule="0 3 * * *", description="Runs at night.")
    def nightly(ctx, payload):
        """Not this line."""

    @jobs.handler("tests.plain", schema=jobs.Payload)
    def plain(ctx, payload):
        """First line.

        Not this one."""

    assert registry.get_handler("tests.nightly").schedule == "0 3 * * *"
    assert registry.get_handler("tests.nightly").description == "Runs at night."
    assert registry.get_handler("tests.plain").schedule is None
    assert registry.get_handler("tests.plain").description == "First line."
    # The schedule is declared for jobs/engine/scheduling.py to write at start, named after the kind.
    assert registry.declared()["tests.nightly"]["cron"] == "0 3 * * *"
    assert "tests.plain" not in registry.declared()
    registry.forget_declared("tests.nightly")


def test_submit_returns_the_job_with_its_id_at_once(db):
    run_after = timezone.now() + timedelta(hours=1)
    job = jobs.submit(
        "demo.sleep", {"seconds": 1}, queue="llm", priority=7, run_after=run_after, max_attempts=3, idempotency_key="k1"
    )
    stored = Job.objects.get(id=job.id)
    assert (stored.kind, stored.queue, stored.priority, stored.max_attempts, stored.state) == (
        "demo.sleep",
        "llm",
        7,
        3,
        "scheduled",
    )
    assert stored.payload == {"seconds": 1.0, "steps": 10}  # normalized by the kind's schema
    assert (stored.owner, stored.idempotency_key, stored.run_after) == ("python", "k1", run_after)
    assert list(JobEvent.objects.filter(job_id=job.id).values_list("type", flat=True)) == ["job.created"]


def test_submit_validates_as_the_api_does(db):
    with pytest.raises(UnknownKind) as unknown:
        jobs.submit("nope.nothing", {})
    assert unknown.value.errors[0]["field"] == "kind"
    with pytest.raises(InvalidJob) as invalid:
        jobs.submit("demo.sleep", {"seconds": -1, "extra": 1}, priority=5000, callback_url="ftp://example.com/")
    assert {e["field"] for e in invalid.value.errors} == {
        "payload.seconds",
        "payload.extra",
        "priority",
        "callback_url",
    }
    with pytest.raises(InvalidJob) as internal:
        jobs.submit("webhook.deliver", {})
    assert "is internal: only the engine submits it" in internal.value.errors[0]["message"]
    assert Job.objects.count() == 0 and JobEvent.objects.count() == 0


def test_an_idempotency_key_returns_the_earlier_job_or_refuses_another_request(db):
    first = jobs.submit("demo.noop", {}, idempotency_key="once")
    assert jobs.submit("demo.noop", {}, idempotency_key="once").id == first.id
    with pytest.raises(IdempotencyKeyReused):
        jobs.submit("demo.noop", {}, priority=1, idempotency_key="once")
    assert Job.objects.count() == 1


# --- the caller's transaction, with a real cluster --------------------------------


def in_other_thread(work):
    """Run `work` on another thread, so on another database connection (committed at once)."""
    result = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as exc:
            result["error"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the other thread's work did not finish in 60 s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def state_of(job_id) -> str | None:
    found = Job.objects.filter(id=job_id).values_list("state", flat=True).first()
    return found


class Abandon(Exception):
    pass


@pytest.mark.processes
def test_a_rolled_back_transaction_leaves_no_job_no_event_no_notification_and_nothing_runs(processes):
    processes.qcluster()
    with psycopg.connect(**listen_params("test-listener"), autocommit=True) as listener:
        listener.execute("LISTEN conveyor_events")

        with pytest.raises(Abandon), transaction.atomic():
            User.objects.create_user("ada")  # the caller's own write
            rolled_back = jobs.submit("demo.noop", {})
            assert state_of(rolled_back.id) == "queued"  # the transaction sees its own job
            raise Abandon

        assert not User.objects.filter(username="ada").exists()
        assert not Job.objects.filter(id=rolled_back.id).exists()
        assert not JobEvent.objects.filter(job_id=rolled_back.id).exists()
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM django_q_ormq WHERE job_id = %s", [rolled_back.id])
            assert cursor.fetchone()[0] == 0

        # The same connection submits again after the rollback; the cluster
        # runs that job and never the rolled-back one.
        after = jobs.submit("demo.noop", {})
        wait_until(lambda: state_of(after.id) == "succeeded", timeout=60, message="the job after the rollback to run")
        announced = [n.payload for n in listener.notifies(timeout=1)]

    assert any(str(after.id) in payload for payload in announced)
    assert not any(str(rolled_back.id) in payload for payload in announced)
    assert not Job.objects.filter(id=rolled_back.id).exists()
    assert not Attempt.objects.filter(job_id=rolled_back.id).exists()


@pytest.mark.processes
def test_a_job_submitted_in_a_transaction_runs_only_after_the_commit(processes):
    processes.qcluster()
    warm = jobs.submit("demo.noop", {})
    wait_until(lambda: state_of(warm.id) == "succeeded", timeout=60, message="the cluster to run a first job")

    with transaction.atomic():
        held = jobs.submit("demo.noop", {})
        # Invisible to every other connection, the cluster's included...
        assert in_other_thread(lambda: Job.objects.filter(id=held.id).exists()) is False
        # ...while the cluster runs a job submitted after it and committed at
        # once. Another kind: until this transaction commits it holds the row
        # of the /metrics submission counter its kind, queue and backend shard
        # (pid % 16) share, and a submission of the same kind and queue from a
        # backend of the same shard would wait for it (README "Your own jobs").
        later = in_other_thread(lambda: jobs.submit("demo.sleep", {"seconds": 0, "steps": 1}).id)
        wait_until(
            lambda: in_other_thread(lambda: state_of(later)) == "succeeded",
            timeout=60,
            message="the job committed meanwhile to run",
        )
        # Read committed: a worker's claim of the held job would show here.
        assert state_of(held.id) == "queued"
        assert not Attempt.objects.filter(job_id=held.id).exists()

    wait_until(lambda: state_of(held.id) == "succeeded", timeout=60, message="the held job to run after the commit")
    assert Attempt.objects.filter(job_id=held.id).count() == 1


def test_submit_with_depends_on_creates_a_waiting_job_and_refuses_unknown_ids(db):
    first = jobs.submit("demo.noop", {})
    then = jobs.submit("demo.noop", {}, depends_on=[first.id], on_dependency_failure="run")
    stored = Job.objects.get(id=then.id)
    assert (stored.state, stored.on_dependency_failure, stored.pending_dependencies) == ("waiting", "run", 1)
    with pytest.raises(InvalidJob) as unknown:
        jobs.submit("demo.noop", {}, depends_on=["00000000-0000-0000-0000-000000000000"])
    assert unknown.value.errors[0]["field"] == "depends_on[0]"
    assert Job.objects.count() == 2
