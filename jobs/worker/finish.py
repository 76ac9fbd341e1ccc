"""A job's outcome as the worker records it (succeeded, retrying, dead,
cancelled), and the rescue of running jobs whose lease expired."""

from __future__ import annotations

import logging
import traceback
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.db import transaction
from django.utils import timezone

from jobs.djangoq import broker
from jobs.engine import retries
from jobs.engine.states import Sql, close_attempt, transition
from jobs.models import Attempt, Job, State

log = logging.getLogger(__name__)


def rescue_job(job_id: UUID | str) -> bool:
    """Record the expired attempt of a running job as lost, then retry or dead-letter it."""
    now = timezone.now()
    with transaction.atomic():
        job = (
            Job.objects.select_for_update(skip_locked=True)
            .filter(id=job_id, state=State.RUNNING, lease_expires_at__lte=now)
            .first()
        )
        if job is None:
            return False
        owner = job.lease_owner
        message = f"worker {owner or '?'} stopped renewing its lease (killed, crashed or timed out)"
        lost = close_attempt(Attempt.Outcome.LOST, error_type="WorkerLost", message=message)
        expired = Sql("lease_owner = %s AND lease_expires_at <= now()", owner)
        if job.attempts < job.max_attempts:
            delay = retries.backoff_delay(job.attempts, base=job.backoff_base, maximum=job.backoff_max)
            to_retrying(job, owner_where=expired, delay=delay, error=("WorkerLost", message, ""), attempt=lost)
        else:
            transition(
                job.id, target=State.DEAD, where=expired, attempt=lost, **ended(), **_error("WorkerLost", message, "")
            )
    log.warning("job %s: rescued after its lease expired (%s)", job_id, message)
    return True


def rescue_expired(limit: int = 500) -> int:
    """The periodic sweep (a Django-Q2 schedule): rescue every running job whose
    lease has expired. The broker's redelivery normally gets there first."""
    grace = timezone.now() - timedelta(seconds=1)
    ids = list(Job.objects.filter(state=State.RUNNING, lease_expires_at__lt=grace).values_list("id", flat=True)[:limit])
    return sum(rescue_job(job_id) for job_id in ids)


def _mine(worker: str) -> Sql:
    return Sql("lease_owner = %s", worker)


def ended() -> dict[str, Any]:
    return {"finished_at": Sql("now()"), "lease_owner": "", "lease_expires_at": None}


def _error(error_type: str, message: str, tb: str) -> dict[str, Any]:
    return {"error_type": error_type[:200], "error_message": message, "error_traceback": tb}


def finish_succeeded(
    job: Job, worker: str, result: Any, *, output: str | None = None, logs: str | None = None, ack: int | None = None
) -> None:
    done = transition(
        job.id,
        target=State.SUCCEEDED,
        source=frozenset({State.RUNNING}),
        where=_mine(worker),
        attempt=close_attempt(Attempt.Outcome.SUCCEEDED, output=output or None, logs=logs),
        ack=ack,
        result=result,
        progress_percent=100,
        **ended(),
        **_error("", "", ""),
    )
    if not done:
        log.warning("job %s: finished, but it was no longer ours (lease lost); result dropped", job.id)


def finish_cancelled(job: Job, worker: str, *, logs: str | None = None, ack: int | None = None) -> None:
    transition(
        job.id,
        target=State.CANCELLED,
        where=_mine(worker),
        ack=ack,
        attempt=close_attempt(
            Attempt.Outcome.CANCELLED, error_type="Cancelled", message="cancelled by an operator", logs=logs
        ),
        **ended(),
    )


def finish_failed(
    job: Job,
    worker: str,
    exc: Exception,
    *,
    output: str | None = None,
    logs: str | None = None,
    ack: int | None = None,
) -> None:
    error_type = type(exc).__name__
    message = str(exc) or error_type
    tb = "".join(traceback.format_exception(exc))
    failed = close_attempt(
        Attempt.Outcome.FAILED, error_type=error_type, message=message, tb=tb, output=output or None, logs=logs
    )
    decision = retries.decide(
        exc, attempts=job.attempts, max_attempts=job.max_attempts, base=job.backoff_base, maximum=job.backoff_max
    )
    if decision.retry:
        with transaction.atomic():
            to_retrying(
                job,
                owner_where=_mine(worker),
                delay=decision.delay,
                error=(error_type, message, tb),
                attempt=failed,
                refund_attempt=not decision.count_attempt,
                ack=ack,
            )
    else:
        transition(
            job.id,
            target=State.DEAD,
            where=_mine(worker),
            attempt=failed,
            ack=ack,
            **ended(),
            **_error(error_type, message, tb),
        )


def to_retrying(
    job: Job,
    *,
    owner_where: Sql,
    delay: float,
    error: tuple[str, str, str],
    attempt: Sql,
    refund_attempt: bool = False,
    ack: int | None = None,
) -> Job | None:
    """Call inside a transaction: the retry's broker row commits with it."""
    run_after = timezone.now() + timedelta(seconds=delay)
    fields: dict[str, Any] = {"run_after": run_after, "lease_owner": "", "lease_expires_at": None, **_error(*error)}
    if refund_attempt:
        fields["attempts"] = Sql("GREATEST(attempts - 1, 0)")
    moved = transition(
        job.id,
        target=State.RETRYING,
        where=owner_where,
        attempt=attempt,
        ack=ack,
        event_data={"run_after": run_after.isoformat(), "delay": round(delay, 3), "error_type": error[0]},
        **fields,
    )
    if moved:
        broker.enqueue(job.id, queue=job.queue, timeout=job.timeout, run_at=run_after, priority=job.priority)
    return moved
