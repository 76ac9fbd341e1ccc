"""Races between workers, operators and the rescue sweep, on threads with
connections of their own against the real database.

Already covered elsewhere: two workers claiming one job (test_states.py), two
operators retrying one dead job get one retry and one refusal
(test_deadletter.py), a rescued worker not overwriting the outcome
(test_runner.py). Here: cancel against finish, the retried job running once
however often it is delivered, and the sweep against a slow but live worker.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.db import connection

from jobs.errors import InvalidState
from jobs.models import Attempt, Job, JobEvent, State
from jobs.services import cancel_job, retry_job
from jobs.worker import finish, runner
from tests.conftest import wait_until

pytestmark = pytest.mark.django_db(transaction=True)

TERMINAL_EVENTS = {"job.succeeded", "job.cancelled", "job.dead", "job.retrying"}


def on_threads(*targets: Callable[[], object]) -> list[object]:
    """Run each target on its own thread (own connection), released together;
    their results or exceptions, in the targets' order."""
    barrier = threading.Barrier(len(targets))
    results: list[object] = [None] * len(targets)

    def run(index: int, target: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=10)
            results[index] = target()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results


def events_of(job: Job) -> list[str]:
    return list(JobEvent.objects.filter(job=job).order_by("id").values_list("type", flat=True))


def test_cancel_racing_the_finish_of_a_job_leaves_exactly_one_winner(make_job):
    # A spread of cancel times: before the claim, between progress checks,
    # after the last check, after the finish.
    delays = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.7]
    outcomes = Counter()
    for delay in delays:
        job = make_job("demo.sleep", {"seconds": 0.4, "steps": 2})

        def cancel(job=job, delay=delay):
            time.sleep(delay)  # the cancel lands at this point of the run: the spread is the test
            return cancel_job(job.id, actor="operator")

        worker_result, answer = on_threads(lambda job=job: runner.run_job(str(job.id)), cancel)
        assert worker_result is None, worker_result
        job.refresh_from_db()
        types = events_of(job)
        attempts = list(Attempt.objects.filter(job=job).values_list("outcome", flat=True))
        ends = [t for t in types if t in TERMINAL_EVENTS]
        context = (delay, job.state, types, attempts, answer)

        # One terminal event, and the state, the attempts and the operator's
        # answer all tell the same story.
        assert ends == [f"job.{job.state}"], context
        assert job.finished_at is not None and job.lease_owner == "" and job.lease_expires_at is None, context
        if job.state == State.SUCCEEDED:
            assert attempts == [Attempt.Outcome.SUCCEEDED], context
            assert job.result == {"slept": 0.4}
            # Too late to cancel, or asked after the handler's last check.
            assert isinstance(answer, InvalidState) or types.count("job.cancel_requested") == 1, context
        else:
            assert job.state == State.CANCELLED, context
            assert isinstance(answer, Job), context
            # Cancelled while waiting (never ran) or stopped at a progress check.
            assert attempts in ([], [Attempt.Outcome.CANCELLED]), context
            assert types.count("job.started") == len(attempts), context
        assert types.count("job.cancel_requested") <= 1, context
        outcomes[job.state] += 1
    assert sum(outcomes.values()) == len(delays)
    assert outcomes[State.CANCELLED] >= 1, outcomes  # a cancel before the last progress check wins


def test_a_dead_job_two_operators_retry_runs_once_however_often_it_is_delivered(make_job):
    job = make_job("demo.fail", {"mode": "permanent"})
    runner.run_job(str(job.id))
    job.refresh_from_db()
    assert job.state == State.DEAD and Attempt.objects.filter(job=job).count() == 1

    answers = on_threads(lambda: retry_job(job.id, actor="ann"), lambda: retry_job(job.id, actor="bob"))
    assert sorted(type(a).__name__ for a in answers) == ["InvalidState", "Job"], answers
    # The loser is told why: the winner already queued it.
    assert "is queued" in str(next(a for a in answers if isinstance(a, InvalidState)))

    # The retry's delivery arrives three times, twice at once: one new attempt.
    deliveries = on_threads(*[lambda: runner.run_job(str(job.id))] * 3)
    assert deliveries == [None, None, None]
    job.refresh_from_db()
    types = events_of(job)
    assert types.count("job.queued") == 1
    assert types.count("job.started") == 2  # the first run and the retried one
    assert types.count("job.dead") == 2
    assert list(Attempt.objects.filter(job=job).order_by("id").values_list("outcome", flat=True)) == [
        Attempt.Outcome.FAILED,
        Attempt.Outcome.FAILED,
    ]
    assert job.state == State.DEAD


def test_the_rescue_sweep_never_takes_a_job_from_a_slow_worker_that_renews_its_lease(make_job, settings):
    settings.CONVEYOR = {**settings.CONVEYOR, "LEASE_SECONDS": 3}  # renewed every second
    # One progress report, at the very end: only the heartbeat keeps the lease.
    job = make_job("demo.sleep", {"seconds": 7, "steps": 1})
    worker_errors: list[BaseException] = []

    def work() -> None:
        try:
            runner.run_job(str(job.id))
        except BaseException as exc:  # noqa: BLE001 - checked below
            worker_errors.append(exc)
        finally:
            connection.close()

    worker = threading.Thread(target=work)
    worker.start()
    wait_until(lambda: Job.objects.get(id=job.id).state == State.RUNNING, timeout=10, message="the claim")
    first_expiry = Job.objects.get(id=job.id).lease_expires_at

    # Meanwhile: the periodic sweep, a direct rescue, and watchdog deliveries,
    # over and over until the worker is done.
    rescues: list[object] = []
    sweeps = 0

    def sweep() -> None:
        nonlocal sweeps
        try:
            while worker.is_alive():
                rescues.append(runner.rescue_expired() or None)
                rescues.append(finish.rescue_job(job.id) or None)
                runner.run_job(str(job.id))  # a duplicate delivery: the watchdog
                sweeps += 1
                time.sleep(0.05)  # the sweeps' pace: hundreds of tries over the worker's run
        finally:
            connection.close()

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    worker.join(timeout=30)
    sweeper.join(timeout=30)

    assert worker_errors == []
    assert sweeps >= 20 and not any(rescues), rescues
    job.refresh_from_db()
    assert job.state == State.SUCCEEDED
    assert list(Attempt.objects.filter(job=job).values_list("outcome", flat=True)) == [Attempt.Outcome.SUCCEEDED]
    types = events_of(job)
    assert "job.retrying" not in types and types.count("job.started") == 1
    # The job outlived its first lease by far: the heartbeat renewed it.
    assert job.finished_at > first_expiry + timedelta(seconds=2)


def test_claims_racing_on_a_limited_queue_never_run_more_than_its_limit(make_job):
    """Eight workers (own connections), released together, each claiming by the
    chain's statement and by single deliveries, again and again while places
    free up: never more than `max_running` of the queue run at once."""
    from jobs.engine.states import Sql, transition
    from jobs.services import set_max_running
    from jobs.worker import claims

    jobs = [make_job("demo.noop", queue="narrow") for _ in range(40)]
    set_max_running("narrow", 3)
    peak = []

    def worker(index: int) -> int:
        claimed = 0
        for round_ in range(6):
            if (index + round_) % 2:
                rows, _ = claims.claim_ready("narrow", f"w{index}:1", 4, ["demo.noop"])
                claimed += len(rows)
            else:
                job = jobs[(index * 5 + round_) % len(jobs)]
                claimed += claims.claim(str(job.id), f"w{index}:1") is not None
            peak.append(Job.objects.filter(queue="narrow", state=State.RUNNING).count())
            # Free a place now and then: finish this worker's oldest running job.
            mine = Job.objects.filter(queue="narrow", state=State.RUNNING, lease_owner=f"w{index}:1").first()
            if mine is not None and round_ % 2:
                transition(mine.id, target=State.SUCCEEDED, finished_at=Sql("now()"))
        return claimed

    results = on_threads(*[lambda i=i: worker(i) for i in range(8)])
    assert all(isinstance(r, int) for r in results), results
    assert max(peak) <= 3, peak
    assert sum(results) >= 3  # the queue did run
    assert Job.objects.filter(queue="narrow", state=State.RUNNING).count() <= 3
