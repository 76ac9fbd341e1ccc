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

import json
from typing import Any
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from jobs.db import events, sql
from jobs.db.sql import Sql
from jobs.djangoq import broker
from jobs.engine import hooks
from jobs.models import Job, State

Q, S, R, T = State.QUEUED, State.SCHEDULED, State.RUNNING, State.RETRYING
OK, DEAD, CXL, DIS = State.SUCCEEDED, State.DEAD, State.CANCELLED, State.DISCARDED

# target state -> the states it may be entered from. `scheduled` has no entry:
# only submission creates scheduled jobs.
# A due `retrying` or `scheduled` job is claimed directly (the "due" step of
# docs/ARCHITECTURE.md's picture is folded into the claim's `run_after <= now()` test).
ALLOWED: dict[State, frozenset[State]] = {
    R: frozenset({Q, S, T}),
    OK: frozenset({R}),
    T: frozenset({R}),
    DEAD: frozenset({R}),
    CXL: frozenset({Q, S, T, R}),
    Q: frozenset({DEAD, CXL}),
    DIS: frozenset({DEAD}),
}


# What a transition does to the attempt rows, in the same statement. `j` is
# the updated job row.
OPEN_ATTEMPT = Sql(
    "INSERT INTO jobs_attempt (job_id, number, worker, started_at, outcome, error_type, error_message, traceback, output) "
    "SELECT id, attempts, lease_owner, started_at, '', '', '', '', '' FROM j"
)


def close_attempt(
    outcome: str, *, error_type: str = "", message: str = "", tb: str = "", output: str | None = None
) -> Sql:
    """End the job's open attempt; `output` (streamed text) is kept when given."""
    return Sql(
        "UPDATE jobs_attempt SET finished_at = now(), outcome = %s, error_type = %s, error_message = %s,"
        " traceback = %s, output = coalesce(%s, output) WHERE job_id = (SELECT id FROM j) AND finished_at IS NULL",
        outcome,
        error_type[:200],
        message,
        tb,
        output,
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
    **fields: Any,
) -> Job | None:
    """Move a job from any of `source` to `target`, log the event and apply
    `attempt` (OPEN_ATTEMPT or close_attempt(...)) in one statement.

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
    # parameter, a tenth of a worker's time per job.
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
