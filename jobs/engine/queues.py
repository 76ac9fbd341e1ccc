"""Operator controls of a queue: pause and resume, and a limit on how many of
its jobs run at once across every cluster and host.

Both live in Postgres (`jobs_queuecontrol`) and every claim reads them in its
own statement, so a change holds on every cluster from the next claim on:

- the broker's claim (`jobs.djangoq.broker`) delivers no row of a paused
  queue, and no more rows of a limited queue than it has free places;
- the job's claim (`jobs.worker.claims.claim`, and the chain's and lane's
  `jobs.engine.states.claim_ready`) refuses a job of a paused queue, and takes
  one of a limited queue's places (`jobs_queueslot`) in the claim's statement,
  or refuses it when none is free. A refused delivery's broker row comes back
  a second later (`jobs.worker.runner`).

For a queue without a row (the usual case) a claim costs one primary-key probe
of a small table. Resuming (or raising a limit) makes the queue's waiting rows
visible at once and wakes its clusters (NOTIFY on the broker's channel).

A place is held while its job runs under a live lease. It frees itself when
the job leaves `running` (finished, retrying, given back) or its lease
expires (a dead worker), with no sweep: `SLOT_FREE`.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection, transaction

from jobs.db.sql import Sql
from jobs.djangoq import broker
from jobs.models import QueueControl

# A place is free unless its job runs under a live lease, or still waits
# unchanged since the place was taken. The second half is what makes it safe
# under concurrent claims: a claim that re-checks a place another claim took a
# moment ago reads that job as it was before (its statement's snapshot):
# waiting, unchanged since -> held.
SLOT_FREE = (
    "(s.job_id IS NULL OR NOT EXISTS (SELECT 1 FROM jobs_job h WHERE h.id = s.job_id"
    " AND ((h.state = 'running' AND h.lease_expires_at > now())"
    " OR (h.state IN ('queued', 'scheduled', 'retrying') AND h.updated_at <= s.taken_at))))"
)

MAX_NAME = 100
# The most places a limit may give (one jobs_queueslot row each).
MAX_RUNNING = 10_000


class QueueError(ValueError):
    """A control that cannot be applied (bad name or limit); `field` names the input."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Control:
    name: str
    paused: bool
    max_running: int | None


def claim_gate(queue_sql: str) -> tuple[str, str]:
    """CTEs `qc` (the queue's control) and `qs` (up to {limit} free places,
    locked), for a claim of jobs of the queue `queue_sql` (SQL taking one
    parameter per use); and the CTE `qt` that gives the places to the claimed
    jobs (`qt` needs a CTE `jn(id, k)`: claimed job ids numbered from 1).
    The caller formats `{limit}`."""
    before = (
        f"qc AS (SELECT paused, max_running FROM jobs_queuecontrol WHERE name = {queue_sql}),"
        f" qs AS (SELECT s.id FROM jobs_queueslot s, qc WHERE s.queue = {queue_sql}"
        f" AND s.slot < qc.max_running AND {SLOT_FREE} ORDER BY s.slot LIMIT {{limit}} FOR UPDATE OF s SKIP LOCKED),"
        " qsn AS (SELECT id, row_number() OVER (ORDER BY id) AS n FROM qs)"
    )
    after = (
        "qt AS (UPDATE jobs_queueslot SET job_id = jn.id, taken_at = now()"
        " FROM jn JOIN qsn ON qsn.n = jn.k WHERE jobs_queueslot.id = qsn.id)"
    )
    return before, after


# The condition a claim adds for its jobs' queue: not paused, and a place free
# if limited (for the rank-th job of the claim).
NOT_PAUSED = "NOT EXISTS (SELECT 1 FROM qc WHERE paused)"
UNLIMITED_OR_PLACE = (
    "(NOT EXISTS (SELECT 1 FROM qc WHERE max_running IS NOT NULL) OR {rank} <= (SELECT count(*) FROM qsn))"
)


def single_claim(job_id: str) -> tuple[Sql, Sql, Sql]:
    """For `transition`'s claim of one job: (CTEs before `j`, the condition on
    `j`, the CTEs after it)."""
    queue = "(SELECT queue FROM jobs_job WHERE id = %s)"
    before, after = claim_gate(queue)
    return (
        Sql(before.format(limit=1), job_id, job_id),
        Sql(f"{NOT_PAUSED} AND {UNLIMITED_OR_PLACE.format(rank=1)}"),
        Sql("jn AS (SELECT id, 1 AS k FROM j), " + after),
    )


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not 1 <= len(name) <= MAX_NAME or any(c.isspace() for c in name):
        raise QueueError(f"a queue name is 1-{MAX_NAME} characters without spaces", field="name")
    return name


def get_controls() -> dict[str, Control]:
    return {c.name: Control(c.name, c.paused, c.max_running) for c in QueueControl.objects.all()}


def get_control(name: str) -> Control:
    control = QueueControl.objects.filter(name=name).first()
    if control is None:
        return Control(name, False, None)
    return Control(control.name, control.paused, control.max_running)


_SET = """
INSERT INTO jobs_queuecontrol (name, paused, max_running, updated_at) VALUES (%s, %s, %s, now())
ON CONFLICT (name) DO UPDATE SET {columns}, updated_at = now()
RETURNING paused, max_running
"""

# The waiting jobs' broker rows visible now, and a wake-up for the queue's clusters.
_WAKE = f"""
WITH w AS (
    UPDATE django_q_ormq SET lock = now() WHERE key = %s AND lock > now() AND job_id IN (
        SELECT id FROM jobs_job WHERE queue = %s AND state IN ('queued', 'scheduled', 'retrying')
        AND (run_after IS NULL OR run_after <= now()))
    RETURNING 1
)
SELECT (SELECT count(*) FROM w), pg_notify('{broker.CHANNEL}', %s)
"""

_SLOTS = """
INSERT INTO jobs_queueslot (queue, slot, job_id, taken_at)
SELECT %s, n, NULL, NULL FROM generate_series(0, %s - 1) AS n
ON CONFLICT (queue, slot) DO NOTHING
"""


def _set(name: str, *, paused: bool | None = None, max_running: int | None | object = ...) -> Control:
    name = _check_name(name)
    columns = []
    if paused is not None:
        columns.append("paused = EXCLUDED.paused")
    if max_running is not ...:
        columns.append("max_running = EXCLUDED.max_running")
    limit = None if max_running is ... else max_running
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_SET.format(columns=", ".join(columns)), [name, bool(paused), limit])
        now_paused, now_limit = cursor.fetchone()
        if now_limit is not None:
            cursor.execute(_SLOTS, [name, now_limit])
        if not now_paused:
            key = broker.cluster_for_queue(name)
            cursor.execute(_WAKE, [key, name, key])
    return Control(name, now_paused, now_limit)


def pause_queue(name: str) -> Control:
    """Claim nothing more of `name` (its running jobs finish; submissions wait)."""
    return _set(name, paused=True)


def resume_queue(name: str) -> Control:
    """Claim `name`'s jobs again; its waiting jobs are picked up at once."""
    return _set(name, paused=False)


def set_max_running(name: str, max_running: int | None) -> Control:
    """At most `max_running` jobs of `name` running at once (None: no limit)."""
    if max_running is not None and (
        isinstance(max_running, bool) or not isinstance(max_running, int) or not 1 <= max_running <= MAX_RUNNING
    ):
        raise QueueError(f"max_running must be an integer from 1 to {MAX_RUNNING:,}, or null", field="max_running")
    return _set(name, max_running=max_running)
