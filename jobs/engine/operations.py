"""Operator actions on many jobs: cancel by selection, by filter or a whole
batch; retry by filter; run a waiting job now.

A selection is a list of ids or a filter (`state`, `kind`, `queue`, `batch`,
`since`: jobs whose last change is at or after that time), always limited to
`owner` when given (an API key's own jobs). The moves themselves are
`jobs.engine.states`' set-based statements.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from jobs.engine import states
from jobs.engine.batches import get_batch
from jobs.engine.states import Sql
from jobs.errors import InvalidState, JobNotFound
from jobs.models import Batch, Job, State

FILTERS = ("state", "kind", "queue", "batch", "since")
MAX_IDS = 10_000


@dataclass(frozen=True)
class Selection:
    ids: list[UUID] | None = None
    state: str | None = None
    kind: str | None = None
    queue: str | None = None
    batch: UUID | None = None
    since: datetime | None = None
    owner: str | None = None

    def where(self) -> Sql:
        """The selection as SQL over jobs_job."""
        parts, params = [], []
        if self.ids is not None:
            parts.append("id = ANY(%s::uuid[])")
            params.append([str(i) for i in self.ids])
        for column, value in (("state", self.state), ("kind", self.kind), ("queue", self.queue)):
            if value:
                parts.append(f"{column} = %s")
                params.append(value)
        if self.batch is not None:
            parts.append("batch_id = %s")
            params.append(str(self.batch))
        if self.since is not None:
            parts.append("updated_at >= %s")
            params.append(self.since)
        if self.owner is not None:
            parts.append("owner = %s")
            params.append(self.owner)
        return Sql(" AND ".join(parts) or "true", *params)


def _check(selection: Selection) -> None:
    if selection.state is not None and selection.state not in State.values:
        raise ValueError(f"unknown state {selection.state!r}; states are {', '.join(State.values)}")
    if selection.ids is not None and len(selection.ids) > MAX_IDS:
        raise ValueError(f"at most {MAX_IDS} ids at once")


def count_matching(selection: Selection, *, states_in: frozenset[State]) -> int:
    """How many jobs of `states_in` the selection names (the count a confirmation shows)."""
    _check(selection)
    where = selection.where()
    return Job.objects.extra(where=[where.expression], params=where.params).filter(state__in=states_in).count()


def cancel_matching(selection: Selection, *, actor: str = "") -> int:
    """Cancel the waiting jobs the selection names, ask its running ones to stop; how many."""
    _check(selection)
    return states.cancel_many(selection.where(), actor=actor)


def retry_matching(selection: Selection, *, actor: str = "") -> int:
    """Queue again the dead jobs the selection names (by `ids`: cancelled ones too); how many."""
    _check(selection)
    sources = frozenset({State.DEAD, State.CANCELLED}) if selection.ids is not None else frozenset({State.DEAD})
    if selection.state is not None:
        sources &= {State(selection.state)}
    if not sources:
        return 0
    return states.retry_many(selection.where(), sources=sources, actor=actor)


def cancel_batch(batch_id: UUID | str, *, owner: str | None = None, actor: str = "") -> int:
    """Cancel every unfinished job of a batch; raises BatchNotFound for
    another owner's batch (ids do not leak)."""
    batch: Batch = get_batch(batch_id, owner=owner)
    return states.cancel_many(Selection(batch=batch.id).where(), actor=actor)


def run_now(job_id: UUID | str, *, owner: str | None = None, actor: str = "") -> Job:
    """Run a scheduled or retrying job now; raises JobNotFound, or InvalidState
    in any other state."""
    query = Job.objects.all() if owner is None else Job.objects.filter(owner=owner)
    try:
        job = query.get(id=job_id)
    except (Job.DoesNotExist, ValueError):
        raise JobNotFound(f"no job with id {job_id}") from None
    if not states.run_now(job.id, actor=actor):
        job.refresh_from_db()
        raise InvalidState(f"job {job.id} is {job.state}; only scheduled or retrying jobs can be run now")
    job.refresh_from_db()
    return job
