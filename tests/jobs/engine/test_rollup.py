"""The per-minute rollup on real Postgres: counts and percentiles from jobs
with known run times, one writer at a time, incremental runs, 30-day retention."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
from django.db import connection, connections
from django.utils import timezone

from jobs.engine import rollup
from jobs.models import Attempt, Job, MinuteRollup, RollupCursor, State

# Run time resolution: one bucket, a factor 2^(1/4).
RESOLUTION = 2 ** (1 / rollup.BUCKETS_PER_DOUBLING) - 1


def _now() -> datetime:
    return timezone.now().replace(second=30, microsecond=0)


def _finished(
    kind: str,
    *,
    finished_at: datetime,
    run_ms: float,
    wait_ms: float = 0,
    outcome: str = "succeeded",
    queue: str = "default",
    number: int = 1,
) -> Job:
    started_at = finished_at - timedelta(milliseconds=run_ms)
    state = State.SUCCEEDED if outcome == "succeeded" else State.DEAD
    job = Job.objects.create(kind=kind, queue=queue, state=state, attempts=number, finished_at=finished_at)
    Job.objects.filter(id=job.id).update(created_at=started_at - timedelta(milliseconds=wait_ms))
    Attempt.objects.create(job=job, number=number, started_at=started_at, finished_at=finished_at, outcome=outcome)
    return job


def _close(value: float | None, expected: float) -> bool:
    return value is not None and abs(value - expected) <= expected * RESOLUTION


@pytest.mark.django_db
def test_counts_and_percentiles_of_jobs_with_known_run_times():
    now = _now()
    minute = (now - timedelta(minutes=5)).replace(second=0)
    # 90 quick runs of 100 ms, 10 slow ones of 2 s; 5 failures, 1 lost attempt.
    for i in range(90):
        _finished("demo.quick", finished_at=minute + timedelta(seconds=i % 50), run_ms=100, wait_ms=40)
    for i in range(10):
        _finished("demo.quick", finished_at=minute + timedelta(seconds=i), run_ms=2000, wait_ms=3000)
    for _ in range(5):
        _finished("demo.flaky", finished_at=minute, run_ms=500, outcome="failed")
    _finished("demo.flaky", finished_at=minute, run_ms=700, outcome="lost")
    _finished("demo.flaky", finished_at=minute, run_ms=300, queue="llm")
    # A second attempt: its run time counts, its wait (a backoff) does not.
    _finished("demo.flaky", finished_at=minute, run_ms=300, number=2, wait_ms=60_000)

    report = rollup.roll_up(now=now)
    assert report["rows"] == 3  # (quick, default), (flaky, default), (flaky, llm)

    quick = MinuteRollup.objects.get(kind="demo.quick")
    assert quick.minute == minute
    assert (quick.succeeded, quick.failed, quick.run_count, quick.wait_count) == (100, 0, 100, 100)
    assert quick.run_ms_sum == 90 * 100 + 10 * 2000

    (table,) = [row for row in rollup.kind_table(timedelta(hours=1), now=now) if row.kind == "demo.quick"]
    assert (table.succeeded, table.failed, table.failure_rate) == (100, 0, 0.0)
    assert _close(table.run_p50_ms, 100)
    assert _close(table.run_p95_ms, 2000)
    assert _close(table.wait_p95_ms, 3000)

    (flaky,) = [row for row in rollup.kind_table(timedelta(hours=1), now=now) if row.kind == "demo.flaky"]
    assert (flaky.succeeded, flaky.failed) == (2, 6)
    assert flaky.failure_rate == 6 / 8
    assert _close(flaky.wait_p95_ms, 1)  # only first attempts: never the 60 s backoff
    by_queue = {(r.queue, r.kind): r for r in rollup.kind_table(timedelta(hours=1), by_queue=True, now=now)}
    assert by_queue[("llm", "demo.flaky")].succeeded == 1
    only_llm = rollup.kind_table(timedelta(hours=1), queue="llm", now=now)
    assert [(r.kind, r.succeeded, r.failed) for r in only_llm] == [("demo.flaky", 1, 0)]


@pytest.mark.django_db
def test_series_per_range_and_queue():
    now = _now()
    for minutes_ago, queue in ((3, "default"), (3, "llm"), (90, "default"), (60 * 30, "default")):
        _finished("demo.noop", finished_at=now - timedelta(minutes=minutes_ago), run_ms=250, queue=queue)
    rollup.roll_up(now=now)

    hour = rollup.series("1h", now=now)
    assert len(hour) == 60
    assert sum(p.succeeded for p in hour) == 2
    busy = [p for p in hour if p.succeeded]
    assert len(busy) == 1 and _close(busy[0].run_p95_ms, 250)
    assert all(p.run_p95_ms is None for p in hour if not p.succeeded)
    assert sum(p.succeeded for p in rollup.series("1h", queue="llm", now=now)) == 1
    day = rollup.series("24h", now=now)
    assert len(day) == 96 and sum(p.succeeded for p in day) == 3
    week = rollup.series("7d", now=now)
    assert len(week) == 7 * 24 and sum(p.succeeded for p in week) == 4
    with pytest.raises(ValueError, match="unknown range"):
        rollup.series("2w", now=now)


@pytest.mark.django_db
def test_runs_are_incremental_and_roll_only_complete_minutes():
    now = _now()
    _finished("demo.noop", finished_at=now - timedelta(minutes=10), run_ms=10)
    # This minute (and the last) may still get attempts: not rolled yet.
    _finished("demo.noop", finished_at=now - timedelta(seconds=5), run_ms=10)
    rollup.roll_up(now=now)
    assert sum(MinuteRollup.objects.values_list("succeeded", flat=True)) == 1
    assert RollupCursor.objects.get().rolled_until == (now - rollup.LAG).replace(second=0)
    again = rollup.roll_up(now=now)
    assert again["rows"] == 0
    assert sum(MinuteRollup.objects.values_list("succeeded", flat=True)) == 1
    later = rollup.roll_up(now=now + timedelta(minutes=2))
    assert later["rows"] == 1
    assert sum(MinuteRollup.objects.values_list("succeeded", flat=True)) == 2


@pytest.mark.django_db
def test_rows_older_than_30_days_are_deleted():
    now = _now()
    old = now - timedelta(days=31)
    MinuteRollup.objects.create(minute=old.replace(second=0), queue="default", kind="demo.noop", succeeded=7)
    MinuteRollup.objects.create(
        minute=(now - timedelta(days=29)).replace(second=0), queue="default", kind="demo.noop", succeeded=3
    )
    # An attempt older than the retention period is never rolled in.
    _finished("demo.noop", finished_at=old, run_ms=10)
    report = rollup.roll_up(now=now)
    assert report["deleted"] == 1
    assert list(MinuteRollup.objects.values_list("succeeded", flat=True)) == [3]


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_rollups_do_not_count_twice():
    now = _now()
    for i in range(40):
        _finished("demo.noop", finished_at=now - timedelta(minutes=2 + i % 20), run_ms=10 + i)
    start = threading.Barrier(2)
    results: list[dict | None] = []

    def run() -> None:
        try:
            start.wait(timeout=10)
            results.append(rollup.roll_up(now=now))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 2
    assert sum(MinuteRollup.objects.values_list("succeeded", flat=True)) == 40
    # And whichever ran second, by lock or by cursor, wrote nothing.
    assert sorted(r["rows"] if r else 0 for r in results)[0] == 0


@pytest.mark.django_db(transaction=True)
def test_a_rollup_while_another_holds_the_lock_writes_nothing():
    now = _now()
    _finished("demo.noop", finished_at=now - timedelta(minutes=3), run_ms=10)
    holder = connections.create_connection("default")
    try:
        with holder.cursor() as cursor:
            cursor.execute("BEGIN")
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [rollup.LOCK_KEY])
            assert rollup.roll_up(now=now) is None
            assert not MinuteRollup.objects.exists()
            cursor.execute("ROLLBACK")
    finally:
        holder.close()
    assert rollup.roll_up(now=now)["rows"] == 1
    assert connection.vendor == "postgresql"


def test_percentile_interpolates_inside_its_bucket():
    # 10 values in bucket 20 ((2^4.75, 2^5] ms = (26.9, 32]): the median is halfway.
    low, high = rollup.bucket_bounds(20)
    assert rollup.percentile({20: 10}, 0.5) == pytest.approx(low + (high - low) / 2)
    assert rollup.percentile({}, 0.5) is None
