"""The job state machine: the legal transitions and the only code that changes
a job's state.

Every transition is one conditional `UPDATE … WHERE id = %s AND state IN (…)`:
when two actors race (two workers claiming, an operator cancelling while the
worker finishes), the row lock taken by the first UPDATE makes the second
re-check its WHERE clause against the committed row and match nothing.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.db import connection, transaction

from jobs import events
from jobs.models import Job, State

Q, S, R, T = State.QUEUED, State.SCHEDULED, State.RUNNING, State.RETRYING
OK, DEAD, CXL, DIS = State.SUCCEEDED, State.DEAD, State.CANCELLED, State.DISCARDED

# target state -> the states it may be entered from.
# A due `retrying` or `scheduled` job is claimed directly (the "due" step of
# DESIGN.md's picture is folded into the claim's `run_after <= now()` test).
ALLOWED: dict[State, frozenset[State]] = {
    R: frozenset({Q, S, T}),
    OK: frozenset({R}),
    T: frozenset({R}),
    DEAD: frozenset({R}),
    CXL: frozenset({Q, S, T, R}),
    Q: frozenset({DEAD, CXL}),
    DIS: frozenset({DEAD}),
}


class Sql:
    """A SET value written as SQL (e.g. `Sql("attempts + 1")`) rather than a parameter."""

    def __init__(self, expression: str, *params: Any) -> None:
        self.expression = expression
        self.params = list(params)


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
    **fields: Any,
) -> Job | None:
    """Move a job from any of `source` to `target` and log the event.

    Returns the updated job, or None when the job was not in a source state
    (or did not match `where`): another actor won.
    """
    allowed = ALLOWED[target]
    source = allowed if source is None else source
    if not source <= allowed:
        raise ValueError(f"illegal transition {sorted(source - allowed)} -> {target}")

    sets = ["state = %s", "updated_at = now()"]
    params: list[Any] = [target.value]
    for name, value in fields.items():
        field = Job._meta.get_field(name)
        if isinstance(value, Sql):
            sets.append(f"{field.column} = {value.expression}")
            params.extend(value.params)
        else:
            sets.append(f"{field.column} = %s")
            params.append(field.get_db_prep_save(value, connection))
    sql = f"UPDATE jobs_job SET {', '.join(sets)} WHERE id = %s AND state = ANY(%s)"
    params += [str(job_id), [s.value for s in source]]
    if where is not None:
        sql += f" AND ({where.expression})"
        params += where.params
    sql += " RETURNING *"

    with transaction.atomic():
        rows = list(Job.objects.raw(sql, params))
        if not rows:
            return None
        job = rows[0]
        events.record(job.id, event or f"job.{target.value}", _event_data(job, event_data), queue=job.queue)
        return job


def _event_data(job: Job, extra: dict[str, Any] | None) -> dict[str, Any]:
    data = {"state": job.state, "attempts": job.attempts}
    if extra:
        data.update(extra)
    return data
