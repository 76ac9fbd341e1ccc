"""Claims: of a delivered job, and of many ready jobs at once through their
broker rows (a chain's next batch, the lane's free places)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any
from uuid import UUID

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django_q.conf import Conf

from jobs.db import events, sql
from jobs.djangoq import broker
from jobs.engine import hooks
from jobs.engine.registry import async_kinds, get_handler
from jobs.engine.states import ALLOWED, OPEN_ATTEMPT, Sql, state_literals, transition
from jobs.models import Job, State
from jobs.worker.leases import lease_seconds

if TYPE_CHECKING:
    from jobs.worker.chain import Ran

log = logging.getLogger(__name__)


def claim(job_id: str, worker: str, *, delivery: int | None = None) -> Job | None:
    return transition(
        job_id,
        target=State.RUNNING,
        where=Sql("run_after IS NULL OR run_after <= now()"),
        event="job.started",
        attempt=OPEN_ATTEMPT,
        watchdog=_lane_watchdog(job_id, delivery),
        attempts=Sql("attempts + 1"),
        lease_owner=worker,
        lease_expires_at=Sql("now() + make_interval(secs => %s)", lease_seconds()),
        started_at=Sql("now()"),
        cancel_requested_at=None,
    )


# What a claim does to a job's broker row: an async job's is re-armed as its
# watchdog, due a second after the lease would end (see `_lane_watchdog`); a
# chained job makes it invisible for the broker's visibility timeout, as the
# broker's claim does, and deletes it when it finishes.
AS_WATCHDOG = "j.lease_expires_at + interval '1 second'"


VISIBLE_AGAIN = "now() + make_interval(secs => %s)"


def _lane_watchdog(job_id: str, delivery: int | None) -> Sql | None:
    """For async kinds, the claim also arms the broker row that looks at the
    job again when its lease would end: the worker is done with the delivery at
    hand-off, so this row is what notices a lane process that died. The
    delivery's own row is re-armed when the runner knows it; otherwise a row
    is inserted. (The key is the job's queue: `broker.cluster_for_queue` is
    the identity.)"""
    kinds = async_kinds()
    if not kinds:
        return None
    if delivery is not None:
        return Sql(
            f"UPDATE django_q_ormq SET lock = {AS_WATCHDOG}"
            f" FROM j WHERE django_q_ormq.id = %s AND j.kind IN ({_quoted(tuple(kinds))})"
            " RETURNING django_q_ormq.id",
            delivery,
        )
    return Sql(
        "INSERT INTO django_q_ormq (key, payload, lock, priority, job_id)"
        f" SELECT queue, %s, {AS_WATCHDOG}, 0, id FROM j WHERE kind IN ({_quoted(tuple(kinds))})"
        " RETURNING id",
        broker.task_package(job_id, 60),
    )


def fill_lane(lane, queue: str, worker: str) -> int:
    """Claim more ready jobs of async kinds in `queue` for the lane's free places
    (at most CONVEYOR_LANE_FILL), in one statement, and hand them over; returns
    how many. A backlog of LLM calls then fills the lane at once, instead of
    one Django-Q2 delivery (pusher, task queue, claim) per job.

    The claim goes through the jobs' broker rows: visible rows of the queue
    (those not already on their way to a worker), locked SKIP LOCKED as the
    broker's own claim does, so a row is either delivered or claimed here,
    never both. Each claimed job's row is re-armed as its watchdog, exactly as
    a delivery's row is (see `_lane_watchdog`). Rows without a job id (written
    before the column existed) are left to the broker."""
    most = settings.CONVEYOR["LANE_FILL"]
    kinds = async_kinds()
    room = lane.reserve(most) if most and kinds and not lane.stopping else 0
    if not room:
        return 0
    try:
        rows, _ = claim_ready(broker.cluster_for_queue(queue), worker, room, kinds)
    except DatabaseError as exc:  # nothing was claimed; deliveries carry on as usual
        log.warning("lane: could not claim ready jobs (%s)", exc)
        rows = []
    for row in rows:
        job = sql.job_from_row(row)
        lane.submit(job, get_handler(job.kind), worker, watchdog_id=row[-1], reserved=True)
    lane.unreserve(room - len(rows))
    return len(rows)


def claim_ready(
    key: str,
    worker: str,
    limit: int,
    kinds,
    *,
    rearm: str = AS_WATCHDOG,
    max_timeout: int | None = None,
    finish: list[Ran] | None = None,
) -> tuple[list[tuple], set[UUID]]:
    """The claim of `claim` for up to `limit` ready jobs of `kinds` through
    their visible broker rows of `key`, in the broker's order (priority, then
    FIFO): the rows of `job_columns()` plus the id of each job's broker row,
    set by `rearm`.

    `finish`: in the same statement, record these jobs' successes as
    `finish_succeeded` would, those still this worker's that ask for no
    webhook message (the ids of those it recorded come back second)."""
    columns = sql.job_columns()[0]
    names = columns.split(", ")
    qualified = ", ".join(f"jobs_job.{column}" for column in names)
    ready = state_literals(ALLOWED[State.RUNNING])
    parts, params = ["WITH "], []
    if finish:
        finishing, finish_params = _quiet_successes(finish, worker)
        parts.append(finishing + ", ")
        params += finish_params
    params += [key, worker, lease_seconds()]
    within = ""
    if max_timeout is not None:
        within = " AND jobs_job.timeout <= %s"
        params.append(max_timeout)
    if rearm == VISIBLE_AGAIN:
        params.append(Conf.RETRY)
    # The limit is part of the text (one prepared statement per limit): bound
    # as a parameter, the generic plan expects 100 rows and joins them back to
    # jobs_job and django_q_ormq by sequential scans, so Postgres planned a
    # custom plan each time instead, which took longer than the claim itself.
    parts.append(
        "picked AS (SELECT id AS row_id, job_id, lock AS ready_at FROM django_q_ormq"
        " WHERE key = %s AND lock <= now() AND job_id IS NOT NULL"
        f" ORDER BY priority DESC, lock, id LIMIT {int(limit)} FOR UPDATE SKIP LOCKED),"
        " j AS (UPDATE jobs_job SET state = 'running', updated_at = now(), attempts = attempts + 1,"
        " lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s), started_at = now(),"
        " cancel_requested_at = NULL FROM picked WHERE jobs_job.id = picked.job_id"
        f" AND jobs_job.state IN ({ready}) AND (jobs_job.run_after IS NULL OR jobs_job.run_after <= now())"
        f" AND jobs_job.kind IN ({_quoted(tuple(kinds))}){within}"
        f" RETURNING {qualified}, picked.ready_at, picked.row_id),"
        f" a AS ({OPEN_ATTEMPT.expression}),"
        f" w AS (UPDATE django_q_ormq SET lock = {rearm} FROM j WHERE django_q_ormq.id = j.row_id)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)")
    )
    params += ["job.started", "job.started"]
    claimed = ", ".join(f"j.{column}" for column in names)
    order = " ORDER BY j.priority DESC, j.ready_at, j.row_id"
    if not finish:
        parts.append(f" SELECT {claimed}, j.row_id FROM j, (SELECT count(*) FROM n) AS notified{order}")
    else:
        # One row even when nothing was claimed: it says which jobs finished.
        parts.append(
            f" SELECT {claimed}, j.row_id, finished.ids FROM (SELECT array_agg(id) AS ids FROM f) AS finished"
            " LEFT JOIN j ON true, (SELECT count(*) FROM n) AS notified, (SELECT count(*) FROM fn) AS f_notified"
            + order
        )
    with sql.cursor() as cursor:
        cursor.execute("".join(parts), params)
        rows = cursor.fetchall()
    if not finish:
        return rows, set()
    return [row[:-1] for row in rows if row[-2] is not None], set(rows[0][-1] or ()) if rows else set()


def _quiet_successes(done: list[Ran], worker: str) -> tuple[str, list[Any]]:
    """CTEs (v, f, fa, fd, fe, fn) that record the successes of `done` as
    `finish_succeeded` does, and delete their broker rows, for the jobs still
    this worker's that need no webhook message (`hooks.quiet_condition`).

    Their times are those the worker measured, counted from the claim's
    `started_at`: a batch's successes are written together, after its last
    job, and one statement's now() would give them all the same end. The
    offsets start when the claim's answer arrived, a little after Postgres
    took the claim's now(), so the times are that little early, all by the
    same amount: their order and run times are as measured."""
    quiet = hooks.quiet_condition(State.SUCCEEDED)
    db = connections[DEFAULT_DB_ALIAS]
    field = Job._meta.get_field("result")
    statement = (
        "v AS (SELECT * FROM unnest(%s::uuid[], %s::jsonb[], %s::float8[], %s::float8[], %s::bigint[])"
        " AS v(id, result, began, took, row_id)),"
        " f AS (UPDATE jobs_job SET state = 'succeeded', updated_at = now(), result = v.result, progress_percent = 100,"
        # Never past now() (a clock that jumped), the measured run time kept.
        " started_at = greatest(jobs_job.started_at, least(jobs_job.started_at + make_interval(secs => v.took), now())"
        " - make_interval(secs => v.took - v.began)),"
        " finished_at = least(jobs_job.started_at + make_interval(secs => v.took), now()),"
        " lease_owner = '', lease_expires_at = NULL, error_type = '', error_message = '', error_traceback = ''"
        " FROM v WHERE jobs_job.id = v.id AND jobs_job.state = 'running' AND jobs_job.lease_owner = %s"
        f" AND ({quiet.expression}) RETURNING jobs_job.id, jobs_job.queue, jobs_job.state, jobs_job.attempts,"
        " jobs_job.started_at, jobs_job.finished_at, v.row_id),"
        " fa AS (UPDATE jobs_attempt SET started_at = f.started_at, finished_at = f.finished_at,"
        " outcome = 'succeeded', error_type = '', error_message = '', traceback = ''"
        " FROM f WHERE jobs_attempt.job_id = f.id AND jobs_attempt.finished_at IS NULL),"
        " fd AS (DELETE FROM django_q_ormq USING f WHERE django_q_ormq.id = f.row_id)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)", source="f", prefix="f")
    )
    params = [
        [item.job.id for item in done],
        [field.get_db_prep_save(item.value, db) for item in done],
        [item.began for item in done],
        [item.took for item in done],
        [item.row for item in done],
        worker,
        *quiet.params,
        "job.succeeded",
        "job.succeeded",
    ]
    return statement, params


@functools.cache
def _quoted(kinds: tuple[str, ...]) -> str:
    # Literals rather than an array parameter: psycopg builds a list dumper per
    # array parameter and execution. (standard_conforming_strings is on.)
    return ", ".join("'" + kind.replace("'", "''") + "'" for kind in kinds)
