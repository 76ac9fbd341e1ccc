"""The engine end to end: real qcluster subprocesses on the test database."""

from __future__ import annotations

import os
import signal
from collections import Counter

import pytest

from jobs.models import Attempt, Job, JobEvent
from tests.conftest import wait_until

pytestmark = pytest.mark.processes


def _submit(make_job, kind, payload, **options):
    return make_job(kind, payload, **options)


def test_a_mixed_workload_ends_in_the_states_its_payloads_imply(processes, make_job):
    expected = {}
    for i in range(200):
        if i % 5 == 0:
            job = make_job("demo.noop", {})
            expected[job.id] = ("succeeded", 1)
        elif i % 5 == 1:
            job = make_job("demo.sleep", {"seconds": 0.05, "steps": 2})
            expected[job.id] = ("succeeded", 1)
        elif i % 5 == 2:
            job = make_job(
                "demo.fail", {"mode": "transient", "succeed_on_attempt": 2}, backoff_base=0.2, backoff_max=0.5
            )
            expected[job.id] = ("succeeded", 2)
        elif i % 5 == 3:
            job = make_job("demo.fail", {"mode": "permanent"})
            expected[job.id] = ("dead", 1)
        else:
            job = make_job("demo.fail", {"mode": "transient"}, max_attempts=2, backoff_base=0.2, backoff_max=0.5)
            expected[job.id] = ("dead", 2)

    processes.qcluster()
    processes.qcluster()  # two clusters on one queue compete for the same rows

    def all_finished():
        return Job.objects.filter(state__in=["succeeded", "dead"]).count() == 200

    wait_until(all_finished, timeout=120, interval=0.5, message="all 200 jobs to finish")

    for job in Job.objects.all():
        state, attempts = expected[job.id]
        assert (job.id, job.state, job.attempts) == (job.id, state, attempts)
        outcomes = list(job.attempt_set.values_list("outcome", flat=True))
        if state == "succeeded":
            assert outcomes == ["failed"] * (attempts - 1) + ["succeeded"]
            assert job.progress_percent == 100
        else:
            assert outcomes == ["failed"] * attempts
    # Every attempt started once: no job ran twice concurrently or was lost.
    assert Attempt.objects.count() == sum(a for _, a in expected.values())
    created = Counter(JobEvent.objects.filter(type="job.created").values_list("job_id", flat=True))
    assert set(created.values()) == {1} and len(created) == 200


def test_a_killed_worker_s_job_is_retried_and_the_lost_attempt_recorded(processes, make_job):
    job = make_job("demo.sleep", {"seconds": 4, "steps": 8}, backoff_base=0.5, backoff_max=1)
    processes.qcluster()

    def running_with_progress():
        job.refresh_from_db()
        return job.state == "running" and job.progress_percent > 0

    wait_until(running_with_progress, timeout=30, message="the job to run")
    pid = int(job.lease_owner.rsplit(":", 1)[1])
    os.kill(pid, signal.SIGKILL)

    wait_until(lambda: Job.objects.get(id=job.id).state == "succeeded", timeout=60, interval=0.5, message="the retry")
    job.refresh_from_db()
    attempts = list(job.attempt_set.values_list("number", "outcome", "error_type"))
    assert attempts == [(1, "lost", "WorkerLost"), (2, "succeeded", "")]
    assert job.attempts == 2
    assert job.result == {"slept": 4.0}


def test_a_retry_runs_when_its_backoff_ends_without_polling_the_jobs_table(processes, make_job):
    job = make_job("demo.fail", {"mode": "transient", "succeed_on_attempt": 2}, backoff_base=3, backoff_max=3)
    processes.qcluster()

    wait_until(lambda: Job.objects.get(id=job.id).state == "succeeded", timeout=30, message="the retry to succeed")
    first, second = job.attempt_set.order_by("id")
    retry_event = JobEvent.objects.get(job=job, type="job.retrying")
    due = Job.objects.get(id=job.id)  # run_after keeps the time the retry was due
    assert 1.5 <= retry_event.data["delay"] <= 3
    lateness = (second.started_at - due.run_after).total_seconds()
    assert 0 <= lateness < 1.0, f"attempt 2 started {lateness:.3f} s after it was due"
    assert first.outcome == "failed"


def _reading_the_task_queue(pid: int) -> bool:
    """The process's main thread is blocked reading a pipe: the idle worker that
    holds the task queue's read lock (the others wait on the lock itself)."""
    try:
        with open(f"/proc/{pid}/wchan") as wchan:
            return "pipe_read" in wchan.read()
    except OSError:
        return False


def test_a_worker_killed_while_holding_the_task_queue_s_read_lock_does_not_stall_the_cluster(processes, make_job):
    """jobs/djangoq/cluster.py: the sentinel releases the read lock of a worker
    SIGKILLed while it waited for a task; without that, every other worker (and
    the one reincarnated) would wait on the lock forever."""
    import psutil
    from django_q.status import Stat

    cluster = processes.qcluster()

    def idle_workers() -> list[int]:
        for stat in Stat.get_all():
            if stat.pid == cluster.pid and stat.status == "Idle" and len(stat.workers) == 2:
                return stat.workers
        return []

    workers = wait_until(idle_workers, timeout=60, interval=0.5, message="the cluster's two idle workers")
    children = {child.pid for child in psutil.Process(cluster.pid).children(recursive=True)}
    assert set(workers) <= children
    holder = wait_until(
        lambda: [pid for pid in workers if _reading_the_task_queue(pid)],
        timeout=30,
        message="the worker waiting for a task with the read lock",
    )
    assert len(holder) == 1
    os.kill(holder[0], signal.SIGKILL)
    wait_until(
        lambda: not psutil.pid_exists(holder[0]) or psutil.Process(holder[0]).status() == psutil.STATUS_ZOMBIE,
        timeout=10,
        message="the worker to die",
    )

    job = make_job("demo.noop")

    wait_until(lambda: Job.objects.get(id=job.id).state == "succeeded", timeout=60, interval=0.5, message="the job")
    assert cluster.poll() is None
    assert f"task queue read lock held by dead worker {holder[0]}" in processes.log_of(cluster)
