"""Operator actions on finished and failing jobs: cancel, retry, discard.

Each is a transition through `jobs.engine.states`, so two operators acting on one job
at once act once.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import connection, transaction

from jobs.db import events
from jobs.djangoq import broker
from jobs.engine import dependencies
from jobs.engine.states import Sql, transition
from jobs.errors import InvalidState, JobNotFound
from jobs.models import Job, State

RETRYABLE = frozenset({State.DEAD, State.CANCELLED})


def _get(job_id: UUID | str) -> Job:
    try:
        return Job.objects.get(id=job_id)
    except (Job.DoesNotExist, ValidationError, ValueError, TypeError):
        raise JobNotFound(f"no job with id {job_id}") from None


def cancel_job(job_id: UUID | str, *, actor: str = "") -> Job:
    """Cancel a waiting job at once; ask a running one to stop at its next check.

    Raises JobNotFound, or InvalidState when the job has already finished.
    """
    job = _get(job_id)
    data = {"actor": actor} if actor else None
    with transaction.atomic():
        cancelled = transition(
            job.id,
            target=State.CANCELLED,
            source=frozenset({State.WAITING, State.QUEUED, State.SCHEDULED, State.RETRYING}),
            event_data=data,
            finished_at=Sql("now()"),
        )
        if cancelled:
            return cancelled
        # Not a transition: the state stays `running` until the handler stops.
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE jobs_job SET cancel_requested_at = now(), updated_at = now() "
                "WHERE id = %s AND state = 'running' AND cancel_requested_at IS NULL RETURNING queue",
                [str(job.id)],
            )
            row = cursor.fetchone()
        if row:
            events.record(job.id, "job.cancel_requested", data or {}, queue=row[0])
    job.refresh_from_db()
    if job.state != State.RUNNING:
        raise InvalidState(
            f"job {job.id} is {job.state}; only waiting, queued, scheduled, retrying or running jobs can be cancelled"
        )
    return job


def retry_job(job_id: UUID | str, *, actor: str = "") -> Job:
    """Queue a dead or cancelled job again, its attempts counted anew (history kept).

    Raises JobNotFound, or InvalidState when the job is in another state (for
    instance because another operator retried it first).
    """
    job = _get(job_id)
    retried = _requeue(job.id, actor=actor)
    if retried is None:
        job.refresh_from_db()
        raise InvalidState(f"job {job.id} is {job.state}; only dead or cancelled jobs can be retried")
    return retried


def discard_job(job_id: UUID | str, *, actor: str = "") -> Job:
    """Remove a dead job from the dead-letter queue (it stays in history as discarded)."""
    job = _get(job_id)
    discarded = transition(job.id, target=State.DISCARDED, event_data={"actor": actor} if actor else None)
    if discarded is None:
        job.refresh_from_db()
        raise InvalidState(f"job {job.id} is {job.state}; only dead jobs can be discarded")
    return discarded


def retry_jobs(*, ids: list[UUID | str] | None = None, actor: str = "", **filters: Any) -> int:
    """Retry dead jobs by id or by filter (queue, kind, error_type); returns how many moved."""
    return sum(
        _requeue(job_id, actor=actor) is not None
        for job_id in _select(ids, RETRYABLE if ids else {State.DEAD}, filters)
    )


def discard_jobs(*, ids: list[UUID | str] | None = None, actor: str = "", **filters: Any) -> int:
    """Discard dead jobs by id or by filter (queue, kind, error_type); returns how many moved."""
    moved = 0
    for job_id in _select(ids, {State.DEAD}, filters):
        moved += transition(job_id, target=State.DISCARDED, event_data={"actor": actor} if actor else None) is not None
    return moved


def _select(ids, states, filters) -> list[UUID]:
    allowed = {"queue", "kind", "error_type"}
    unknown = set(filters) - allowed
    if unknown:
        raise ValueError(f"unknown filter {sorted(unknown)}; use {sorted(allowed)}")
    query = Job.objects.filter(state__in=states, **{k: v for k, v in filters.items() if v})
    if ids is not None:
        query = query.filter(id__in=ids)
    return list(query.values_list("id", flat=True))


def _requeue(job_id: UUID | str, *, actor: str) -> Job | None:
    """dead/cancelled -> queued, attempts counted anew; a cancelled job whose
    dependencies have not all finished goes back to `waiting` instead
    (jobs.engine.dependencies queues it when they have)."""
    fresh = {
        "attempts": 0,
        "finished_at": None,
        "cancel_requested_at": None,
        "progress_percent": 0,
        "progress_message": "",
        "result": None,
        "error_type": "",
        "error_message": "",
        "error_traceback": "",
        "lease_owner": "",
        "lease_expires_at": None,
    }
    event_data = {"reason": "retry", "actor": actor}
    with transaction.atomic():
        job = transition(
            job_id,
            target=State.QUEUED,
            source=frozenset(RETRYABLE),
            where=Sql("pending_dependencies = 0"),
            event_data=event_data,
            # Runnable from now: queue_stats measures its wait from here, not
            # from when the job was first created.
            run_after=Sql("now()"),
            **fresh,
        )
        if job is not None:
            broker.enqueue(job.id, queue=job.queue, timeout=job.timeout, priority=job.priority)
        else:
            job = transition(
                job_id,
                target=State.WAITING,
                source=frozenset({State.CANCELLED}),
                where=Sql("pending_dependencies > 0"),
                event_data=event_data,
                **fresh,
            )
        if job is not None and job.has_dependents:  # the dependents it cancelled wait for it again
            dependencies.rearm(job.id)
        return job
