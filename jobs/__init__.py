"""Conveyor's public Python API: everything an app of your own needs to define
and submit job kinds.

    from jobs import handler, Payload, submit, schedule, RetryableError, PermanentError

Django imports this package before the apps are ready, so it imports no
models: `submit` loads the engine when it is called.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from jobs.engine.registry import Payload, handler, schedule
from jobs.errors import PermanentError, RetryableError

if TYPE_CHECKING:
    from jobs.models import Job

__all__ = ["Payload", "PermanentError", "RetryableError", "handler", "schedule", "submit"]

# The owner of jobs submitted from Python (as the CLI's are "cli"): idempotency
# keys are unique per owner.
PYTHON_OWNER = "python"


def submit(
    kind: str,
    payload: Any,
    *,
    queue: str | None = None,
    priority: int = 0,
    run_after: datetime | None = None,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    depends_on: Iterable[Any] = (),
    on_dependency_failure: str = "cancel",
) -> Job:
    """Submit a job of `kind` and return it (its `id` at once), validated as
    the API validates: raises `jobs.errors.InvalidJob` (its `errors` name each
    field) or `IdempotencyKeyReused`. With an idempotency key already used for
    the same request, returns that earlier job.

    The job, its event and its broker row are written on the caller's
    connection in one statement: inside `transaction.atomic()` they commit or
    roll back with the caller's own writes, and no worker sees the job before
    the commit.

    With `depends_on` (job ids) the job is created `waiting` and queued when
    its last dependency finishes; if one ends dead, cancelled or discarded it
    is cancelled (`on_dependency_failure="cancel"`) or runs anyway ("run").
    """
    from jobs.engine.submission import submit_job

    options: dict[str, Any] = {}
    depends_on = list(depends_on)
    if depends_on:
        options["depends_on"] = depends_on
    if on_dependency_failure != "cancel":
        options["on_dependency_failure"] = on_dependency_failure
    return submit_job(
        kind,
        payload,
        queue=queue,
        priority=priority,
        run_after=run_after,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        callback_url=callback_url or "",
        owner=PYTHON_OWNER,
        **options,
    ).job
