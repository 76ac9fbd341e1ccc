"""Streamed output and job logs as the worker writes them: the attempt's
text, `job.output` / `job.log` events with deltas, and the lease owner check."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.models import Attempt, Job, JobEvent
from jobs.worker import claims, finish, runner
from jobs.worker.heartbeat import Progress, record_progress
from jobs.worker.joblogs import JobLog
from tests.conftest import release_lane_connection, wait_until

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


def test_output_deltas_become_job_output_events_and_a_log_only_flush_sends_no_progress_event(make_job):
    job = make_job("demo.noop")
    assert claims.claim(str(job.id), "w")
    record_progress({job.id: Progress(10, "m", "w", "Hello", attempt=1, offset=0, delta="Hello")})
    record_progress({job.id: Progress(20, "m", "w", "Hello, world", attempt=1, offset=5, delta=", world")})
    record_progress({job.id: Progress(20, "m", "w", logs="a\nb", lines=("a", "b"), first=0, attempt=1, report=False)})

    events = list(JobEvent.objects.filter(job=job).exclude(type="job.created").values_list("type", "data"))
    assert events == [
        ("job.started", events[0][1]),
        ("job.progress", {"percent": 10, "message": "m"}),
        ("job.output", {"attempt": 1, "offset": 0, "text": "Hello"}),
        ("job.progress", {"percent": 20, "message": "m"}),
        ("job.output", {"attempt": 1, "offset": 5, "text": ", world"}),
        ("job.log", {"attempt": 1, "first": 0, "lines": ["a", "b"]}),
    ]
    assert list(Attempt.objects.filter(job=job).values_list("output", "logs")) == [("Hello, world", "a\nb")]


def test_a_sync_job_s_log_lines_are_kept_with_its_attempt_and_sent_as_events(make_job):
    job = make_job("demo.sleep", {"seconds": 0.03, "steps": 3})

    runner.run_job(str(job.id))

    (attempt,) = Attempt.objects.filter(job=job)
    lines = attempt.logs.splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == [
        f"INFO jobs.handlers.demo: step {n} of 3 done" for n in (1, 2, 3)
    ]
    sent = [e.data for e in JobEvent.objects.filter(job=job, type="job.log").order_by("id")]
    # Each progress report carries the lines logged before it, numbered without gaps.
    assert [(d["first"], len(d["lines"])) for d in sent] == [(0, 1), (1, 1), (2, 1)]
    assert [line for d in sent for line in d["lines"]] == lines


def test_an_async_job_streams_its_output_as_gapless_deltas_and_keeps_its_logs(make_job):
    job = make_job("demo.async_sleep", {"seconds": 0.6, "steps": 6})

    runner.run_job(str(job.id))
    wait_until(lambda: Job.objects.get(id=job.id).state == "succeeded", timeout=20, message="the async job")
    release_lane_connection()

    (attempt,) = Attempt.objects.filter(job=job)
    assert attempt.output == "".join(f"step {n}\n" for n in range(1, 7))
    text = ""
    for data in JobEvent.objects.filter(job=job, type="job.output").order_by("id").values_list("data", flat=True):
        assert data["attempt"] == 1 and data["offset"] == len(text)  # each delta starts where the last ended
        text += data["text"]
    assert text == attempt.output
    assert len(attempt.logs.splitlines()) == 6 and "step 6 of 6 done" in attempt.logs


def test_a_job_log_keeps_the_last_1000_lines_and_at_most_64_kib():
    joblog = JobLog()
    for n in range(1500):
        joblog.add(f"line {n}")
    logs, new, first = joblog.take()
    assert (len(new), first, new[0], new[-1]) == (1000, 500, "line 500", "line 1499")
    assert logs.splitlines() == list(new)
    assert joblog.take() == (None, (), 1500)  # nothing new

    for _ in range(100):
        joblog.add("x" * 1000)
    logs, new, first = joblog.take()
    assert len(logs.encode()) <= 64 * 1024 and len(new) == 65 and first == 1535


def test_the_admin_shows_each_attempt_s_output_and_logs_read_only(client, make_job):
    from django.contrib.auth.models import User

    job = make_job("demo.noop", max_attempts=3)
    assert claims.claim(str(job.id), "w")
    assert record_progress(
        {job.id: Progress(10, "m", "w", "Once upon <a> time", attempt=1, logs="12:00:00 INFO x: hello", lines=("a",))}
    )
    client.force_login(User.objects.create_superuser("ada", password="pw"))

    page = client.get(f"/admin/jobs/job/{job.id}/change/").content.decode()

    assert "Once upon &lt;a&gt; time" in page and "18 characters" in page
    assert "12:00:00 INFO x: hello" in page and "1 lines" in page
    assert 'name="attempt_set-0-output"' not in page  # shown, not editable
    assert '"job.output"' not in page and "job.log<" not in page  # not in the events inline
