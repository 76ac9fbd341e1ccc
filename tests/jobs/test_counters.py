"""The /metrics counters (`conveyor_counter`) never make one transaction wait
on another: a caller holding its transaction open after a submit (or a
finish) does not stall anyone else's. And compacting the rows of gone
backends keeps every sum exact."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import pytest
from django.db import connection, connections, transaction

import jobs
from jobs.worker import runner
from tests.conftest import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def no_counts_yet(transactional_db) -> None:
    """The table has no model, so no test flushes it: these tests start it empty."""
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM conveyor_counter")


KIND, QUEUE = "demo.noop", "default"
CONTENDERS = 17  # fresh connections besides the holder's: one shares its pid % 16
# A contender waits at most 2 s for a lock (`lock_timeout`): waiting on the
# holder's rows, which it keeps until every contender is done, is an error.
# PROMPT only bounds the whole call, with room for a loaded machine (a
# 1.5 s bound on the call failed there without any lock wait).
PROMPT = 5.0


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


class Session:
    """A thread with a database connection of its own that runs what it is given."""

    def __init__(self) -> None:
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()
        self.pid = self.call(backend_pid)

    def _serve(self) -> None:
        try:
            while (work := self.inbox.get()) is not None:
                try:
                    self.outbox.put((True, work()))
                except Exception as error:  # handed to the caller
                    self.outbox.put((False, error))
        finally:
            connections.close_all()

    def send(self, work: Callable[[], object]) -> None:
        self.inbox.put(work)

    def result(self, timeout: float = 30) -> object:
        ok, value = self.outbox.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def call(self, work: Callable[[], object], timeout: float = 30) -> object:
        self.send(work)
        return self.result(timeout)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=60)


@contextmanager
def sessions(n: int) -> Iterator[list[Session]]:
    opened = []
    try:
        for _ in range(n):
            opened.append(Session())
        yield opened
    finally:
        for session in opened:
            session.close()


@contextmanager
def holding_open(work: Callable[[], object], session: Session | None = None) -> Iterator[None]:
    """Runs `work` in a transaction on `session` (or a connection of its own)
    and keeps that transaction open until the block ends."""
    with ExitStack() as stack:
        if session is None:
            session = stack.enter_context(sessions(1))[0]
        ready, release = threading.Event(), threading.Event()

        def hold() -> None:
            with transaction.atomic():
                work()
                ready.set()
                release.wait(timeout=120)

        session.send(hold)
        try:
            wait_until(lambda: ready.is_set() or not session.outbox.empty(), timeout=30, message="the holder")
            if not ready.is_set():
                session.result()  # raises what the holder raised
            yield
        finally:
            release.set()
            if ready.is_set():
                session.result()  # its commit


@dataclass
class Outcome:
    pid: int
    seconds: float
    error: BaseException | None


def one_shard_apart(found: list[Session]) -> tuple[Session, list[Session]]:
    """One of two sessions whose pids share pid % 16 (the old counters'
    shard; 17 or more sessions always have such a pair), and all the others."""
    by_residue: dict[int, list[Session]] = {}
    for session in found:
        by_residue.setdefault(session.pid % 16, []).append(session)
    holder = next(group[0] for group in by_residue.values() if len(group) > 1)
    return holder, [session for session in found if session is not holder]


def contend(others: list[Session], work: Callable[[int], object]) -> list[Outcome]:
    """`work(i)` on each of `others`, one after another, each with a 2 s lock timeout."""

    def timed(i: int, pid: int) -> Outcome:
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
        started = time.monotonic()
        try:
            work(i)
            error = None
        except Exception as failure:  # reported to the test
            error = failure
        return Outcome(pid, time.monotonic() - started, error)

    return [session.call(lambda i=i, pid=session.pid: timed(i, pid)) for i, session in enumerate(others)]


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
    with sessions(CONTENDERS + 1) as found:
        holder, others = one_shard_apart(found)
        with holding_open(lambda: jobs.submit(KIND, {}, queue=QUEUE), holder):
            outcomes = contend(others, lambda i: jobs.submit(KIND, {}, queue=QUEUE))
    assert_all_prompt(outcomes)
    # Every submission counted, the holder's too (it committed at the end).
    assert submitted_count() == len(outcomes) + 1


def test_an_open_transaction_after_a_finish_does_not_stall_other_finishes():
    held = jobs.submit(KIND, {}, queue=QUEUE)
    to_run = [jobs.submit(KIND, {}, queue=QUEUE) for _ in range(CONTENDERS)]
    # Finishing runs the job: its attempt ends (the attempt counters) and the
    # job succeeds (the finished counter), inside the holder's transaction.
    with sessions(CONTENDERS + 1) as found:
        holder, others = one_shard_apart(found)
        with holding_open(lambda: runner.run_job(str(held.id)), holder):
            outcomes = contend(others, lambda i: runner.run_job(str(to_run[i].id)))
    assert_all_prompt(outcomes)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT metric, label, sum(n) FROM conveyor_counter WHERE kind = %s AND queue = %s"
            " AND metric IN ('finished', 'attempts') GROUP BY 1, 2",
            [KIND, QUEUE],
        )
        sums = {(metric, label): int(n) for metric, label, n in cursor.fetchall()}
    assert sums == {("finished", "succeeded"): len(outcomes) + 1, ("attempts", "succeeded"): len(outcomes) + 1}


# --- compaction ------------------------------------------------------------------

# Never a backend's pid: Linux pids stop at 2^22.
NOT_A_PID = 2**22 + 1


def shards(kind: str = KIND) -> dict[int, int]:
    """The 'submitted' rows of `kind` in QUEUE: shard -> n."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT shard, n FROM conveyor_counter WHERE metric = 'submitted' AND kind = %s AND queue = %s",
            [kind, QUEUE],
        )
        return dict(cursor.fetchall())


def live_pids() -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity")
        return {row[0] for row in cursor.fetchall()}


def test_compaction_keeps_the_sums_exact_while_writers_run(client):
    from jobs.engine import counters
    from jobs.models import Job
    from tests.jobs.test_metrics import scrape, value

    stop = threading.Event()
    failed: list[BaseException] = []

    def write(n: int) -> None:
        # Each round on a fresh connection: a new pid, whose rows are folded
        # once it has gone. Some rounds submit twice in one transaction.
        try:
            while not stop.is_set():
                with transaction.atomic():
                    jobs.submit(KIND, {}, queue=QUEUE)
                    if n % 2:
                        jobs.submit(KIND, {}, queue=QUEUE)
                connections.close_all()
        except BaseException as error:  # reported to the test below
            failed.append(error)
        finally:
            connections.close_all()

    writers = [threading.Thread(target=write, args=(n,)) for n in range(3)]
    for writer in writers:
        writer.start()
    folded, seen = 0, []
    try:
        # Compact (and read the sum) until compaction has folded plenty of
        # rows of writers' connections that came and went meanwhile.
        def compacted_enough() -> bool:
            nonlocal folded
            folded += counters.compact() or 0
            seen.append(submitted_count())
            return folded >= 20

        wait_until(compacted_enough, timeout=60, interval=0.05, message=lambda: f"{folded} rows folded")
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=60)
    assert not failed, failed
    # A sum read meanwhile never dropped: folding moves counts, never loses them.
    assert seen == sorted(seen)

    # Once the writers' backends have exited, everything is in the folded row.
    wait_until(
        lambda: counters.compact() is not None and set(shards()) == {counters.FOLDED},
        timeout=10,
        message=lambda: f"only the folded row left: {shards()}, live {live_pids()}",
    )
    submitted = Job.objects.filter(kind=KIND, queue=QUEUE).count()
    assert submitted_count() == submitted > 0
    assert value(scrape(client), "conveyor_jobs_submitted_total", kind=KIND, queue=QUEUE) == submitted


def test_compaction_skips_rows_a_writer_holds_and_keeps_live_backends_rows():
    from jobs.engine import counters

    # A live backend's committed rows stay its own.
    jobs.submit(KIND, {}, queue=QUEUE)
    mine = backend_pid()
    # A row of a pid that is not a backend but is locked by an open transaction
    # (as when a new backend got the pid of a gone one and is counting).
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO conveyor_counter (metric, kind, queue, label, shard, n) VALUES ('submitted', %s, %s, '', %s, 5)",
            [KIND, QUEUE, NOT_A_PID],
        )

    def lock_it() -> None:
        with connection.cursor() as cursor:
            cursor.execute("UPDATE conveyor_counter SET n = n + 1 WHERE shard = %s", [NOT_A_PID])

    with holding_open(lock_it):
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
        started = time.monotonic()
        assert counters.compact() == 0
        assert time.monotonic() - started < PROMPT
        assert shards() == {mine: 1, NOT_A_PID: 5}
    assert counters.compact() == 1
    assert shards() == {mine: 1, counters.FOLDED: 6}


def test_a_compaction_while_another_runs_does_nothing():
    from jobs.engine import counters

    def take_the_lock() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [counters.LOCK_KEY])

    with holding_open(take_the_lock):
        assert counters.compact() is None
    assert counters.compact() == 0


def test_the_trigger_functions_keep_planning_without_nested_loops():
    with connection.cursor() as cursor:
        cursor.execute("SELECT proname, proconfig FROM pg_proc WHERE proname LIKE 'conveyor_count_%%' ORDER BY proname")
        found = dict(cursor.fetchall())
    assert found == {
        "conveyor_count_attempts": ["enable_nestloop=off"],
        "conveyor_count_finished": ["enable_nestloop=off"],
        "conveyor_count_submitted": None,
    }


def test_the_migration_folds_the_old_shards_and_back():
    from django.db.migrations.executor import MigrationExecutor

    def migrate(target: str) -> None:
        executor = MigrationExecutor(connection)
        executor.migrate([("jobs", target)])

    def rows() -> list[tuple]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT metric, label, shard, n, seconds FROM conveyor_counter ORDER BY 1, 2, 3")
            return cursor.fetchall()

    migrate("0017_rollup")
    try:
        with connection.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO conveyor_counter (metric, kind, queue, label, shard, n, seconds)"
                " VALUES (%s, 'demo.noop', 'default', %s, %s, %s, %s)",
                [
                    ("submitted", "", 3, 4, 0),
                    ("submitted", "", 11, 5, 0),
                    ("attempt_seconds", "0.5", 3, 2, 0.5),
                    ("attempt_seconds", "0.5", 7, 1, 0.25),
                ],
            )
        migrate("0019_counter_shards")
        assert rows() == [("attempt_seconds", "0.5", -1, 3, 0.75), ("submitted", "", -1, 9, 0)]
        jobs.submit(KIND, {}, queue=QUEUE)
        assert ("submitted", "", backend_pid(), 1, 0) in rows()
        migrate("0017_rollup")
        # Back: every row in a shard of 0..15 again, nothing lost.
        back = rows()
        assert all(0 <= shard < 16 for _, _, shard, _, _ in back), back
        sums: dict[tuple, list] = {}
        for metric, label, _, n, seconds in back:
            total = sums.setdefault((metric, label), [0, 0.0])
            total[0] += n
            total[1] += seconds
        assert sums == {("attempt_seconds", "0.5"): [3, 0.75], ("submitted", ""): [10, 0.0]}
    finally:  # back to the latest, whatever later migrations there are
        latest = MigrationExecutor(connection).loader.graph.leaf_nodes("jobs")[0][1]
        migrate(latest)


def test_compaction_is_a_maintenance_schedule():
    from django.utils.module_loading import import_string
    from django_q.models import Schedule

    from jobs.djangoq.schedules import ensure_schedules
    from jobs.engine import counters

    ensure_schedules()
    schedule = Schedule.objects.get(name="conveyor.compact_counters")
    assert import_string(schedule.func) is counters.compact
    assert (schedule.schedule_type, schedule.minutes, schedule.repeats) == (Schedule.MINUTES, 1, -1)


def test_finishing_an_attempt_does_not_scan_the_jobs_table():
    # Found by bench/history.py: with 200,000 finished jobs every finished
    # attempt took 80 ms in the attempts' counter trigger, which (nested loops
    # off) hashed the whole jobs table to find one job's kind and queue.
    from django.utils import timezone

    from jobs.models import Attempt, Job

    Job.objects.bulk_create([Job(kind="demo.sleep", queue="llm") for _ in range(2000)])
    job = Job.objects.create(kind=KIND, queue=QUEUE)
    attempt = Attempt.objects.create(job=job, number=1, started_at=timezone.now())
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE jobs_job")
        with transaction.atomic():
            scans = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'jobs_job'"
            cursor.execute(scans)
            before = cursor.fetchone()[0]
            cursor.execute(
                "UPDATE jobs_attempt SET finished_at = now(), outcome = 'succeeded' WHERE id = %s", [attempt.id]
            )
            cursor.execute(scans)
            after = cursor.fetchone()[0]
        cursor.execute("SELECT kind, queue, sum(n) FROM conveyor_counter WHERE metric = 'attempts' GROUP BY 1, 2")
        counted = cursor.fetchall()
    assert after == before
    assert counted == [(KIND, QUEUE, 1)]


def test_an_attempt_is_filed_under_the_first_bucket_bound_it_fits_numerically():
    # Found by bench/history.py's loader, which files attempts set-based: the
    # trigger ordered the bounds as text ('10' < '2.5'), so an attempt of 1.5 s
    # went into the 10 s bucket, one of 20 s into 300 s.
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import Attempt, Job

    job = Job.objects.create(kind=KIND, queue=QUEUE)
    now = timezone.now()
    for number, seconds in enumerate((1.5, 20, 0.3, 4000), start=1):
        Attempt.objects.create(job=job, number=number, started_at=now - timedelta(seconds=seconds))
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE jobs_attempt SET outcome = 'succeeded', finished_at = started_at + CASE number"
            " WHEN 1 THEN interval '1.5 s' WHEN 2 THEN interval '20 s' WHEN 3 THEN interval '0.3 s'"
            " ELSE interval '4000 s' END WHERE job_id = %s",
            [job.id],
        )
        cursor.execute("SELECT label, sum(n) FROM conveyor_counter WHERE metric = 'attempt_seconds' GROUP BY 1")
        filed = dict(cursor.fetchall())
    assert filed == {"2.5": 1, "30": 1, "0.5": 1, "+Inf": 1}
