"""The /metrics counters (`conveyor_counter`) never make one transaction wait
on another: a caller holding its transaction open after a submit (or a
finish) does not stall anyone else's. And compacting the rows of gone
backends keeps every sum exact."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from django.db import connection, connections, transaction

import jobs
from jobs.worker import runner

pytestmark = pytest.mark.django_db(transaction=True)

KIND, QUEUE = "demo.noop", "default"
CONTENDERS = 17  # fresh connections at least, and more until one shares the holder's pid % 16
MOST_CONTENDERS = 64
PROMPT = 1.0  # seconds: a contender's statement timeout is 2 s


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


@contextmanager
def holding_open(work: Callable[[], object]) -> Iterator[int]:
    """Runs `work` in a transaction on a connection of its own and keeps that
    transaction open until the block ends; yields that backend's pid."""
    ready, release = threading.Event(), threading.Event()
    found: list[int] = []
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            with transaction.atomic():
                work()
                found.append(backend_pid())
                ready.set()
                release.wait(timeout=120)
        except BaseException as error:  # reported to the test below
            failed.append(error)
            ready.set()
        finally:
            connections.close_all()

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert ready.wait(timeout=30), "the holder did not get going"
        assert not failed, failed
        yield found[0]
    finally:
        release.set()
        thread.join(timeout=60)
    assert not failed, failed


@dataclass
class Outcome:
    pid: int
    seconds: float
    error: BaseException | None


def contend(holder_pid: int, work: Callable[[int], object]) -> list[Outcome]:
    """`work(i)` on fresh connections (each with a 2 s statement timeout), one
    after another, each connection kept open until all are done (so each has a
    pid of its own): at least CONTENDERS of them, and more until one shares
    the holder's pid % 16 (the old counters' shard)."""
    outcomes: list[Outcome] = []
    release = threading.Event()
    threads = []

    def run(i: int, done: threading.Event) -> None:
        try:
            pid = backend_pid()
            with connection.cursor() as cursor:
                cursor.execute("SET statement_timeout = '2s'")
            started = time.monotonic()
            try:
                work(i)
                error = None
            except Exception as failure:  # reported to the test
                error = failure
            outcomes.append(Outcome(pid, time.monotonic() - started, error))
            done.set()
            release.wait(timeout=120)
        finally:
            done.set()
            connections.close_all()

    try:
        for i in range(MOST_CONTENDERS):
            done = threading.Event()
            thread = threading.Thread(target=run, args=(i, done))
            thread.start()
            threads.append(thread)
            assert done.wait(timeout=30), "a contender got stuck"
            if len(outcomes) >= CONTENDERS and any(o.pid % 16 == holder_pid % 16 for o in outcomes):
                break
    finally:
        release.set()
        for thread in threads:
            thread.join(timeout=60)
    assert any(o.pid % 16 == holder_pid % 16 for o in outcomes), "no contender shared the holder's pid % 16"
    return outcomes


def assert_all_prompt(outcomes: list[Outcome]) -> None:
    slow = [(o.pid, round(o.seconds, 2), repr(o.error)) for o in outcomes if o.error or o.seconds > PROMPT]
    assert not slow, f"contenders that waited or failed (pid, seconds, error): {slow}"


def submitted_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(n), 0) FROM conveyor_counter WHERE metric = 'submitted' AND kind = %s AND queue = %s",
            [KIND, QUEUE],
        )
        return int(cursor.fetchone()[0])


def test_an_open_transaction_after_a_submit_does_not_stall_other_submissions():
    with holding_open(lambda: jobs.submit(KIND, {}, queue=QUEUE)) as holder:
        outcomes = contend(holder, lambda i: jobs.submit(KIND, {}, queue=QUEUE))
    assert_all_prompt(outcomes)
    # Every submission counted, the holder's too (it committed at the end).
    assert submitted_count() == len(outcomes) + 1


def test_an_open_transaction_after_a_finish_does_not_stall_other_finishes():
    held = jobs.submit(KIND, {}, queue=QUEUE)
    others = [jobs.submit(KIND, {}, queue=QUEUE) for _ in range(MOST_CONTENDERS)]
    # Finishing runs the job: its attempt ends (the attempt counters) and the
    # job succeeds (the finished counter), inside the holder's transaction.
    with holding_open(lambda: runner.run_job(str(held.id))) as holder:
        outcomes = contend(holder, lambda i: runner.run_job(str(others[i].id)))
    assert_all_prompt(outcomes)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT metric, label, sum(n) FROM conveyor_counter WHERE kind = %s AND queue = %s"
            " AND metric IN ('finished', 'attempts') GROUP BY 1, 2",
            [KIND, QUEUE],
        )
        sums = {(metric, label): int(n) for metric, label, n in cursor.fetchall()}
    assert sums == {("finished", "succeeded"): len(outcomes) + 1, ("attempts", "succeeded"): len(outcomes) + 1}
