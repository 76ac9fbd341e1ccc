"""The lane records its jobs' successes in batches (`Lane._succeed`,
`states.succeed_many`): each job exactly as one-by-one finishing records it,
and a job whose lease was lost is not finished."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from jobs.engine.registry import Payload, handler
from jobs.models import Job, JobEvent, State
from jobs.worker import lane as lane_module
from jobs.worker import runner
from tests.conftest import wait_until
from tests.jobs.worker.test_runner import attempts_of, deliver_as_django_q2, event_types

pytestmark = pytest.mark.django_db(transaction=True)


class WholeText(Payload):
    text: str


@handler("lanetest.whole_text", schema=WholeText, queue="default", timeout=60)
async def whole_text(ctx, payload: WholeText) -> dict:
    """Its whole text at once, as a non-streamed provider call gives it
    (`content.page`), and a line for its log; no progress reports."""
    ctx.output = payload.text
    ctx.log(f"wrote {len(payload.text)} characters")
    return {"length": len(payload.text)}


@pytest.fixture
def lane(monkeypatch):
    """A lane of this test (no housekeeping: no lease renewals), whose batched
    success statements are recorded and made slow, so that successes arriving
    meanwhile wait for a writer and go together."""
    batches: list[tuple[list, set]] = []
    real = lane_module.succeed_many

    def recorded(done):
        time.sleep(0.2)
        finished = real(done)
        batches.append(([item.job_id for item in done], finished))
        return finished

    monkeypatch.setattr(lane_module, "succeed_many", recorded)
    the_lane = lane_module.Lane(capacity=8)
    the_lane.batches = batches
    the_lane.thread.start()
    monkeypatch.setattr(runner, "get_lane", lambda: the_lane)
    yield the_lane
    the_lane.stopping = True
    the_lane.close_connections()
    the_lane.loop.call_soon_threadsafe(the_lane.loop.stop)


def test_a_lane_s_successes_are_recorded_together_each_as_one_by_one(make_job, lane):
    jobs = [make_job("demo.async_sleep", {"seconds": 0.05, "steps": 2}) for _ in range(8)]

    deliver_as_django_q2(jobs[0])  # its fill claims the others for the lane's free places

    ids = [job.id for job in jobs]
    wait_until(lambda: Job.objects.filter(id__in=ids, state=State.SUCCEEDED).count() == 8, timeout=30, message="all 8")
    wait_until(lambda: not lane.tasks, timeout=10, message="the lane to be idle")
    assert sorted(job_id for batch, _ in lane.batches for job_id in batch) == sorted(ids)  # each once
    assert max(len(batch) for batch, _ in lane.batches) > 1  # some went together
    assert {job_id for _, finished in lane.batches for job_id in finished} == set(ids)
    for job in jobs:
        job.refresh_from_db()
        assert job.result == {"slept": 0.05}
        assert job.progress_percent == 100
        assert (job.lease_owner, job.lease_expires_at, job.error_type) == ("", None, "")
        assert job.finished_at is not None and job.finished_at >= job.started_at
        [attempt] = attempts_of(job)
        assert attempt.outcome == "succeeded" and attempt.finished_at is not None
        assert attempt.output == "step 1\nstep 2\n"
        assert "step 2 of 2 done" in attempt.logs
        types = event_types(job)
        assert types[:2] == ["job.created", "job.started"]
        assert types.count("job.succeeded") == 1 and types[-1] == "job.succeeded"
        succeeded = JobEvent.objects.get(job=job, type="job.succeeded")
        assert succeeded.data == {"state": "succeeded", "attempts": 1}
        # The streamed text went out in `job.output` events before the outcome, all of it.
        deltas = [e.data["text"] for e in JobEvent.objects.filter(job=job, type="job.output").order_by("id")]
        assert "".join(deltas) == "step 1\nstep 2\n"


def test_text_and_log_lines_left_at_success_go_out_with_the_success_statement(make_job, lane, monkeypatch):
    """A job that ends with text or log lines not yet sent and no progress
    report due (a page asked for whole) needs no report statement before its
    success: the batch's success statement writes its `job.output` and
    `job.log` events too, ahead of `job.succeeded`."""
    reported = []
    real_report = lane_module.record_progress
    monkeypatch.setattr(
        lane_module, "record_progress", lambda reports: reported.append(set(reports)) or real_report(reports)
    )
    jobs = [make_job("lanetest.whole_text", {"text": f"page {i}\n" * 20}) for i in range(6)]

    deliver_as_django_q2(jobs[0])

    ids = [job.id for job in jobs]
    wait_until(lambda: Job.objects.filter(id__in=ids, state=State.SUCCEEDED).count() == 6, timeout=30, message="all 6")
    wait_until(lambda: not lane.tasks, timeout=10, message="the lane to be idle")
    assert {job_id for _, finished in lane.batches for job_id in finished} == set(ids)
    assert not [job_id for found in reported for job_id in found if job_id in ids]  # no report statement for them
    for i, job in enumerate(jobs):
        types = event_types(job)
        assert types[-3:] == ["job.output", "job.log", "job.succeeded"] or types[-3:] == [
            "job.log",
            "job.output",
            "job.succeeded",
        ], types
        output = JobEvent.objects.get(job=job, type="job.output")
        assert output.data == {"attempt": 1, "offset": 0, "text": f"page {i}\n" * 20}
        log_event = JobEvent.objects.get(job=job, type="job.log")
        assert log_event.data["attempt"] == 1 and log_event.data["first"] == 0
        assert len(log_event.data["lines"]) == 1 and "wrote 140 characters" in log_event.data["lines"][0]
        [attempt] = attempts_of(job)
        assert attempt.output == f"page {i}\n" * 20 and "wrote 140 characters" in attempt.logs
        job.refresh_from_db()
        assert (job.result, job.progress_percent) == ({"length": 140}, 100)


def test_a_lane_job_whose_lease_was_lost_is_not_finished(make_job, lane):
    job = make_job("demo.async_sleep", {"seconds": 0.6, "steps": 1})

    deliver_as_django_q2(job)
    wait_until(lambda: Job.objects.get(id=job.id).state == State.RUNNING, timeout=10, message="it runs")
    # Rescued and claimed by another worker while its handler ran here.
    Job.objects.filter(id=job.id).update(lease_owner="another-worker")

    wait_until(lambda: lane.batches and not lane.tasks, timeout=30, message="its outcome to be written")
    assert lane.batches == [([job.id], set())]
    job.refresh_from_db()
    assert (job.state, job.lease_owner, job.result) == (State.RUNNING, "another-worker", None)
    [attempt] = attempts_of(job)
    assert attempt.finished_at is None and attempt.outcome == ""
    assert "job.succeeded" not in event_types(job)


def test_lane_successes_with_dependents_queue_their_dependents(make_job, lane):
    """A job with a dependent goes in the batch too (in a transaction with the
    workflows' batch call): the dependent waits until then, and is queued after."""
    parents = [make_job("demo.async_sleep", {"seconds": 0.05, "steps": 1}) for _ in range(3)]
    child = make_job("demo.noop", depends_on=[parent.id for parent in parents])
    assert Job.objects.get(id=child.id).state == State.WAITING

    deliver_as_django_q2(parents[0])

    ids = [parent.id for parent in parents]
    wait_until(
        lambda: Job.objects.filter(id__in=ids, state=State.SUCCEEDED).count() == 3, timeout=30, message="the parents"
    )
    wait_until(lambda: not lane.tasks, timeout=10, message="the lane to be idle")
    assert {job_id for _, finished in lane.batches for job_id in finished} == set(ids)
    assert Job.objects.get(id=child.id).state == State.QUEUED
    for parent in parents:
        assert event_types(parent).count("job.succeeded") == 1


def test_a_process_running_a_lane_collects_its_young_objects_less_often(monkeypatch):
    # Hundreds of calls in flight keep what they allocate alive past the
    # collector's young passes: at Python's default threshold (700) those
    # passes took about a tenth of a lane's CPU.
    ran = threading.Event()

    async def no_housekeeping(self) -> None:  # no lease renewals: no database here
        ran.set()

    monkeypatch.setattr(lane_module.Lane, "_housekeeping", no_housekeeping)
    monkeypatch.setattr(lane_module.mp_util, "Finalize", lambda *args, **kwargs: None)  # no drain at exit
    before = gc.get_threshold()
    the_lane = lane_module.Lane(capacity=1)
    try:
        the_lane.start()
        assert gc.get_threshold() == (lane_module.GC_THRESHOLD, *before[1:])
        assert ran.wait(10)
    finally:
        gc.set_threshold(*before)
        the_lane.stopping = True
        the_lane.loop.call_soon_threadsafe(the_lane.loop.stop)
