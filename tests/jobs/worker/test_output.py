"""Streamed output and job logs as the worker writes them: the attempt's
text, `job.output` / `job.log` events with deltas, and the lease owner check."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Attempt, Job, JobEvent
from jobs.worker import claims, finish
from jobs.worker.heartbeat import Progress, record_progress

pytestmark = pytest.mark.django_db(transaction=True)


def outputs(job: Job) -> list[tuple[int, str]]:
    return list(Attempt.objects.filter(job=job).order_by("number").values_list("number", "output"))


def test_a_lost_attempt_s_late_flush_does_not_overwrite_the_new_attempt_s_output(make_job):
    job = make_job("demo.noop", max_attempts=3)
    assert claims.claim(str(job.id), "worker-a")
    assert record_progress({job.id: Progress(10, "streaming", "worker-a", "text of a")}) == {job.id: False}
    # worker-a stalls: its lease expires, the job is rescued and claimed by worker-b.
    Job.objects.filter(id=job.id).update(lease_expires_at=timezone.now() - timedelta(seconds=5))
    assert finish.rescue_job(job.id)
    Job.objects.filter(id=job.id).update(run_after=timezone.now() - timedelta(seconds=1))
    assert claims.claim(str(job.id), "worker-b")
    assert record_progress({job.id: Progress(5, "streaming", "worker-b", "text of b")}) == {job.id: False}

    # worker-a wakes up and flushes what it had: nothing of it may land.
    answer = record_progress({job.id: Progress(50, "streaming", "worker-a", "text of a, longer")})

    assert answer == {}  # no longer worker-a's
    assert outputs(job) == [(1, "text of a"), (2, "text of b")]
