"""Deleting finished history older than the retention period.

Dead jobs (the dead-letter queue) are kept for their own, longer period: an
operator may still retry them. A job with a webhook message still to deliver
is never deleted, however old: deleting it would delete the message with it
(and the delivery job's retry would find nothing to send).

Set-based: each chunk takes the next `chunk` due jobs along the finished_at
index (a keyset from where the last chunk ended, so no chunk rescans what
earlier ones deleted; their ids and row addresses go to a temporary table,
emptied at each commit, which every statement of the chunk reads), locks them (`FOR UPDATE SKIP LOCKED`: a dead job an
operator retries meanwhile is either retried and skipped here, or deleted,
never both; a job locked right now waits for the next purge), and deletes
them with their events and attempts in one statement, after the few rows of
other tables that point at them (RELATIONS: cascaded or set to NULL as the
models' `on_delete` says). Django's cascading `delete()` fetched every
related row into Python first: about fifty times slower.

No foreign-key constraint points at a job or an attempt (migration 0021):
with them, each deleted job fired one deferred check per referencing table at
commit, most of a chunk's time. RELATIONS is what keeps the references
right. Each chunk commits without waiting for its WAL flush
(`synchronous_commit = off` for that transaction only): a purge a crash
rolls back is simply run again. Its statements find their rows by index
(hash and merge joins off for the chunk: see _CHUNK_SETTINGS), in the order
of the ids (the temporary table is filled in that order, so consecutive
probes land on neighbouring index pages); events and attempts with the
chunk's ids as one array (one index scan each), and the jobs themselves by the
row address the chunk locked (a TID scan: no second walk of the primary key).
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs.models import ACTIVE_STATES, FINISHED_STATES, JobEvent, State

# A delivery job in one of these states may still send its message: waiting or
# running, or dead (an operator can retry it from the dead-letter queue).
_STILL_DELIVERING = (*ACTIVE_STATES, State.DEAD)

# Every foreign key to a job or an attempt, and what deleting the job does to
# it, in the models' own `on_delete` (tests/jobs/engine/test_retention.py holds
# this list to the models). Events and attempts go with the jobs in _DELETE.
RELATIONS = {
    ("jobs_jobevent", "job_id"): "cascade",
    ("jobs_attempt", "job_id"): "cascade",
    ("jobs_jobdependency", "job_id"): "cascade",
    ("jobs_jobdependency", "depends_on_id"): "cascade",
    ("jobs_webhookdelivery", "job_id"): "cascade",
    ("jobs_webhookdelivery", "deliver_job_id"): "set null",
    ("jobs_webhookattempt", "deliver_job_id"): "set null",
    ("jobs_webhookattempt", "job_attempt_id"): "set null",  # points at an attempt
    ("jobs_batch", "then_job_id"): "set null",
    ("jobs_page", "job_id"): "set null",
    ("jobs_schedule", "last_job_id"): "set null",
}

# The chunk's ids are kept in a temporary table, emptied at each commit, so
# that each statement of the chunk reads them there rather than from a list
# of thousands of ids sent again with every statement. `tid` is the job row's
# address: the chunk holds the row locked until it commits, so the row cannot
# move (no update, no vacuum) before the chunk deletes it there.
_CHUNK_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS conveyor_purge"
    " (id uuid PRIMARY KEY, state text, finished_at timestamptz, tid tid)"
    " ON COMMIT DELETE ROWS"
)

_DUE = f"""
WITH due AS (
  SELECT j.id, j.state, j.finished_at, j.ctid AS tid FROM jobs_job j
  WHERE j.finished_at >= %(after)s AND j.finished_at < %(horizon)s
    AND ((j.state IN ({", ".join(f"'{s}'" for s in FINISHED_STATES if s != State.DEAD)}) AND j.finished_at < %(cutoff)s)
         OR (j.state = 'dead' AND j.finished_at < %(dead_cutoff)s))
    AND NOT EXISTS (
      SELECT 1 FROM jobs_webhookdelivery d JOIN jobs_job dj ON dj.id = d.deliver_job_id
      WHERE d.job_id = j.id AND d.delivered_at IS NULL
        AND dj.state IN ({", ".join(f"'{s}'" for s in _STILL_DELIVERING)})
    )
  ORDER BY j.finished_at
  LIMIT %(chunk)s
  FOR UPDATE OF j SKIP LOCKED
), kept AS (
  -- In the order of the ids: every later statement probes the indexes on job
  -- ids in this order, neighbouring leaf pages one after the other (uuid4
  -- ids in finish order hit a random leaf page each: a fifth of the purge).
  INSERT INTO conveyor_purge SELECT id, state, finished_at, tid FROM due ORDER BY id RETURNING state, finished_at
)
SELECT state, count(*), max(finished_at) FROM kept GROUP BY state
"""

# The rows of other tables first (rare: webhook messages, workflows, content
# pages, schedules), each its own statement: one statement must not change a
# row twice (a webhook attempt can be both of a deleted message and of a
# deleted delivery job).
_BEFORE = [
    "UPDATE jobs_webhookattempt SET deliver_job_id = NULL WHERE deliver_job_id IN (SELECT id FROM conveyor_purge)",
    "UPDATE jobs_webhookattempt w SET job_attempt_id = NULL FROM jobs_attempt a"
    " WHERE a.job_id IN (SELECT id FROM conveyor_purge) AND w.job_attempt_id = a.id",
    "DELETE FROM jobs_webhookattempt WHERE delivery_id IN"
    " (SELECT id FROM jobs_webhookdelivery WHERE job_id IN (SELECT id FROM conveyor_purge))",
    "UPDATE jobs_webhookdelivery SET deliver_job_id = NULL WHERE deliver_job_id IN (SELECT id FROM conveyor_purge)",
    "DELETE FROM jobs_webhookdelivery WHERE job_id IN (SELECT id FROM conveyor_purge)",
    "DELETE FROM jobs_jobdependency WHERE job_id IN (SELECT id FROM conveyor_purge)",
    "DELETE FROM jobs_jobdependency WHERE depends_on_id IN (SELECT id FROM conveyor_purge)",
    "UPDATE jobs_batch SET then_job_id = NULL WHERE then_job_id IN (SELECT id FROM conveyor_purge)",
    "UPDATE jobs_page SET job_id = NULL WHERE job_id IN (SELECT id FROM conveyor_purge)",
    "UPDATE jobs_schedule SET last_job_id = NULL WHERE last_job_id IN (SELECT id FROM conveyor_purge)",
]

# Events and attempts (about four rows a job) are found with the chunk's ids
# as one array: a single index scan takes them in key order, without the
# executor's per-probe restart of a nested loop over the chunk (the events as a
# bitmap, visiting their pages in physical order). 15-20 % faster than
# `IN (SELECT ...)` at 2,000,000 jobs (bench/README.md, "The purge's ids as one
# array"). The rare relations in _BEFORE keep `IN`: on their small tables the
# planner would filter every row against the array instead.
_DELETE = """
WITH events AS (DELETE FROM jobs_jobevent WHERE job_id = ANY (ARRAY(SELECT id FROM conveyor_purge))),
attempts AS (DELETE FROM jobs_attempt WHERE job_id = ANY (ARRAY(SELECT id FROM conveyor_purge)))
DELETE FROM jobs_job j USING (SELECT tid FROM conveyor_purge ORDER BY tid) p WHERE j.ctid = p.tid
"""

# Should a row not be where the chunk found it (_DELETE deleted fewer jobs
# than the chunk holds), the rest are deleted by id.
_DELETE_REST = "DELETE FROM jobs_job WHERE id IN (SELECT id FROM conveyor_purge)"


# Jobs per chunk (each with about one attempt and three events). Bigger chunks
# pay each statement's fixed cost fewer times; bench/README.md, "Purge without
# foreign-key triggers", has the measurements.
CHUNK = 20_000


# Every statement of a chunk finds its rows by the chunk's ids, one index probe
# each: nested loops, whose cost grows with the chunk. A hash join reads the
# whole of jobs, attempts and events once per chunk instead, which the planner
# prefers on a small table but which grows with the history: 1.6 s against
# 0.7 s for 20,000 jobs at 500,000, and worse the longer the history. A
# sequential scan with a memoized probe of the chunk is the same mistake in a
# nested loop: the chunk's table is not analyzed, so the planner sizes it by
# its pages and, from a chunk about a tenth of the history, took it or the
# probes from run to run. Sequential scans are off too (the chunk's own table
# is read through its primary key instead, in the same id order).
_CHUNK_SETTINGS = (
    "SET LOCAL synchronous_commit = off",  # a chunk lost in a crash is purged again next time
    "SET LOCAL enable_hashjoin = off",
    "SET LOCAL enable_mergejoin = off",
    "SET LOCAL enable_seqscan = off",
)


def purge_finished(
    *, older_than_days: int | None = None, dead_older_than_days: int | None = None, chunk: int = CHUNK
) -> dict:
    """Delete finished jobs (with their attempts and events) and job-less events
    older than the cutoffs, in chunks so no transaction grows large. Returns
    {"jobs": n, "events": n, "by_state": {state: n}}. Call it outside a
    transaction: each chunk commits on its own, and a caller's transaction
    would keep the chunk's settings (_CHUNK_SETTINGS) to its end."""
    conveyor = settings.CONVEYOR
    now = timezone.now()
    cutoff = now - timedelta(days=conveyor["RETENTION_DAYS"] if older_than_days is None else older_than_days)
    dead_days = conveyor["DEAD_RETENTION_DAYS"] if dead_older_than_days is None else dead_older_than_days
    dead_cutoff = now - timedelta(days=dead_days)
    params = {
        "after": now - timedelta(days=100 * 365),
        "horizon": max(cutoff, dead_cutoff),
        "cutoff": cutoff,
        "dead_cutoff": dead_cutoff,
        "chunk": chunk,
    }
    by_state: Counter[str] = Counter()
    with connection.cursor() as cursor:
        cursor.execute(_CHUNK_TABLE)
    while True:
        with transaction.atomic(), connection.cursor() as cursor:
            for setting in _CHUNK_SETTINGS:
                cursor.execute(setting)
            cursor.execute(_DUE, params)
            counts = cursor.fetchall()
            if not counts:
                break
            # Not analyzed: the planner sizes the table by its pages, and with
            # hash and merge joins off it probes the indexes whatever the count.
            for statement in _BEFORE:
                cursor.execute(statement)
            cursor.execute(_DELETE)
            if cursor.rowcount < sum(n for _, n, _ in counts):
                cursor.execute(_DELETE_REST)
        by_state.update({state: n for state, n, _ in counts})
        # Rows deleted are gone, so ">=" the last one rereads only its ties.
        params["after"] = max(last for _, _, last in counts)
    orphan_events, _ = JobEvent.objects.filter(job__isnull=True, created_at__lt=cutoff).delete()
    # In the order of the lifecycle, for a stable report.
    ordered = {state.value: by_state[state] for state in FINISHED_STATES if by_state[state]}
    return {"jobs": sum(by_state.values()), "events": orphan_events, "by_state": ordered}
