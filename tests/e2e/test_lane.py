"""The asyncio lane through a real qcluster: many async jobs in flight in one
worker process, with progress, failures, cancellation and crash recovery."""

from __future__ import annotations

import os
import signal
import time

import pytest

from jobs.models import Attempt, Job
from jobs.services import cancel_job
from tests.conftest import wait_until

pytestmark = pytest.mark.processes


def test_one_worker_process_runs_many_async_jobs_at_once(processes, make_job):
    jobs = [make_job("demo.async_sleep", {"seconds": 2, "steps": 4}) for _ in range(40)]
    processes.qcluster(CONVEYOR_WORKERS="1", CONVEYOR_LANE_CAPACITY="50")
    started = time.monotonic()
    wait_until(lambda: Job.objects.filter(state="succeeded").count() == 40, timeout=60, message="40 async jobs")
    elapsed = time.monotonic() - started
    # 40 × 2 s in one worker process: only concurrency finishes inside 40 s.
    assert elapsed < 30, f"took {elapsed:.1f} s"
    workers = set(Attempt.objects.values_list("worker", flat=True))
    assert len(workers) == 1
    for job in Job.objects.filter(id__in=[j.id for j in jobs]):
        assert job.result == {"slept": 2.0} and job.progress_percent == 100 and job.attempts == 1
        assert job.attempt_set.get().output == "step 1\nstep 2\nstep 3\nstep 4\n"
        assert job.events.filter(type="job.progress").exists()


def test_a_failing_async_job_keeps_its_partial_output_and_is_retried(processes, make_job):
    job = make_job(
        "demo.async_sleep",
        {"seconds": 0.2, "steps": 2, "fail": True},
        max_attempts=2,
        backoff_base=0.2,
        backoff_max=0.2,
    )
    processes.qcluster()
    wait_until(lambda: Job.objects.get(id=job.id).state == "dead", timeout=30, message="the job to die")
    attempts = list(Job.objects.get(id=job.id).attempt_set.values_list("outcome", "error_type", "output"))
    assert attempts == [("failed", "DemoTransientError", "step 1\nstep 2\n")] * 2


def test_cancelling_a_running_async_job_stops_it(processes, make_job):
    job = make_job("demo.async_sleep", {"seconds": 20, "steps": 40})
    processes.qcluster()
    wait_until(lambda: Job.objects.get(id=job.id).progress_percent > 0, timeout=30, message="progress")
    cancel_job(job.id)
    wait_until(lambda: Job.objects.get(id=job.id).state == "cancelled", timeout=10, message="the cancel")
    assert Job.objects.get(id=job.id).attempt_set.get().outcome == "cancelled"


def test_a_killed_lane_worker_s_jobs_are_rescued_and_finish(processes, make_job):
    jobs = [
        make_job("demo.async_sleep", {"seconds": 3, "steps": 6}, backoff_base=0.2, backoff_max=0.5) for _ in range(5)
    ]
    processes.qcluster(CONVEYOR_WORKERS="1")

    def all_running():
        return Job.objects.filter(state="running", progress_percent__gt=0).count() == 5

    wait_until(all_running, timeout=30, message="5 jobs running in the lane")
    pid = int(Job.objects.filter(state="running").first().lease_owner.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: Job.objects.filter(state="succeeded").count() == 5,
        timeout=60,
        interval=0.5,
        message="the rescued jobs to succeed",
    )
    for job in jobs:
        outcomes = list(Job.objects.get(id=job.id).attempt_set.values_list("outcome", flat=True))
        assert outcomes == ["lost", "succeeded"]


def test_a_job_waiting_for_a_place_in_a_full_lane_keeps_its_lease(processes, make_job):
    from datetime import timedelta

    from jobs.worker.runner import rescue_expired

    # One worker process, one place in its lane; leases of 3 s (process_env).
    processes.qcluster(CONVEYOR_WORKERS="1", CONVEYOR_LANE_CAPACITY="1", CONVEYOR_LANE_FILL="0")
    long = make_job("demo.async_sleep", {"seconds": 8, "steps": 8})
    wait_until(lambda: Job.objects.get(id=long.id).progress_percent > 0, timeout=30, message="the long job to run")
    waiting = make_job("demo.async_sleep", {"seconds": 0.2, "steps": 1}, max_attempts=1)

    def done_while_swept() -> bool:
        rescue_expired()  # the periodic sweep, as often as the test can run it
        return Job.objects.get(id=waiting.id).state not in ("queued", "running")

    wait_until(done_while_swept, timeout=60, interval=0.2, message="the waiting job to finish")

    waiting = Job.objects.get(id=waiting.id)
    assert (waiting.state, waiting.attempts) == ("succeeded", 1)
    assert list(waiting.attempt_set.values_list("outcome", flat=True)) == ["succeeded"]
    # It was claimed while the long job held the place, and waited longer than
    # its lease and the sweep's grace second.
    assert waiting.finished_at - waiting.started_at > timedelta(seconds=4)
    assert Job.objects.get(id=long.id).state == "succeeded"


def test_a_waiting_job_that_another_worker_took_is_not_started(processes, make_job):
    from datetime import timedelta

    from django.utils import timezone

    cluster = processes.qcluster(CONVEYOR_WORKERS="1", CONVEYOR_LANE_CAPACITY="1", CONVEYOR_LANE_FILL="0")
    long = make_job("demo.async_sleep", {"seconds": 6, "steps": 6})
    wait_until(lambda: Job.objects.get(id=long.id).progress_percent > 0, timeout=30, message="the long job to run")
    waiting = make_job("demo.async_sleep", {"seconds": 0.2, "steps": 1})
    wait_until(lambda: Job.objects.get(id=waiting.id).state == "running", timeout=30, message="the claim")
    # What a rescue and another worker's claim leave while the delivery waits.
    Job.objects.filter(id=waiting.id).update(
        lease_owner="elsewhere:1", lease_expires_at=timezone.now() + timedelta(minutes=10)
    )

    wait_until(
        lambda: "not started" in processes.log_of(cluster), timeout=30, message="the lane to refuse the stale copy"
    )
    waiting = Job.objects.get(id=waiting.id)
    assert (waiting.state, waiting.lease_owner, waiting.progress_percent) == ("running", "elsewhere:1", 0)
    assert list(waiting.attempt_set.values_list("outcome", "output")) == [("", "")]
    wait_until(lambda: Job.objects.get(id=long.id).state == "succeeded", timeout=30, message="the long job")


def test_an_async_outcome_the_database_refused_is_written_again(processes, make_job):
    from tests.jobs.worker.test_runner import RefusedUpdates

    job = make_job("demo.async_sleep", {"seconds": 0.5, "steps": 1})
    refused = RefusedUpdates()
    refused.refuse(job, "NEW.state = 'succeeded'")  # the success, as if Postgres were restarting
    try:
        processes.qcluster()
        wait_until(lambda: refused.count() >= 2, timeout=30, message="the success to be written again")
        refused.allow()
        wait_until(lambda: Job.objects.get(id=job.id).state == "succeeded", timeout=30, message="the success")
    finally:
        refused.remove()

    job = Job.objects.get(id=job.id)
    assert job.attempts == 1 and job.result == {"slept": 0.5}
    assert list(job.attempt_set.values_list("outcome", flat=True)) == ["succeeded"]
