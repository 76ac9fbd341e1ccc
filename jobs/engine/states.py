"""The job state machine: the legal transitions and the only code that changes
a job's state.

Every transition is one conditional `UPDATE … WHERE id = %s AND state IN (…)`:
when two actors race (two workers claiming, an operator cancelling while the
worker finishes), the row lock taken by the first UPDATE makes the second
re-check its WHERE clause against the committed row and match nothing.

The UPDATE, the attempt bookkeeping, the `JobEvent` row and its `pg_notify`
are one SQL statement (data-modifying CTEs), so a transition is atomic even
outside a transaction and costs one round trip on the workers' hot path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from jobs.db import events, sql
from jobs.db.sql import Sql
from jobs.djangoq import broker
from jobs.engine import hooks, queues
from jobs.models import LOG_EVENT, OUTPUT_EVENT, Attempt, Job, State

W, Q, S, R, T = State.WAITING, State.QUEUED, State.SCHEDULED, State.RUNNING, State.RETRYING
OK, DEAD, CXL, DIS = State.SUCCEEDED, State.DEAD, State.CANCELLED, State.DISCARDED

# target state -> the states it may be entered from. `scheduled` has no entry:
# only submission creates scheduled jobs. `waiting` (on dependencies) is
# created by submission; a job cancelled because a dependency failed waits
# again when that dependency is retried (jobs.engine.dependencies).
# A due `retrying` or `scheduled` job is claimed directly (the "due" step of
# docs/ARCHITECTURE.md's picture is folded into the claim's `run_after <= now()` test).
ALLOWED: dict[State, frozenset[State]] = {
    R: frozenset({Q, S, T}),
    OK: frozenset({R}),
    T: frozenset({R}),
    DEAD: frozenset({R}),
    CXL: frozenset({W, Q, S, T, R}),
    Q: frozenset({W, DEAD, CXL}),
    W: frozenset({CXL}),
    DIS: frozenset({DEAD}),
}


# What a transition does to the attempt rows, in the same statement. `j` is
# the updated job row.
OPEN_ATTEMPT = Sql(
    "INSERT INTO jobs_attempt (job_id, number, worker, started_at, outcome, error_type, error_message, traceback, output, logs) "
    "SELECT id, attempts, lease_owner, started_at, '', '', '', '', '', '' FROM j"
)


def close_attempt(
    outcome: str,
    *,
    error_type: str = "",
    message: str = "",
    tb: str = "",
    output: str | None = None,
    logs: str | None = None,
) -> Sql:
    """End the job's open attempt; `output` (streamed text) and `logs` (its
    log lines) are kept when given."""
    return Sql(
        "UPDATE jobs_attempt SET finished_at = now(), outcome = %s, error_type = %s, error_message = %s,"
        " traceback = %s, output = coalesce(%s, output), logs = coalesce(%s, logs)"
        " WHERE job_id = (SELECT id FROM j) AND finished_at IS NULL",
        outcome,
        error_type[:200],
        message,
        tb,
        output,
        logs,
    )


def state_literals(states: frozenset[State]) -> str:
    # State values are fixed identifiers ([a-z]+), safe to inline.
    return ", ".join(f"'{state.value}'" for state in sorted(states))


def is_allowed(source: State, target: State) -> bool:
    return source in ALLOWED.get(target, frozenset())


def transition(
    job_id: UUID | str,
    *,
    target: State,
    source: frozenset[State] | None = None,
    where: Sql | None = None,
    event: str | None = None,
    event_data: dict[str, Any] | None = None,
    attempt: Sql | None = None,
    watchdog: Sql | None = None,
    ack: int | None = None,
    around: tuple[Sql, Sql] | None = None,
    **fields: Any,
) -> Job | None:
    """Move a job from any of `source` to `target`, log the event and apply
    `attempt` (OPEN_ATTEMPT or close_attempt(...)) in one statement.
    `around`: CTEs written before and after the job's `j` (a claim's queue
    gate, `jobs.engine.queues.single_claim`).

    Returns the updated job, or None when the job was not in a source state
    (or did not match `where`): another actor won.
    """
    allowed = ALLOWED.get(target, frozenset())
    source = allowed if source is None else source
    if not source <= allowed:
        raise ValueError(f"illegal transition {sorted(source - allowed)} -> {target}")
    if not source:
        return None

    # What a finish hook does (webhook messages, jobs.webhooks.messages) commits
    # with the change. Outside a transaction the job moves in one statement, as
    # always, if no hook needs to hear of its row; if one does (or another actor
    # won), it moves inside a transaction instead.
    quiet = None
    if target in hooks.finish_states() and not connection.in_atomic_block:

        def in_transaction() -> Job | None:
            with transaction.atomic():
                return transition(
                    job_id,
                    target=target,
                    source=source,
                    where=where,
                    event=event,
                    event_data=event_data,
                    attempt=attempt,
                    ack=ack,
                    **fields,
                )

        quiet = hooks.quiet_condition(target)
        if quiet is None:
            return in_transaction()

    sets = ["state = %s", "updated_at = now()"]
    params: list[Any] = [target.value]
    db = connections[DEFAULT_DB_ALIAS]  # the proxy `connection` costs a lookup per attribute
    for name, value in fields.items():
        field = Job._meta.get_field(name)
        if isinstance(value, Sql):
            sets.append(f"{field.column} = {value.expression}")
            params.extend(value.params)
        else:
            sets.append(f"{field.column} = %s")
            params.append(field.get_db_prep_save(value, db))
    # The states as literals: psycopg builds a list dumper for every array
    # parameter, a visible cost on the workers' hot path.
    condition = f"id = %s AND state IN ({state_literals(source)})"
    params.append(str(job_id))
    if where is not None:
        condition += f" AND ({where.expression})"
        params += where.params
    if quiet is not None:
        condition += f" AND ({quiet.expression})"
        params += quiet.params

    event_type = event or f"job.{target.value}"
    columns = sql.job_columns()[0]
    parts = [f"WITH j AS (UPDATE jobs_job SET {', '.join(sets)} WHERE {condition} RETURNING {columns})"]
    if around is not None:
        parts[0] = f"WITH {around[0].expression}, " + parts[0][len("WITH ") :]
        params = [*around[0].params, *params]
        parts.append(f", {around[1].expression}")
        params += around[1].params
    if attempt is not None:
        parts.append(f", a AS ({attempt.expression})")
        params += attempt.params
    if ack is not None:  # the Django-Q2 delivery being finished: its broker row goes with it
        parts.append(", d AS (DELETE FROM django_q_ormq WHERE id = %s)")
        params.append(ack)
    if watchdog is not None:  # a broker row armed with the claim; its id comes back as job.watchdog_id
        parts.append(f", w AS ({watchdog.expression})")
        params += watchdog.params
    parts.append(events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts) || %s::jsonb"))
    parts.append(f" SELECT {columns}" + (", (SELECT min(id) FROM w)" if watchdog is not None else ""))
    parts.append(" FROM j, (SELECT count(*) FROM n) AS notified")
    params += [event_type, json.dumps(event_data or {}), event_type]
    # A prepared statement: the text is the same for every call of one kind
    # (a claim, a success, ...), only the parameters change.
    row = sql.fetchone(" ".join(parts), params)
    job = None
    if row is not None:
        job = sql.job_from_row(row)
        if watchdog is not None:
            job.watchdog_id = row[-1]
    if quiet is not None:
        return job or in_transaction()
    if job is not None and target in hooks.finish_states():
        hooks.job_finished(job)
    return job


def resume_waiting(*, batch_id: UUID | str, error_type: str, reason: str) -> int:
    """Make a batch's `retrying` jobs that wait on `error_type` (a spent token budget)
    due now: one UPDATE (run_after, its events and notifications), then a broker row
    for each, in one transaction. Not a change of state, so no transition: the jobs
    stay `retrying` and the claim moves them on. Returns how many were woken."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "WITH j AS (UPDATE jobs_job SET run_after = now(), updated_at = now()"
            " WHERE batch_id = %s AND state = 'retrying' AND error_type = %s"
            " RETURNING id, queue, timeout, priority)"
            + events.ctes()
            + " SELECT j.id, j.queue, j.timeout, j.priority FROM j, (SELECT count(*) FROM n) AS notified",
            [str(batch_id), error_type, "job.resumed", json.dumps({"reason": reason}), "job.resumed"],
        )
        woken = cursor.fetchall()
        for job_id, queue, timeout, priority in woken:
            broker.enqueue(job_id, queue=queue, timeout=timeout, priority=priority)
    return len(woken)


# --- batched transitions of the worker ---------------------------------------
#
# The worker's chain and lane claim, finish and give back many jobs in one
# statement each. They are the same changes as `transition`'s, written for
# many rows (and with the broker rows they go with), and live here so that a
# job's state changes nowhere else.


class QuietSuccess(NamedTuple):
    """A job that succeeded, to be recorded in a batch: `began` and `took`
    are the seconds from its claim's answer to its handler's start and end;
    `row`, its broker row; `dependents`, whether it had dependents when it
    was claimed (`has_dependents`)."""

    job_id: UUID
    result: Any
    began: float
    took: float
    row: int
    dependents: bool = False


def claim_ready(
    key: str,
    worker: str,
    limit: int,
    kinds: Sequence[str],
    *,
    lease_seconds: float,
    rearm: Sql,
    max_timeout: int | None = None,
    succeeded: Sequence[QuietSuccess] = (),
    floor: datetime | None = None,
) -> tuple[list[tuple], set[UUID]]:
    """Many claims (ready -> running, as `transition` makes one) in one
    statement: up to `limit` ready jobs of `kinds` through their visible broker
    rows of `key`, in the broker's order (priority, then FIFO), for `worker`
    with a lease of `lease_seconds`. Returns the rows of `job_columns()` plus
    the lock its broker row had (when it became ready) and the id of that row,
    whose lock is set to `rearm` (SQL over the claimed row `j`). `floor`: scan
    only rows whose lock is at least this (`jobs.djangoq.broker.ClaimFloor`).

    `succeeded`: in the same statement, move these jobs running -> succeeded
    (`_quiet_successes`); the ids of those it moved come back second. When
    one of them had dependents, the statement runs in a transaction that
    then tells the finish hooks of them all at once (`hooks.jobs_finished`:
    the workflows resolve the batch's edges and count down its dependents in
    one more statement, and queue those whose last dependency this was), so
    a job with a dependent keeps the batched path."""
    in_batch = any(item.dependents for item in succeeded)
    columns = sql.job_columns()[0]
    names = columns.split(", ")
    qualified = ", ".join(f"jobs_job.{column}" for column in names)
    ready = state_literals(ALLOWED[State.RUNNING])
    parts, params = ["WITH "], []
    if succeeded:
        finishing, finish_params = _quiet_successes(succeeded, worker, in_batch=in_batch)
        parts.append(finishing + ", ")
        params += finish_params
    # The queue's gate (jobs.engine.queues): nothing while paused, no more
    # jobs than free places while limited; the places go to the claimed jobs.
    gate_before, gate_after = queues.claim_gate("%s")
    parts.append(gate_before.format(limit=int(limit)) + ", ")
    params += [key, key, key, *([floor] if floor is not None else []), worker, lease_seconds]
    within = ""
    if max_timeout is not None:
        within = " AND jobs_job.timeout <= %s"
        # once in `pn`, once in `j`; the key, worker and lease go between
        params[-2:-2] = [max_timeout]
        params.append(max_timeout)
    params += rearm.params
    # The limit is part of the text (one prepared statement per limit): bound
    # as a parameter, the generic plan expects 100 rows and joins them back to
    # jobs_job and django_q_ormq by sequential scans, so Postgres planned a
    # custom plan each time instead, which took longer than the claim itself.
    parts.append(
        "picked AS (SELECT id AS row_id, job_id, lock AS ready_at, priority AS row_priority FROM django_q_ormq"
        f" WHERE key = %s AND {'lock >= %s AND ' if floor is not None else ''}lock <= now()"
        f" AND job_id IS NOT NULL AND {queues.NOT_PAUSED}"
        f" ORDER BY priority DESC, lock, id LIMIT {int(limit)} FOR UPDATE SKIP LOCKED),"
        # Ranked among the claimable ones only: a place is for a job that will run.
        " pn AS (SELECT picked.*, row_number() OVER (ORDER BY row_priority DESC, ready_at, row_id) AS rank"
        " FROM picked JOIN jobs_job ON jobs_job.id = picked.job_id"
        f" WHERE {sql.by_id('jobs_job.state')} IN ({ready})"
        " AND (jobs_job.run_after IS NULL OR jobs_job.run_after <= now())"
        f" AND jobs_job.kind IN ({sql.literals(tuple(kinds))}){within}),"
        " j AS (UPDATE jobs_job SET state = 'running', updated_at = now(), attempts = attempts + 1,"
        " lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s), started_at = now(),"
        " cancel_requested_at = NULL FROM pn AS picked WHERE jobs_job.id = picked.job_id"
        f" AND {sql.by_id('jobs_job.state')} IN ({ready})"
        " AND (jobs_job.run_after IS NULL OR jobs_job.run_after <= now())"
        f" AND jobs_job.kind IN ({sql.literals(tuple(kinds))}){within}"
        f" AND {queues.UNLIMITED_OR_PLACE.format(rank='picked.rank')}"
        f" RETURNING {qualified}, picked.ready_at, picked.row_id, picked.rank),"
        f" a AS ({OPEN_ATTEMPT.expression}),"
        " jn AS (SELECT id, row_number() OVER (ORDER BY rank) AS k FROM j),"
        f" {gate_after},"
        f" w AS (UPDATE django_q_ormq SET lock = {rearm.expression} FROM j WHERE django_q_ormq.id = j.row_id)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)")
    )
    params += ["job.started", "job.started"]
    claimed = ", ".join(f"j.{column}" for column in names)
    order = " ORDER BY j.priority DESC, j.ready_at, j.row_id"
    if not succeeded:
        parts.append(f" SELECT {claimed}, j.ready_at, j.row_id FROM j, (SELECT count(*) FROM n) AS notified{order}")
    else:
        # One row even when nothing was claimed: it says which jobs finished.
        parts.append(
            f" SELECT {claimed}, j.ready_at, j.row_id, finished.ids FROM (SELECT array_agg(id) AS ids FROM f) AS finished"
            " LEFT JOIN j ON true, (SELECT count(*) FROM n) AS notified, (SELECT count(*) FROM fn) AS f_notified"
            + order
        )
    with transaction.atomic() if in_batch else contextlib.nullcontext(), sql.cursor() as cursor:
        cursor.execute("".join(parts), params)
        rows = cursor.fetchall()
        if not succeeded:
            return rows, set()
        finished = set(rows[0][-1] or ()) if rows else set()
        if in_batch and finished:
            hooks.jobs_finished(State.SUCCEEDED, sorted(finished))
    return [row[:-1] for row in rows if row[-2] is not None], finished


def _quiet_successes(done: Sequence[QuietSuccess], worker: str, *, in_batch: bool) -> tuple[str, list[Any]]:
    """CTEs (v, f, fa, fd, fe, fn) that move the jobs of `done` running ->
    succeeded as `transition` does (the worker's `finish_succeeded`), and
    delete their broker rows, for the jobs still this worker's that no finish
    hook needs to hear of (`hooks.quiet_condition`), or, `in_batch` (in a
    transaction that calls `hooks.jobs_finished`), that no hook needs to hear
    of one by one (`hooks.batch_condition`).

    Their times are those the worker measured, counted from the claim's
    `started_at`: a batch's successes are written together, after its last
    job, and one statement's now() would give them all the same end. The
    offsets start when the claim's answer arrived, a little after Postgres
    took the claim's now(), so the times are that little early, all by the
    same amount: their order and run times are as measured."""
    # None (a hook may need any row) records none here: the worker then
    # records each through `transition`.
    quiet = (hooks.batch_condition if in_batch else hooks.quiet_condition)(State.SUCCEEDED) or Sql("false")
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
        f" FROM v WHERE jobs_job.id = v.id AND {sql.by_id('jobs_job.state')} = 'running' AND jobs_job.lease_owner = %s"
        f" AND ({quiet.expression}) RETURNING jobs_job.id, jobs_job.queue, jobs_job.state, jobs_job.attempts,"
        " jobs_job.started_at, jobs_job.finished_at, v.row_id),"
        " fa AS (UPDATE jobs_attempt SET started_at = f.started_at, finished_at = f.finished_at,"
        " outcome = 'succeeded', error_type = '', error_message = '', traceback = ''"
        " FROM f WHERE jobs_attempt.job_id = f.id AND jobs_attempt.finished_at IS NULL),"
        " fd AS (DELETE FROM django_q_ormq USING f WHERE django_q_ormq.id = f.row_id)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)", source="f", prefix="f")
    )
    params = [
        [item.job_id for item in done],
        [field.get_db_prep_save(item.result, db) for item in done],
        [item.began for item in done],
        [item.took for item in done],
        [item.row for item in done],
        worker,
        *quiet.params,
        "job.succeeded",
        "job.succeeded",
    ]
    return statement, params


class LaneSuccess(NamedTuple):
    """A lane job that succeeded, to be recorded with others (`succeed_many`):
    what `finish_succeeded` records for one job, and whether it had
    dependents when it was claimed. `delta` (from `offset` of the text) and
    `lines` (the `first`-th line of the log on): what it had not yet sent as
    `job.output` and `job.log` events, written with its success."""

    job_id: UUID
    worker: str
    result: Any
    output: str | None = None
    logs: str | None = None
    dependents: bool = False
    offset: int = 0
    delta: str = ""
    lines: tuple[str, ...] = ()
    first: int = 0


def succeed_many(done: Sequence[LaneSuccess]) -> set[UUID]:
    """Move the jobs of `done` running -> succeeded in one statement, each as
    `transition` does for the worker's `finish_succeeded` (result, progress
    100, lease and error cleared, its open attempt closed with its output and
    logs, a `job.succeeded` event and its notification; ahead of that event,
    the `job.output` and `job.log` events of what it had not sent), for those still
    their worker's (state running, lease owner theirs) that no finish hook
    needs to hear of one by one. When one of them had dependents, it runs in a
    transaction that then tells the hooks of them all at once
    (`hooks.jobs_finished`), as the chain's batch does. Returns the ids it
    moved; the caller finishes the others through `transition`."""
    if not done:
        return set()
    in_batch = any(item.dependents for item in done)
    quiet = hooks.batch_condition(State.SUCCEEDED) if in_batch else hooks.quiet_condition(State.SUCCEEDED)
    if quiet is None:
        return set()
    db = connections[DEFAULT_DB_ALIAS]
    field = Job._meta.get_field("result")
    statement = (
        "WITH v AS (SELECT * FROM unnest(%s::uuid[], %s::text[], %s::jsonb[], %s::text[], %s::text[],"
        " %s::int[], %s::text[], %s::jsonb[], %s::int[]) AS v(id, worker, result, output, logs, out_offset, delta,"
        " lines, first)),"
        " f AS (UPDATE jobs_job SET state = 'succeeded', updated_at = now(), result = v.result, progress_percent = 100,"
        " finished_at = now(), lease_owner = '', lease_expires_at = NULL,"
        " error_type = '', error_message = '', error_traceback = ''"
        f" FROM v WHERE jobs_job.id = v.id AND {sql.by_id('jobs_job.state')} = 'running'"
        " AND jobs_job.lease_owner = v.worker"
        f" AND ({quiet.expression}) RETURNING jobs_job.id, jobs_job.queue, jobs_job.state, jobs_job.attempts),"
        " fa AS (UPDATE jobs_attempt SET finished_at = now(), outcome = 'succeeded', error_type = '',"
        " error_message = '', traceback = '', output = coalesce(v.output, jobs_attempt.output),"
        " logs = coalesce(v.logs, jobs_attempt.logs)"
        " FROM f JOIN v ON v.id = f.id WHERE jobs_attempt.job_id = f.id AND jobs_attempt.finished_at IS NULL),"
        " fo AS (SELECT f.id, f.queue, f.attempts, v.out_offset, v.delta, v.lines, v.first FROM f JOIN v ON v.id = f.id)"
        + events.ctes(
            data_sql="jsonb_build_object('attempt', fo.attempts, 'offset', fo.out_offset, 'text', fo.delta)",
            when="fo.delta <> ''",
            source="fo",
            prefix="out_",
        )
        + events.ctes(
            data_sql="jsonb_build_object('attempt', fo.attempts, 'first', fo.first, 'lines', fo.lines)",
            when="jsonb_array_length(fo.lines) > 0",
            source="fo",
            prefix="log_",
        )
        # The text and log events get the lower ids: counting their rows
        # first makes them written before the outcome's.
        + events.ctes(
            data_sql="jsonb_build_object('state', state, 'attempts', attempts)",
            when="(SELECT count(*) FROM out_e) + (SELECT count(*) FROM log_e) >= 0",
            source="f",
            prefix="f",
        )
        + " SELECT (SELECT array_agg(id) FROM f), (SELECT count(*) FROM fn), (SELECT count(*) FROM out_n),"
        " (SELECT count(*) FROM log_n)"
    )
    params = [
        [item.job_id for item in done],
        [item.worker for item in done],
        [field.get_db_prep_save(item.result, db) for item in done],
        [item.output or None for item in done],
        [item.logs for item in done],
        [item.offset for item in done],
        [item.delta for item in done],
        [json.dumps(list(item.lines)) for item in done],
        [item.first for item in done],
        *quiet.params,
        OUTPUT_EVENT,
        OUTPUT_EVENT,
        LOG_EVENT,
        LOG_EVENT,
        "job.succeeded",
        "job.succeeded",
    ]
    with transaction.atomic() if in_batch else contextlib.nullcontext():
        finished = set(sql.fetchone(statement, params)[0] or ())
        if in_batch and finished:
            hooks.jobs_finished(State.SUCCEEDED, sorted(finished))
    return finished


# Not a transition of ALLOWED: a claim given back before its job started,
# undone as if it had never been made.
_RELEASE = (
    "WITH r AS (UPDATE jobs_job SET state = 'queued', updated_at = now(), attempts = attempts - 1,"
    " lease_owner = '', lease_expires_at = NULL, started_at = NULL WHERE id = ANY(%s::uuid[])"
    " AND state = 'running' AND lease_owner = %s AND cancel_requested_at IS NULL RETURNING id, queue, state, attempts),"
    " ra AS (DELETE FROM jobs_attempt USING r WHERE jobs_attempt.job_id = r.id AND jobs_attempt.finished_at IS NULL),"
    " rb AS (UPDATE django_q_ormq SET lock = now() FROM r"
    " WHERE django_q_ormq.id = ANY(%s::bigint[]) AND django_q_ormq.job_id = r.id RETURNING django_q_ormq.key),"
    f" rn AS (SELECT pg_notify('{broker.CHANNEL}', key) FROM (SELECT DISTINCT key FROM rb) AS k)"
    + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts, 'reason', 'released')", source="r")
    + " SELECT (SELECT array_agg(id) FROM r), (SELECT count(*) FROM n), (SELECT count(*) FROM rn)"
)


def release_unstarted(jobs: Sequence[tuple[UUID, int]], worker: str) -> None:
    """Give back claimed jobs (job id, broker row) `worker` has not started:
    each is `queued` again as if it had never been claimed (its attempt count
    as before, its open attempt row gone), with a `job.queued` event, and its
    broker row is visible again, with a wake-up for the queue's clusters. A
    job an operator asked to stop meanwhile is cancelled instead: it never
    started."""
    ids = [job_id for job_id, _ in jobs]
    released = set(sql.fetchone(_RELEASE, [ids, worker, [row for _, row in jobs], "job.queued", "job.queued"])[0] or ())
    for job_id, row in jobs:
        if job_id not in released:
            transition(
                job_id,
                target=State.CANCELLED,
                where=Sql("lease_owner = %s AND cancel_requested_at IS NOT NULL", worker),
                ack=row,
                attempt=close_attempt(
                    Attempt.Outcome.CANCELLED, error_type="Cancelled", message="cancelled before it started"
                ),
                finished_at=Sql("now()"),
                lease_owner="",
                lease_expires_at=None,
            )


# --- operator actions on many jobs at once -------------------------------------
#
# Set-based: one statement moves every selected job (with its events, its
# notifications and its broker rows), so 10,000 jobs take one round trip. Only
# jobs a finish hook must hear of one by one (`hooks.quiet_condition`) go
# through `transition`, each in the caller's transaction.

WAITING = frozenset({Q, S, T})


def _cancel_many_sql(selection: Sql, quiet: Sql) -> tuple[str, list[Any]]:
    statement = (
        "WITH j AS (UPDATE jobs_job SET state = 'cancelled', updated_at = now(), finished_at = now()"
        f" WHERE state IN ({state_literals(WAITING)}) AND ({selection.expression}) AND ({quiet.expression})"
        " RETURNING id, queue, state, attempts),"
        # A semi-join the planner hashes (the rows have no index on job_id).
        " d AS (DELETE FROM django_q_ormq WHERE job_id IN (SELECT id FROM j))"
        + _bulk_event_ctes("jsonb_build_object('state', state, 'attempts', attempts) || %s::jsonb")
        + " SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM n)"
    )
    return statement, [*selection.params, *quiet.params]


def _no_nested_loops(cursor) -> None:
    """The CTEs' row counts are unknown to the planner, which guesses one row:
    for this transaction only, prefer hashing to nested loops."""
    cursor.execute("SET LOCAL enable_nestloop = off")


def _bulk_event_ctes(data_sql: str) -> str:
    """`events.ctes` for thousands of rows: the notifications read each job's
    queue through its primary key, not by joining the two CTEs (which the
    planner, guessing one row each, made a quadratic nested loop)."""
    plain = events.ctes(data_sql=data_sql)
    joined = " FROM e JOIN j ON j.id = e.job_id)"
    assert plain.endswith(joined), "events.ctes changed shape"
    return plain[: -len(joined)].replace("j.queue)::text)", "q.queue)::text)") + (
        " FROM e JOIN jobs_job q ON q.id = e.job_id)"
    )


def cancel_many(selection: Sql, *, actor: str = "") -> int:
    """Cancel every waiting job `selection` (SQL over jobs_job) names, and ask
    every running one to stop; returns how many. Their broker rows go with them."""
    data = json.dumps({"actor": actor} if actor else {})
    quiet = hooks.quiet_condition(CXL) if CXL in hooks.finish_states() else Sql("true")
    moved = 0
    with transaction.atomic(), connection.cursor() as cursor:
        _no_nested_loops(cursor)
        if quiet is not None:
            statement, params = _cancel_many_sql(selection, quiet)
            cursor.execute(statement, [*params, "job.cancelled", data, "job.cancelled"])
            moved += cursor.fetchone()[0]
        # Those a hook must hear of, one by one.
        cursor.execute(
            f"SELECT id FROM jobs_job WHERE state IN ({state_literals(WAITING)}) AND ({selection.expression})",
            selection.params,
        )
        for (job_id,) in cursor.fetchall():
            moved += (
                transition(
                    job_id,
                    target=CXL,
                    source=WAITING,
                    event_data={"actor": actor} if actor else None,
                    finished_at=Sql("now()"),
                )
                is not None
            )
        # Not a transition: running jobs stay running until their handler stops.
        cursor.execute(
            "WITH j AS (UPDATE jobs_job SET cancel_requested_at = now(), updated_at = now()"
            f" WHERE state = 'running' AND cancel_requested_at IS NULL AND ({selection.expression})"
            " RETURNING id, queue)"
            + _bulk_event_ctes("%s::jsonb")
            + " SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM n)",
            [*selection.params, "job.cancel_requested", data, "job.cancel_requested"],
        )
        moved += cursor.fetchone()[0]
    return moved


_RETRY_MANY = (
    "WITH j AS (UPDATE jobs_job SET state = 'queued', updated_at = now(), attempts = 0, run_after = now(),"
    " finished_at = NULL, cancel_requested_at = NULL, progress_percent = 0, progress_message = '', result = NULL,"
    " error_type = '', error_message = '', error_traceback = '', lease_owner = '', lease_expires_at = NULL"
    " WHERE id = ANY(%s::uuid[]) AND state IN ({sources}) RETURNING id, queue, state, attempts)"
    "{events} SELECT (SELECT array_agg(id) FROM j), (SELECT count(*) FROM n), now()"
)


def retry_many(selection: Sql, *, sources: frozenset[State], actor: str = "") -> int:
    """Queue again every job of `sources` (dead, cancelled) that `selection`
    names, attempts counted anew, each with its broker row; returns how many.

    As a batch's submission does (`jobs.engine.batches`): a thread signs the
    broker tasks while the jobs' statement runs, and the rows go in by COPY."""
    if not sources <= ALLOWED[Q]:
        raise ValueError(f"illegal transition {sorted(sources - ALLOWED[Q])} -> {Q}")
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id, timeout, queue, priority FROM jobs_job WHERE state IN ({state_literals(sources)})"
            f" AND ({selection.expression})",
            selection.params,
        )
        rows = cursor.fetchall()
        if not rows:
            return 0
        _no_nested_loops(cursor)
        statement = _RETRY_MANY.format(
            sources=state_literals(sources),
            events=_bulk_event_ctes("jsonb_build_object('state', state, 'attempts', attempts) || %s::jsonb"),
        )
        data = json.dumps({"reason": "retry", "actor": actor})
        with ThreadPoolExecutor(max_workers=1) as signer:
            tasks = signer.submit(lambda: [broker.task_package(job_id, timeout) for job_id, timeout, _, _ in rows])
            cursor.execute(statement, [[row[0] for row in rows], "job.queued", data, "job.queued"])
            ids, _, visible_at = cursor.fetchone()  # the rows are visible from the database's now()
            moved = set(ids or ())
            packages = tasks.result()
        keys = set()
        with cursor.copy("COPY django_q_ormq (key, payload, lock, priority, job_id) FROM STDIN") as copy:
            for (job_id, _, queue, priority), package in zip(rows, packages, strict=True):
                if job_id in moved:
                    keys.add(broker.cluster_for_queue(queue))
                    copy.write_row([broker.cluster_for_queue(queue), package, visible_at, priority, job_id])
        cursor.execute("SELECT pg_notify(%s, key) FROM unnest(%s::text[]) AS key", [broker.CHANNEL, sorted(keys)])
    return len(moved)


def run_now(job_id: UUID | str, *, actor: str = "") -> bool:
    """Make a `scheduled` or `retrying` job due now, with a broker row visible
    at once and a wake-up for its clusters. Not a change of state: the claim
    moves it on. False when the job is in another state."""
    columns = "id, queue, state, attempts, priority, run_after"
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT queue, timeout FROM jobs_job WHERE id = %s", [str(job_id)])
        found = cursor.fetchone()
        if found is None:
            return False
        cursor.execute(
            "WITH j AS (UPDATE jobs_job SET run_after = now(), updated_at = now()"
            f" WHERE id = %s AND state IN ({state_literals(frozenset({S, T}))}) RETURNING {columns})"
            + broker.ctes()
            + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts) || %s::jsonb")
            + " SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM n), (SELECT count(*) FROM bn)",
            [
                str(job_id),
                *broker.cte_params(job_id, queue=found[0], timeout=found[1]),
                "job.run_now",
                json.dumps({"actor": actor} if actor else {}),
                "job.run_now",
            ],
        )
        return cursor.fetchone()[0] == 1
