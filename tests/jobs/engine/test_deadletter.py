"""Operator actions: retry, discard and cancel, one job or many."""

from __future__ import annotations

import threading
import uuid

import pytest
from django.db import connection
from django.utils import timezone
from django_q.models import OrmQ

from jobs.errors import InvalidState, JobNotFound
from jobs.models import Attempt, Job, JobEvent, State
from jobs.services import cancel_job, discard_job, discard_jobs, retry_job, retry_jobs

pytestmark = pytest.mark.django_db


def put_in(job: Job, state: State, **fields) -> Job:
    Job.objects.filter(id=job.id).update(state=state, **fields)
    job.refresh_from_db()
    return job


PAYLOADS = {"demo.fail": {}, "demo.noop": {}, "demo.sleep": {"seconds": 1}}


def make_dead(make_job, *, kind="demo.fail", queue=None, error_type="DemoTransientError", attempts=3) -> Job:
    """A job that failed `attempts` times and landed in the dead-letter queue."""
    job = make_job(kind, PAYLOADS[kind], queue=queue)
    now = timezone.now()
    for number in range(1, attempts + 1):
        Attempt.objects.create(
            job=job,
            number=number,
            worker="w",
            started_at=now,
            finished_at=now,
            outcome=Attempt.Outcome.FAILED,
            error_type=error_type,
            error_message="boom",
        )
    return put_in(
        job,
        State.DEAD,
        attempts=attempts,
        error_type=error_type,
        error_message="boom",
        error_traceback="Traceback ...",
        finished_at=now,
        progress_percent=40,
        run_after=now,
    )


def broker_rows(job: Job) -> list[OrmQ]:
    return [row for row in OrmQ.objects.order_by("id") if row.task["args"] == (str(job.id),)]


# --- retry ----------------------------------------------------------------------


def test_retrying_a_dead_job_queues_it_again_with_its_history_kept(make_job):
    job = make_dead(make_job)
    before = timezone.now()

    retried = retry_job(job.id, actor="ops")

    assert retried.state == State.QUEUED
    job.refresh_from_db()
    assert job.state == State.QUEUED
    assert job.attempts == 0
    assert (job.error_type, job.error_message, job.error_traceback) == ("", "", "")
    assert job.finished_at is None
    assert job.run_after is None or job.run_after <= timezone.now()  # runnable at once
    assert job.progress_percent == 0
    assert Attempt.objects.filter(job=job).count() == 3
    rows = broker_rows(job)
    assert len(rows) == 2  # the submission's and the retry's
    assert rows[-1].lock >= before
    event = JobEvent.objects.filter(job=job).last()
    assert event.type == "job.queued"
    assert event.data["reason"] == "retry"
    assert event.data["actor"] == "ops"


def test_retrying_a_cancelled_job_queues_it_again(make_job):
    job = make_job("demo.noop")
    cancel_job(job.id)

    assert retry_job(job.id).state == State.QUEUED


@pytest.mark.parametrize("state", [State.SUCCEEDED, State.QUEUED, State.RUNNING, State.RETRYING, State.DISCARDED])
def test_retrying_a_job_that_is_not_dead_or_cancelled_is_refused(make_job, state):
    job = put_in(make_job("demo.noop"), state)
    rows_before = OrmQ.objects.count()

    with pytest.raises(InvalidState, match=f"is {state.value}"):
        retry_job(job.id)

    job.refresh_from_db()
    assert job.state == state
    assert OrmQ.objects.count() == rows_before


@pytest.mark.parametrize("job_id", [uuid.uuid4(), "not-a-uuid", "", None, 42])
def test_retrying_an_unknown_or_malformed_id_is_not_found(job_id):
    with pytest.raises(JobNotFound):
        retry_job(job_id)


def test_retry_jobs_by_filter_moves_only_matching_dead_jobs(make_job):
    a = make_dead(make_job, kind="demo.fail", queue="default", error_type="Timeout")
    b = make_dead(make_job, kind="demo.fail", queue="llm", error_type="Timeout")
    c = make_dead(make_job, kind="demo.sleep", queue="llm", error_type="RateLimited")
    cancelled = make_job("demo.fail", {}, queue="llm")
    cancel_job(cancelled.id)
    succeeded = put_in(make_job("demo.fail", {}, queue="llm"), State.SUCCEEDED)

    assert retry_jobs(queue="llm", error_type="Timeout") == 1
    assert Job.objects.get(id=b.id).state == State.QUEUED

    assert retry_jobs(kind="demo.sleep") == 1
    assert Job.objects.get(id=c.id).state == State.QUEUED

    assert retry_jobs(error_type="Timeout") == 1  # only `a` is still dead
    assert Job.objects.get(id=a.id).state == State.QUEUED

    assert retry_jobs(queue="llm") == 0  # the filters never pick cancelled or finished jobs
    assert Job.objects.get(id=cancelled.id).state == State.CANCELLED
    assert Job.objects.get(id=succeeded.id).state == State.SUCCEEDED


def test_retry_jobs_by_id_includes_cancelled_jobs(make_job):
    dead = make_dead(make_job)
    cancelled = make_job("demo.noop")
    cancel_job(cancelled.id)
    succeeded = put_in(make_job("demo.noop"), State.SUCCEEDED)

    assert retry_jobs(ids=[dead.id, cancelled.id, succeeded.id]) == 2

    assert dict(Job.objects.values_list("id", "state")) == {
        dead.id: State.QUEUED,
        cancelled.id: State.QUEUED,
        succeeded.id: State.SUCCEEDED,
    }


def test_retry_jobs_refuses_an_unknown_filter(make_job):
    make_dead(make_job)
    with pytest.raises(ValueError, match="unknown filter"):
        retry_jobs(state="dead")
    assert Job.objects.get().state == State.DEAD


@pytest.mark.django_db(transaction=True)
def test_two_operators_retrying_one_dead_job_retry_it_once(make_job):
    job = make_dead(make_job)
    rows_before = len(broker_rows(job))
    barrier = threading.Barrier(2)
    outcomes: list[object] = []

    def retry() -> None:
        try:
            barrier.wait(timeout=5)
            outcomes.append(retry_job(job.id))
        except BaseException as exc:  # noqa: BLE001 - checked below
            outcomes.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=retry) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    won = [o for o in outcomes if isinstance(o, Job)]
    lost = [o for o in outcomes if isinstance(o, InvalidState)]
    assert (len(won), len(lost)) == (1, 1), outcomes
    assert len(broker_rows(job)) == rows_before + 1
    assert JobEvent.objects.filter(job=job, type="job.queued").count() == 1
    assert Job.objects.get(id=job.id).state == State.QUEUED


# --- discard ----------------------------------------------------------------------


def test_discarding_a_dead_job_removes_it_from_the_dead_letter_queue(make_job):
    job = make_dead(make_job)

    discarded = discard_job(job.id, actor="ops")

    assert discarded.state == State.DISCARDED
    assert Job.objects.get(id=job.id).state == State.DISCARDED
    assert Attempt.objects.filter(job=job).count() == 3
    event = JobEvent.objects.filter(job=job).last()
    assert (event.type, event.data["actor"]) == ("job.discarded", "ops")


def test_discarding_a_job_that_is_not_dead_is_refused(make_job):
    job = make_job("demo.noop")
    with pytest.raises(InvalidState, match="only dead jobs"):
        discard_job(job.id)
    assert Job.objects.get(id=job.id).state == State.QUEUED


def test_discarding_an_unknown_job_is_not_found():
    with pytest.raises(JobNotFound):
        discard_job(uuid.uuid4())


def test_discard_jobs_by_filter_counts_the_jobs_it_moved(make_job):
    make_dead(make_job, queue="llm")
    make_dead(make_job, queue="llm")
    kept = make_dead(make_job, queue="default")

    assert discard_jobs(queue="llm") == 2
    assert Job.objects.filter(state=State.DISCARDED).count() == 2
    assert Job.objects.get(id=kept.id).state == State.DEAD


# --- cancel -----------------------------------------------------------------------


@pytest.mark.parametrize("state", [State.QUEUED, State.SCHEDULED, State.RETRYING])
def test_cancelling_a_waiting_job_cancels_it_at_once(make_job, state):
    job = put_in(make_job("demo.noop"), state)

    cancelled = cancel_job(job.id, actor="ops")

    assert cancelled.state == State.CANCELLED
    job.refresh_from_db()
    assert job.state == State.CANCELLED
    assert job.finished_at is not None
    event = JobEvent.objects.filter(job=job).last()
    assert (event.type, event.data["actor"]) == ("job.cancelled", "ops")


@pytest.mark.parametrize("state", [State.SUCCEEDED, State.DEAD, State.CANCELLED, State.DISCARDED])
def test_cancelling_a_finished_job_is_refused(make_job, state):
    job = put_in(make_job("demo.noop"), state)
    events_before = JobEvent.objects.filter(job=job).count()

    with pytest.raises(InvalidState, match=f"is {state.value}"):
        cancel_job(job.id)

    job.refresh_from_db()
    assert job.state == state
    assert job.cancel_requested_at is None
    assert JobEvent.objects.filter(job=job).count() == events_before


def test_cancelling_a_running_job_asks_it_to_stop(make_job):
    job = put_in(make_job("demo.sleep", {"seconds": 5}), State.RUNNING, attempts=1, lease_owner="w")

    returned = cancel_job(job.id, actor="ops")

    assert returned.state == State.RUNNING  # the handler stops at its next check
    assert returned.cancel_requested_at is not None
    job.refresh_from_db()
    assert job.cancel_requested_at is not None
    event = JobEvent.objects.filter(job=job).last()
    assert (event.type, event.data) == ("job.cancel_requested", {"actor": "ops"})


def test_cancelling_a_running_job_twice_asks_once(make_job):
    job = put_in(make_job("demo.noop"), State.RUNNING, attempts=1, lease_owner="w")

    first = cancel_job(job.id).cancel_requested_at
    second = cancel_job(job.id).cancel_requested_at

    assert first == second
    assert JobEvent.objects.filter(job=job, type="job.cancel_requested").count() == 1


def test_cancelling_an_unknown_job_is_not_found():
    with pytest.raises(JobNotFound):
        cancel_job("not-a-uuid")
