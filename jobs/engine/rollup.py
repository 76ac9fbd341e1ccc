"""The per-minute rollup of finished attempts (`jobs_minuterollup`) and the
figures read from it: throughput and run-time series over 1 h, 24 h or 7 days,
and a per-kind table (succeeded, failed, failure rate, p50/p95 run time, p95
wait before the first start).

Writing (`roll_up`, a Django-Q2 schedule every minute): one row per minute,
queue and kind with attempts that finished in that minute, incremental from
the cursor (`jobs_rollupcursor.rolled_until`). It rolls only minutes that
ended at least LAG ago: a finishing transaction stamps `finished_at` with its
start and commits a moment later, so a minute is complete well before then.
One writer at a time: the run holds a transaction-level advisory lock and
locks the cursor row; a second caller meanwhile gets None and writes nothing,
so no minute is counted twice. Rows older than RETENTION are deleted in the
same transaction.

Percentiles: run and wait times are kept per minute as histograms in
logarithmic buckets, bucket b (b >= 1) holding values in (2^((b-1)/4),
2^(b/4)] milliseconds (bucket 0: up to 1 ms, the last bucket everything
above ~2^31 ms). Buckets are summed over the range and the percentile is
interpolated inside its bucket: exact to one bucket, i.e. within 19 % of the
true value (the ratio 2^(1/4)). Summing buckets is exact, where averaging
per-minute percentiles would not be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection, transaction
from django.utils import timezone

BUCKETS_PER_DOUBLING = 4
LAST_BUCKET = 128  # 2^(127/4) ms is about 34 days
RETENTION = timedelta(days=30)
LAG = timedelta(minutes=1)
CHUNK = timedelta(days=1)  # the most one statement rolls
# pg_try_advisory_xact_lock key: "conveyor rollup".
LOCK_KEY = 0x0C0_4011


def bucket_sql(value: str) -> str:
    """SQL of the bucket of `value` (milliseconds, never negative)."""
    return f"least({LAST_BUCKET}, ceil({BUCKETS_PER_DOUBLING} * log(2, greatest({value}, 1)::numeric)))::smallint"


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """The (lower, upper] bounds of `bucket`, milliseconds."""
    if bucket <= 0:
        return 0.0, 1.0
    return 2 ** ((bucket - 1) / BUCKETS_PER_DOUBLING), 2 ** (bucket / BUCKETS_PER_DOUBLING)


_ROLL = f"""
WITH a AS (
  SELECT date_trunc('minute', a.finished_at) AS minute, j.queue, j.kind, a.outcome,
    greatest(extract(epoch FROM a.finished_at - a.started_at) * 1000, 0) AS run_ms,
    CASE WHEN a.number = 1 THEN greatest(extract(epoch FROM a.started_at - j.created_at) * 1000, 0) END AS wait_ms
  FROM jobs_attempt a JOIN jobs_job j ON j.id = a.job_id
  WHERE a.finished_at >= %(start)s AND a.finished_at < %(end)s
),
totals AS (
  SELECT minute, queue, kind,
    count(*) FILTER (WHERE outcome = 'succeeded') AS succeeded,
    count(*) FILTER (WHERE outcome IN ('failed', 'lost')) AS failed,
    count(*) FILTER (WHERE outcome = 'cancelled') AS cancelled,
    count(*) AS run_count, round(sum(run_ms))::bigint AS run_ms_sum, count(wait_ms) AS wait_count
  FROM a GROUP BY 1, 2, 3
),
rh AS (
  SELECT minute, queue, kind, array_agg(b ORDER BY b) AS buckets, array_agg(n ORDER BY b) AS counts
  FROM (SELECT minute, queue, kind, {bucket_sql("run_ms")} AS b, count(*)::int AS n FROM a GROUP BY 1, 2, 3, 4) x
  GROUP BY 1, 2, 3
),
wh AS (
  SELECT minute, queue, kind, array_agg(b ORDER BY b) AS buckets, array_agg(n ORDER BY b) AS counts
  FROM (SELECT minute, queue, kind, {bucket_sql("wait_ms")} AS b, count(*)::int AS n
        FROM a WHERE wait_ms IS NOT NULL GROUP BY 1, 2, 3, 4) x
  GROUP BY 1, 2, 3
)
INSERT INTO jobs_minuterollup (minute, queue, kind, succeeded, failed, cancelled, run_count, run_ms_sum,
  run_buckets, run_counts, wait_count, wait_buckets, wait_counts)
SELECT t.minute, t.queue, t.kind, t.succeeded, t.failed, t.cancelled, t.run_count, t.run_ms_sum,
  rh.buckets, rh.counts, t.wait_count, coalesce(wh.buckets, '{{}}'), coalesce(wh.counts, '{{}}')
FROM totals t JOIN rh USING (minute, queue, kind) LEFT JOIN wh USING (minute, queue, kind)
"""


def roll_up(*, now: datetime | None = None) -> dict | None:
    """Roll every complete minute since the cursor into `jobs_minuterollup`
    and delete rows older than RETENTION. Returns {"minutes": n, "rows": n,
    "deleted": n}, or None when another caller is rolling up right now."""
    now = now or timezone.now()
    end = (now - LAG).replace(second=0, microsecond=0)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [LOCK_KEY])
        if not cursor.fetchone()[0]:
            return None
        cursor.execute("SELECT rolled_until FROM jobs_rollupcursor WHERE id = 1 FOR UPDATE")
        row = cursor.fetchone()
        start = row[0] if row else _first_minute(cursor, end)
        rows = 0
        at = start
        while at < end:
            upto = min(at + CHUNK, end)
            cursor.execute(_ROLL, {"start": at, "end": upto})
            rows += cursor.rowcount
            at = upto
        cursor.execute(
            "INSERT INTO jobs_rollupcursor (id, rolled_until) VALUES (1, %s)"
            " ON CONFLICT (id) DO UPDATE SET rolled_until = excluded.rolled_until",
            [max(start, end)],
        )
        cursor.execute("DELETE FROM jobs_minuterollup WHERE minute < %s", [now - RETENTION])
        deleted = cursor.rowcount
    minutes = max(0, int((end - start).total_seconds() // 60))
    return {"minutes": minutes, "rows": rows, "deleted": deleted}


def _first_minute(cursor, end: datetime) -> datetime:
    """Where a first run starts: the oldest finished attempt within the
    retention period (through the finished_at index)."""
    cursor.execute(
        "SELECT date_trunc('minute', min(finished_at)) FROM jobs_attempt WHERE finished_at >= %s",
        [end - RETENTION],
    )
    first = cursor.fetchone()[0]
    return min(first, end) if first else end


# --- reading ----------------------------------------------------------------------

RANGES = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}
# The width of one point of a range's series.
STEPS = {"1h": timedelta(minutes=1), "24h": timedelta(minutes=15), "7d": timedelta(hours=1)}


@dataclass(frozen=True)
class Point:
    at: datetime  # the start of the step
    succeeded: int
    failed: int
    run_p95_ms: float | None


@dataclass(frozen=True)
class KindFigures:
    queue: str | None
    kind: str
    succeeded: int
    failed: int
    run_p50_ms: float | None
    run_p95_ms: float | None
    wait_p95_ms: float | None

    @property
    def failure_rate(self) -> float | None:
        total = self.succeeded + self.failed
        return self.failed / total if total else None


def percentile(histogram: dict[int, int], p: float) -> float | None:
    """The p-th quantile (0..1) of a bucket -> count histogram, interpolated
    linearly inside its bucket; None for an empty histogram."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = p * total
    seen = 0
    for bucket in sorted(histogram):
        count = histogram[bucket]
        if count and seen + count >= rank:
            low, high = bucket_bounds(bucket)
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return bucket_bounds(max(histogram))[1]


def _window(range_name: str, now: datetime | None) -> tuple[datetime, datetime, timedelta]:
    if range_name not in RANGES:
        raise ValueError(f"unknown range {range_name!r}: one of {', '.join(RANGES)}")
    now = now or timezone.now()
    step = STEPS[range_name]
    # Aligned to the step, so a point always covers the same minutes.
    end = datetime.fromtimestamp(
        math.ceil(now.timestamp() / step.total_seconds()) * step.total_seconds(), tz=now.tzinfo
    )
    return end - RANGES[range_name], end, step


def series(range_name: str, *, queue: str | None = None, now: datetime | None = None) -> list[Point]:
    """One Point per step of the range (steps without attempts included)."""
    start, end, step = _window(range_name, now)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT date_bin(%(step)s, r.minute, %(origin)s) AS at, sum(r.succeeded), sum(r.failed), NULL, NULL"
            " FROM jobs_minuterollup r WHERE r.minute >= %(start)s AND r.minute < %(end)s"
            " AND (%(queue)s::text IS NULL OR r.queue = %(queue)s) GROUP BY 1"
            " UNION ALL"
            " SELECT date_bin(%(step)s, r.minute, %(origin)s), NULL, NULL, u.b, sum(u.n)"
            " FROM jobs_minuterollup r, unnest(r.run_buckets, r.run_counts) AS u(b, n)"
            " WHERE r.minute >= %(start)s AND r.minute < %(end)s"
            " AND (%(queue)s::text IS NULL OR r.queue = %(queue)s) GROUP BY 1, 4",
            {"step": step, "origin": start, "start": start, "end": end, "queue": queue},
        )
        rows = cursor.fetchall()
    counts: dict[datetime, tuple[int, int]] = {}
    histograms: dict[datetime, dict[int, int]] = {}
    for at, succeeded, failed, bucket, n in rows:
        if bucket is None:
            counts[at] = (int(succeeded), int(failed))
        else:
            histograms.setdefault(at, {})[bucket] = int(n)
    points = []
    at = start
    while at < end:
        succeeded, failed = counts.get(at, (0, 0))
        points.append(Point(at, succeeded, failed, percentile(histograms.get(at, {}), 0.95)))
        at += step
    return points


def kind_table(
    since: timedelta, *, queue: str | None = None, by_queue: bool = False, now: datetime | None = None
) -> list[KindFigures]:
    """Per kind (and per queue when `by_queue`), over the minutes since
    `now - since`: counts and percentiles summed from the buckets."""
    now = now or timezone.now()
    params = {"start": now - since, "queue": queue}
    where = "r.minute >= %(start)s AND (%(queue)s::text IS NULL OR r.queue = %(queue)s)"
    group = "r.queue, r.kind" if by_queue else "NULL::text, r.kind"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {group}, sum(r.succeeded), sum(r.failed) FROM jobs_minuterollup r WHERE {where} GROUP BY 1, 2",
            params,
        )
        totals = {(q, k): (int(s), int(f)) for q, k, s, f in cursor.fetchall()}
        histograms: dict[tuple[str, str | None, str], dict[int, int]] = {}
        for which in ("run", "wait"):
            cursor.execute(
                f"SELECT {group}, u.b, sum(u.n) FROM jobs_minuterollup r,"
                f" unnest(r.{which}_buckets, r.{which}_counts) AS u(b, n) WHERE {where} GROUP BY 1, 2, 3",
                params,
            )
            for q, k, b, n in cursor.fetchall():
                histograms.setdefault((which, q, k), {})[b] = int(n)
    table = []
    for (q, k), (succeeded, failed) in sorted(totals.items(), key=lambda item: (item[0][1], item[0][0] or "")):
        run = histograms.get(("run", q, k), {})
        wait = histograms.get(("wait", q, k), {})
        table.append(
            KindFigures(q, k, succeeded, failed, percentile(run, 0.5), percentile(run, 0.95), percentile(wait, 0.95))
        )
    return table


def rolled_until() -> datetime | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT rolled_until FROM jobs_rollupcursor WHERE id = 1")
        row = cursor.fetchone()
    return row[0] if row else None
