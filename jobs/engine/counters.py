"""Compaction of the /metrics counters (`conveyor_counter`, jobs/metrics.py).

The counter triggers (migrations 0009 and 0019) add to the row of their
counter and the writer's backend pid (`shard`), which stays locked until the
writer's transaction ends. A backend runs one transaction at a time, so no
writer ever waits for another: however long a caller keeps its transaction
open after a submit, only its own rows are locked.

Each backend that counted something leaves rows of its own, so `compact`
(a Django-Q2 schedule, every minute) folds the rows of pids that are no
longer a live backend into the counter's shard -1, in one statement: the
rows it deletes and the sums it adds commit together, so a scrape (which
sums all shards) sees the same totals before and after. It never waits:
rows locked by a writer (a new backend that got a reused pid) are skipped
until the next run, and a run that finds another one in progress (its
advisory lock) returns None. The one wait left is the other way round and
short: a new backend whose pid is being folded right now waits for that one
statement, not for anyone's open transaction. The table holds about one row per counter and
live backend, plus the folded ones.
"""

from __future__ import annotations

from django.db import connection, transaction

FOLDED = -1
# pg_try_advisory_xact_lock key: "conveyor counter compaction".
LOCK_KEY = 0x0C0_C047

_COMPACT = f"""
WITH gone AS (
    DELETE FROM conveyor_counter
    WHERE (metric, kind, queue, label, shard) IN (
        SELECT metric, kind, queue, label, shard FROM conveyor_counter
        WHERE shard <> {FOLDED} AND shard NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
        FOR UPDATE SKIP LOCKED
    )
    RETURNING metric, kind, queue, label, n, seconds
), folded AS (
    INSERT INTO conveyor_counter AS c (metric, kind, queue, label, shard, n, seconds)
    SELECT metric, kind, queue, label, {FOLDED}, sum(n), sum(seconds) FROM gone
    GROUP BY metric, kind, queue, label
    ON CONFLICT (metric, kind, queue, label, shard)
    DO UPDATE SET n = c.n + EXCLUDED.n, seconds = c.seconds + EXCLUDED.seconds
)
SELECT count(*) FROM gone
"""


def compact() -> int | None:
    """Fold the counter rows of backends that are gone into shard -1.
    Returns how many rows it folded, or None when another compaction is
    running right now."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [LOCK_KEY])
        if not cursor.fetchone()[0]:
            return None
        cursor.execute(_COMPACT)
        return cursor.fetchone()[0]
