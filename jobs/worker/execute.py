"""Running one claimed job's handler under its lease, and recording its outcome."""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any
from uuid import UUID

from django.db import DatabaseError

from config.logs import job_log_context
from jobs.db.durability import handler_writes, relax_commit_durability
from jobs.djangoq import broker
from jobs.errors import Cancelled, LeaseLost
from jobs.models import Job
from jobs.worker.context import Context
from jobs.worker.finish import finish_cancelled, finish_failed, finish_succeeded
from jobs.worker.joblogs import capture
from jobs.worker.leases import sync_leases

log = logging.getLogger(__name__)


def execute(job: Job, handler, worker: str) -> tuple[str, Any]:
    """Run the handler under the job's lease: ("succeeded", result),
    ("failed", exception), ("cancelled", None) or ("lost", None)."""
    ctx = Context(job, worker)
    sync_leases.hold(job.id, worker, ctx.lease_lost)
    with job_log_context(job), capture(ctx.joblog):
        try:
            if handler is None:
                raise _UnknownKind(f"no handler is registered for kind {job.kind!r} on this worker")
            payload = handler.parse(job.payload)
            with handler_writes():
                return "succeeded", storable(handler.func(ctx, payload))
        except Cancelled:
            return "cancelled", None
        except LeaseLost:
            return "lost", None
        except Exception as exc:  # noqa: BLE001 - every handler error becomes a retry or a dead job
            return "failed", exc
        finally:
            with contextlib.suppress(DatabaseError):  # lines not written are lost, not the outcome
                ctx.flush_logs()
            _handler_done(job.id)
            with contextlib.suppress(DatabaseError):  # then the outcome's own statement fails, and says so
                relax_commit_durability()  # the handler may have restored the server's setting


def record(job: Job, worker: str, outcome: str, value: Any, *, ack: int | None) -> None:
    with job_log_context(job):
        if outcome == "succeeded":
            finish_succeeded(job, worker, value, ack=ack)
        elif outcome == "failed":
            finish_failed(job, worker, value, ack=ack)
        elif outcome == "cancelled":
            finish_cancelled(job, worker, ack=ack)
        else:
            log.warning("job %s: lease lost while running; another delivery owns it now", job.id)


class _UnknownKind(Exception):
    pass


def _handler_done(job_id: UUID) -> None:
    """Stop renewing the lease, and replace the worker's connection if the
    handler's last query found it broken (Postgres restarted mid-job): the
    outcome is recorded on a fresh one instead of failing the delivery too."""
    sync_leases.release(job_id)
    broker.replace_broken_connection()


def storable(result: Any) -> Any:
    """The result as the job will store it. A result JSON cannot hold (a
    datetime, NaN) fails the attempt here, inside the handler's error
    handling, rather than in the final UPDATE where nothing catches it."""
    if result is None:
        return {}
    json.dumps(result, allow_nan=False)  # jsonb refuses NaN and Infinity
    return result
