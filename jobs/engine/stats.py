"""Queue statistics: counts by state, age of the oldest runnable job and the
last minute's throughput, per queue."""

from __future__ import annotations

from typing import TypedDict

from django.db import connection


class QueueStats(TypedDict):
    queue: str
    waiting: int
    queued: int
    scheduled: int
    running: int
    retrying: int
    dead: int
    oldest_queued_age_seconds: float | None
    succeeded_last_minute: int
    failed_last_minute: int
    paused: bool  # operator controls (jobs/engine/queues.py)
    max_running: int | None


# Active counts come from the partial index on active states; the dead count
# from the partial index on dead jobs; the last minute from the finished_at
# index, the attempts' failures from the attempts' finished_at index. None of
# them scans finished history.
_QUEUE_STATS = """
WITH active AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'queued') AS queued,
           count(*) FILTER (WHERE state = 'scheduled') AS scheduled,
           count(*) FILTER (WHERE state = 'running') AS running,
           count(*) FILTER (WHERE state = 'retrying') AS retrying,
           extract(epoch FROM now() - min(
               CASE WHEN state IN ('queued', 'scheduled', 'retrying')
                         AND (run_after IS NULL OR run_after <= now())
                    THEN coalesce(run_after, created_at) END)) AS oldest
    FROM jobs_job
    WHERE state IN ('queued', 'scheduled', 'running', 'retrying')
    GROUP BY queue
), waiting AS (
    -- jobs waiting on their dependencies (workflows), from the (state, created_at) index
    SELECT queue, count(*) AS waiting FROM jobs_job WHERE state = 'waiting' GROUP BY queue
), dead AS (
    SELECT queue, count(*) AS dead FROM jobs_job WHERE state = 'dead' GROUP BY queue
), recent AS (
    SELECT queue, count(*) AS succeeded
    FROM jobs_job
    WHERE state = 'succeeded' AND finished_at > now() - interval '1 minute'
    GROUP BY queue
), failures AS (
    -- every attempt that failed (or lost its worker) in the last minute,
    -- whatever became of its job since: a retry or discard does not rewrite it
    SELECT j.queue, count(*) AS failed
    FROM jobs_attempt a JOIN jobs_job j ON j.id = a.job_id
    WHERE a.finished_at > now() - interval '1 minute' AND a.outcome IN ('failed', 'lost')
    GROUP BY j.queue
)
SELECT q.queue,
       coalesce(a.queued, 0), coalesce(a.scheduled, 0), coalesce(a.running, 0), coalesce(a.retrying, 0),
       coalesce(d.dead, 0), a.oldest, coalesce(r.succeeded, 0), coalesce(f.failed, 0), coalesce(w.waiting, 0),
       coalesce(c.paused, false), c.max_running
FROM (SELECT queue FROM active UNION SELECT queue FROM waiting UNION SELECT queue FROM dead UNION SELECT queue FROM recent
      UNION SELECT queue FROM failures UNION SELECT name FROM jobs_queuecontrol UNION SELECT unnest(%s::text[])) q
LEFT JOIN jobs_queuecontrol c ON c.name = q.queue
LEFT JOIN active a USING (queue)
LEFT JOIN waiting w USING (queue)
LEFT JOIN dead d USING (queue)
LEFT JOIN recent r USING (queue)
LEFT JOIN failures f USING (queue)
ORDER BY q.queue
"""


def queue_stats(*, always: list[str] | None = None) -> list[QueueStats]:
    """One row per queue that has active, dead or recently finished jobs or
    operator controls, plus the queues named in `always`."""
    with connection.cursor() as cursor:
        cursor.execute(_QUEUE_STATS, [always or []])
        rows = cursor.fetchall()
    return [
        QueueStats(
            queue=row[0],
            waiting=row[9],
            queued=row[1],
            scheduled=row[2],
            running=row[3],
            retrying=row[4],
            dead=row[5],
            oldest_queued_age_seconds=round(float(row[6]), 3) if row[6] is not None else None,
            succeeded_last_minute=row[7],
            failed_last_minute=row[8],
            paused=row[10],
            max_running=row[11],
        )
        for row in rows
    ]


class Horizon(TypedDict):
    """The oldest open transaction of the database, which holds back the
    horizon below which VACUUM may remove dead rows (the xmin horizon)."""

    age_seconds: float  # 0 when no other transaction is open
    pid: int | None
    application_name: str
    state: str  # pg_stat_activity.state: active, idle in transaction, ...
    query: str  # its current or last statement, cut to QUERY_EXCERPT characters
    idle_in_transaction_age_seconds: float  # the oldest `idle in transaction` one; 0 when none
    xmin_age: int  # xids since the oldest xid or snapshot xmin held by a backend of the database; 0 when none


QUERY_EXCERPT = 200

# One statement over pg_stat_activity: the client backends of this database
# with a transaction open, except the one asking. Since Postgres 14 only the
# backends of the same database hold back its horizon. clock_timestamp(), not
# now(): the caller may be inside a transaction that began before the others.
# A session idle in transaction holds its xid (backend_xid), not a snapshot.
# Postgres reads pg_stat_activity once per transaction: call this outside one.
_HORIZON = """
WITH open AS (
    SELECT pid, application_name, state, query, xact_start, backend_xid, backend_xmin
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND backend_type = 'client backend' AND xact_start IS NOT NULL
)
SELECT greatest(extract(epoch FROM clock_timestamp() - o.xact_start), 0), o.pid, o.application_name, o.state,
       left(o.query, %s),
       (SELECT greatest(extract(epoch FROM clock_timestamp() - min(xact_start)), 0)
        FROM open WHERE state LIKE 'idle in transaction%%'),
       (SELECT max(greatest(age(backend_xid), age(backend_xmin))) FROM open)
FROM (SELECT 1) one
LEFT JOIN LATERAL (SELECT * FROM open ORDER BY xact_start LIMIT 1) o ON true
"""


def oldest_transaction() -> Horizon:
    """The database's oldest open transaction other than the caller's (one
    statement). Other roles' sessions are visible only to a superuser or a
    member of pg_read_all_stats."""
    with connection.cursor() as cursor:
        cursor.execute(_HORIZON, [QUERY_EXCERPT])
        age, pid, application, state, query, idle, xmin = cursor.fetchone()
    return Horizon(
        age_seconds=round(float(age), 3) if age is not None else 0.0,
        pid=pid,
        application_name=application or "",
        state=state or "",
        query=query or "",
        idle_in_transaction_age_seconds=round(float(idle), 3) if idle is not None else 0.0,
        xmin_age=int(xmin or 0),
    )
