"""submit_job's insert (jobs.engine.submission._insert): one statement that
sends only the columns a submission sets, and a returned Job built from what
it sent that is, field for field, the row the database stored."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_q.models import OrmQ

from jobs.engine import submission
from jobs.engine.submission import submit_job
from jobs.errors import IdempotencyKeyReused
from jobs.models import Batch, Job, JobEvent, State

pytestmark = pytest.mark.django_db

SUBMITTED = set(submission._SUBMITTED)


def assert_is_the_stored_row(job: Job) -> None:
    stored = Job.objects.get(id=job.id)
    for field in Job._meta.concrete_fields:
        assert getattr(job, field.attname) == getattr(stored, field.attname), field.name
        if isinstance(getattr(job, field.attname), datetime):  # the same instant, written the same way
            assert getattr(job, field.attname).isoformat() == getattr(stored, field.attname).isoformat(), field.name
    assert job._state.adding is False and job._state.db == "default"


def broker_locks(job: Job) -> list:
    """The `lock` of each broker row naming the job (OrmQ's model has no job_id)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT lock FROM django_q_ormq WHERE job_id = %s", [job.id])
        return [row[0] for row in cursor.fetchall()]


def assert_defaults_elsewhere(job: Job) -> None:
    """Every column the statement does not send holds the model's default."""
    fresh = Job()
    for field in Job._meta.concrete_fields:
        if field.attname not in SUBMITTED:
            assert getattr(job, field.attname) == getattr(fresh, field.attname), field.name


def test_the_returned_job_is_the_stored_row_with_every_option():
    batch = Batch.objects.create(name="b")
    # Given with an offset of +02:00: the job returned says it in UTC, as read from the database.
    run_after = (timezone.now() + timedelta(hours=1)).astimezone(dt_timezone(timedelta(hours=2)))
    job = submit_job(
        "demo.sleep",
        {"seconds": 2},  # normalized to 2.0 with its default steps
        queue="slow",
        priority=-7,
        run_after=run_after,
        max_attempts=3,
        backoff_base=1.5,
        backoff_max=90,
        idempotency_key="k-1",
        callback_url="https://hooks.example.com/hook",
        owner="alice",
        batch=batch,
        on_dependency_failure="run",
    ).job

    assert_is_the_stored_row(job)
    assert_defaults_elsewhere(Job.objects.get(id=job.id))
    assert job.payload == {"seconds": 2.0, "steps": 10}
    assert (job.state, job.queue, job.priority, job.run_after) == (State.SCHEDULED, "slow", -7, run_after)
    assert (job.max_attempts, job.backoff_base, job.backoff_max, job.timeout) == (3, 1.5, 90.0, 3700)
    assert (job.owner, job.idempotency_key, job.callback_url) == ("alice", "k-1", "https://hooks.example.com/hook")
    assert job.on_dependency_failure == "run"
    assert job.batch is batch and job.batch_id == batch.id
    assert job.created_at == job.updated_at
    assert len(job.request_fingerprint) == 64
    # Its broker row waits for run_after; its event is recorded.
    assert broker_locks(job) == [run_after]
    assert list(JobEvent.objects.filter(job_id=job.id).values_list("type", "data")) == [
        ("job.created", {"state": "scheduled", "kind": "demo.sleep"})
    ]


def test_the_plain_submission_is_the_stored_row_with_the_defaults():
    job = submit_job("demo.noop", {}).job

    assert_is_the_stored_row(job)
    assert_defaults_elsewhere(job)
    assert (job.state, job.queue, job.owner, job.batch_id, job.run_after) == (State.QUEUED, "default", "", None, None)
    # Only a replay with the same idempotency key reads the request's digest.
    assert job.request_fingerprint == ""


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_a_submission_is_one_statement():
    assert connection.get_autocommit() and not connection.in_atomic_block
    with CaptureQueriesContext(connection) as queries:
        job = submit_job("demo.noop", {}).job
    assert len(queries) == 1, [q["sql"] for q in queries]
    # No BEGIN, no SAVEPOINT, no COMMIT: the statement committed on its own.
    assert Job.objects.filter(id=job.id).exists() and len(broker_locks(job)) == 1


def test_a_replay_returns_the_stored_job_and_a_different_request_is_refused():
    first = submit_job("demo.noop", {}, idempotency_key="same", owner="alice")
    again = submit_job("demo.noop", {}, idempotency_key="same", owner="alice")
    assert (first.created, again.created) == (True, False)
    assert again.job.id == first.job.id
    assert_is_the_stored_row(first.job)
    with pytest.raises(IdempotencyKeyReused):
        submit_job("demo.noop", {}, idempotency_key="same", owner="alice", priority=5)
    assert Job.objects.count() == OrmQ.objects.count() == JobEvent.objects.count() == 1


def test_without_prepared_statements_the_same_row_is_stored(settings):
    settings.CONVEYOR = {**settings.CONVEYOR, "PREPARED_STATEMENTS": False}  # behind PgBouncer
    job = submit_job(
        "demo.sleep", {"seconds": 1}, idempotency_key="50% off", callback_url="https://hooks.example.com/"
    ).job

    assert_is_the_stored_row(job)
    assert_defaults_elsewhere(job)
    assert len(broker_locks(job)) == 1


def test_defaults_become_sql_literals_with_percent_signs_doubled():
    assert submission._literal(None) == "NULL"
    assert submission._literal(False) == "false"
    assert submission._literal(0) == "0"
    assert submission._literal(2.5) == "2.5"
    assert submission._literal("it's 100%") == "'it''s 100%%'"
    with pytest.raises(TypeError, match="no SQL literal for a default of type dict"):
        submission._literal({})
