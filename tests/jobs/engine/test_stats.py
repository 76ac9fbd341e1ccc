"""Queue statistics: counts by state, the oldest runnable job, last-minute throughput."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Attempt, Job, State
from jobs.services import discard_job, queue_stats, retry_job

pytestmark = pytest.mark.django_db


def make(make_job, state: State, *, queue: str = "default", **fields) -> Job:
    job = make_job("demo.noop", queue=queue)
    Job.objects.filter(id=job.id).update(state=state, **fields)
    job.refresh_from_db()
    return job


def failed_attempt(job: Job, *, ago: timedelta, number: int = 1, outcome=Attempt.Outcome.FAILED) -> None:
    at = timezone.now() - ago
    Attempt.objects.create(job=job, number=number, worker="w", started_at=at, finished_at=at, outcome=outcome)


def stats_by_queue(**options) -> dict[str, dict]:
    return {row["queue"]: row for row in queue_stats(**options)}


def test_it_counts_active_and_dead_jobs_per_state_and_queue(make_job):
    for _ in range(2):
        make(make_job, State.QUEUED)
    make(make_job, State.SCHEDULED, run_after=timezone.now() + timedelta(hours=1))
    make(make_job, State.RUNNING)
    make(make_job, State.RETRYING, run_after=timezone.now() + timedelta(minutes=1))
    make(make_job, State.DEAD)
    make(make_job, State.QUEUED, queue="llm")
    for _ in range(3):
        make(make_job, State.DEAD, queue="llm")
    # finished jobs never show in the state counts
    make(make_job, State.SUCCEEDED)
    make(make_job, State.CANCELLED)
    make(make_job, State.DISCARDED, queue="llm")
    make(make_job, State.WAITING, queue="llm")

    stats = stats_by_queue()

    assert set(stats) == {"default", "llm"}
    counts = {
        q: {k: row[k] for k in ("waiting", "queued", "scheduled", "running", "retrying", "dead")}
        for q, row in stats.items()
    }
    assert counts == {
        "default": {"waiting": 0, "queued": 2, "scheduled": 1, "running": 1, "retrying": 1, "dead": 1},
        "llm": {"waiting": 1, "queued": 1, "scheduled": 0, "running": 0, "retrying": 0, "dead": 3},
    }


def test_the_queues_asked_for_are_listed_even_when_empty():
    assert queue_stats(always=["default", "llm"]) == [
        {
            "queue": name,
            "waiting": 0,
            "queued": 0,
            "scheduled": 0,
            "running": 0,
            "retrying": 0,
            "dead": 0,
            "oldest_queued_age_seconds": None,
            "succeeded_last_minute": 0,
            "failed_last_minute": 0,
            "paused": False,
            "max_running": None,
        }
        for name in ("default", "llm")
    ]


def test_the_oldest_queued_age_is_that_of_the_job_waiting_longest(make_job):
    make(make_job, State.QUEUED, created_at=timezone.now() - timedelta(seconds=120))
    make(make_job, State.QUEUED, created_at=timezone.now() - timedelta(seconds=30))

    age = stats_by_queue()["default"]["oldest_queued_age_seconds"]

    assert 115 < age <= 121


def test_a_due_retry_counts_its_wait_from_when_it_became_due(make_job):
    make(
        make_job,
        State.RETRYING,
        created_at=timezone.now() - timedelta(hours=1),
        run_after=timezone.now() - timedelta(seconds=300),
    )

    assert 295 < stats_by_queue()["default"]["oldest_queued_age_seconds"] <= 301


def test_jobs_not_yet_due_or_running_have_no_queued_age(make_job):
    old = timezone.now() - timedelta(hours=1)
    make(make_job, State.SCHEDULED, created_at=old, run_after=timezone.now() + timedelta(minutes=5))
    make(make_job, State.RETRYING, created_at=old, run_after=timezone.now() + timedelta(minutes=5))
    make(make_job, State.RUNNING, created_at=old)

    assert stats_by_queue()["default"]["oldest_queued_age_seconds"] is None


def test_the_ages_are_per_queue(make_job):
    make(make_job, State.QUEUED, created_at=timezone.now() - timedelta(seconds=600), queue="llm")
    make(make_job, State.QUEUED, created_at=timezone.now() - timedelta(seconds=60))

    stats = stats_by_queue()

    assert 595 < stats["llm"]["oldest_queued_age_seconds"] <= 601
    assert 55 < stats["default"]["oldest_queued_age_seconds"] <= 61


def test_a_dead_job_retried_by_an_operator_counts_its_wait_from_the_retry(make_job):
    # NOTE: fails (engine bug): retry_job/_requeue resets run_after to NULL, so
    # queue_stats measures the retried job's wait from its original created_at
    # (here three days), and the dashboard shows a three-day-old queue the
    # moment an operator retries an old dead job. Proposed fix in the report.
    job = make(make_job, State.DEAD, created_at=timezone.now() - timedelta(days=3), finished_at=timezone.now())

    retry_job(job.id)

    age = stats_by_queue()["default"]["oldest_queued_age_seconds"]
    assert age is not None and age < 60


def test_it_counts_the_jobs_that_succeeded_in_the_last_minute(make_job):
    now = timezone.now()
    make(make_job, State.SUCCEEDED, finished_at=now - timedelta(seconds=10))
    make(make_job, State.SUCCEEDED, finished_at=now - timedelta(seconds=50))
    make(make_job, State.SUCCEEDED, finished_at=now - timedelta(minutes=5))
    make(make_job, State.SUCCEEDED, finished_at=now - timedelta(seconds=10), queue="llm")

    stats = stats_by_queue()

    assert stats["default"]["succeeded_last_minute"] == 2
    assert stats["llm"]["succeeded_last_minute"] == 1
    assert stats["default"]["failed_last_minute"] == 0


def test_it_counts_the_failures_of_the_last_minute(make_job):
    now = timezone.now()
    # dead-lettered just now, after one failed attempt
    dead = make(make_job, State.DEAD, attempts=1, finished_at=now - timedelta(seconds=5))
    failed_attempt(dead, ago=timedelta(seconds=5))
    # failed a moment ago and waiting for its retry
    retrying = make(make_job, State.RETRYING, attempts=1, run_after=now + timedelta(minutes=1))
    failed_attempt(retrying, ago=timedelta(seconds=20))
    # its worker died a moment ago
    lost = make(make_job, State.RETRYING, attempts=1, run_after=now + timedelta(minutes=1))
    failed_attempt(lost, ago=timedelta(seconds=20), outcome=Attempt.Outcome.LOST)
    # too long ago to count
    old = make(make_job, State.DEAD, attempts=1, finished_at=now - timedelta(minutes=5))
    failed_attempt(old, ago=timedelta(minutes=5))
    # cancelled and succeeded jobs are not failures
    make(make_job, State.CANCELLED, finished_at=now)
    make(make_job, State.SUCCEEDED, finished_at=now)

    stats = stats_by_queue()["default"]

    assert stats["failed_last_minute"] == 3
    assert stats["succeeded_last_minute"] == 1
    assert stats["dead"] == 2


def test_an_operator_acting_on_dead_jobs_does_not_change_the_last_minutes_failures(make_job):
    # NOTE: fails (engine bug): failed_last_minute counts a dead job once but
    # counts each failed attempt of a job in any other state, so discarding or
    # retrying a dead job that failed three times in the last minute turns one
    # failure into three. Proposed fix (jobs/engine/stats.py) in the report.
    now = timezone.now()
    discarded = make(make_job, State.DEAD, attempts=3, max_attempts=3, finished_at=now)
    retried = make(make_job, State.DEAD, attempts=3, max_attempts=3, finished_at=now, queue="llm")
    for job in (discarded, retried):
        for number in (1, 2, 3):
            failed_attempt(job, ago=timedelta(seconds=10 * number), number=number)
    before = stats_by_queue()

    discard_job(discarded.id)
    retry_job(retried.id)

    after = stats_by_queue()
    assert after["default"]["failed_last_minute"] == before["default"]["failed_last_minute"]
    assert after["llm"]["failed_last_minute"] == before["llm"]["failed_last_minute"]
