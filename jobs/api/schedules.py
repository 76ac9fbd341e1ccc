"""/api/v1/schedules: recurring schedules. Thin: parse, call `jobs.services`, render.

Reading needs the `read` scope, changing (create, update, delete, run now)
needs `operate`. A schedule belongs to whoever created it; an API key sees and
changes only its own (another's answers 404, as what does not exist), whatever
its scopes; a dashboard session sees and changes all. The jobs a schedule
submits are its owner's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from django.http import HttpRequest
from ninja import Field, Router, Schema, Status
from pydantic import BaseModel, ConfigDict

from jobs import services
from jobs.api.auth import Caller, require
from jobs.api.problems import Problem
from jobs.api.schemas import JobOut
from jobs.api.views import _doc
from jobs.engine.representation import job_out
from jobs.models import Schedule

router = Router(tags=["schedules"])

READ, OPERATE = require("read"), require("operate")


class ScheduleIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "nightly-report", "kind": "demo.noop", "payload": {}, "cron": "0 3 * * *"}]
        },
    )

    name: str = Field(min_length=1, max_length=100, description="Unique; letters, digits, '_', '.', ':', '-'.")
    kind: str = Field(max_length=100)
    payload: dict[str, Any] = Field(default_factory=dict, description="Validated against the kind's schema.")
    cron: str | None = Field(None, max_length=200, description="Five fields or @hourly/@daily/@weekly/@monthly.")
    interval_seconds: int | None = Field(None, description="Instead of cron: every N seconds.")
    timezone: str = Field("UTC", max_length=64, description="IANA name; cron is read in this zone (DST included).")
    enabled: bool = True
    overlap: Literal["skip", "allow"] = Field("skip", description="skip: no new job while the previous is unfinished.")
    queue: str | None = Field(None, max_length=100, description="Default: the kind's queue.")
    priority: int = 0
    max_attempts: int | None = Field(None, description="Default: the kind's.")


class SchedulePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str | None = Field(None, max_length=100)
    payload: dict[str, Any] | None = None
    cron: str | None = Field(None, max_length=200, description="Setting it replaces interval_seconds.")
    interval_seconds: int | None = Field(None, description="Setting it replaces cron.")
    timezone: str | None = Field(None, max_length=64)
    enabled: bool | None = None
    overlap: Literal["skip", "allow"] | None = None
    queue: str | None = Field(None, max_length=100)
    priority: int | None = None
    max_attempts: int | None = None


class ScheduleOut(Schema):
    name: str
    kind: str
    payload: dict[str, Any]
    cron: str | None
    interval_seconds: int | None
    timezone: str
    enabled: bool
    overlap: str
    queue: str | None
    priority: int
    max_attempts: int | None
    source: str = Field(description="code (declared in code, synced at start) or runtime.")
    next_run_at: datetime | None = Field(description="The next tick (null while disabled).")
    last_run_at: datetime | None
    last_job_id: UUID | None
    last_job_state: str | None
    last_error: str = Field(description="Why the last tick submitted nothing (the kind or its schema changed).")
    skipped: int = Field(description="Ticks skipped because the previous job was unfinished (overlap=skip).")
    last_skipped_at: datetime | None


def owner_scope(caller: Caller) -> str | None:
    """The owner a caller's schedules are limited to: its own for an API key,
    None (all) for a dashboard session."""
    return None if caller.owner.startswith("user:") else caller.owner


@router.get("/schedules", auth=READ, response=list[ScheduleOut], openapi_extra=_doc())
def list_schedules(request: HttpRequest):
    """Your schedules, by name."""
    return [schedule_out(s) for s in services.list_schedules(owner=owner_scope(request.auth))]


@router.post("/schedules", auth=OPERATE, response={201: ScheduleOut}, openapi_extra=_doc(400, 415))
def create_schedule(request: HttpRequest, body: ScheduleIn):
    """Create a schedule; its first tick is the first after now."""
    with _problems():
        created = services.create_schedule(owner=request.auth.owner, **body.model_dump())
    return Status(201, schedule_out(created))


@router.get("/schedules/{name}", auth=READ, response=ScheduleOut, openapi_extra=_doc(404))
def get_schedule(request: HttpRequest, name: str):
    """One of your schedules, with its last job's state."""
    with _problems():
        return schedule_out(services.get_schedule(name, owner=owner_scope(request.auth)))


@router.patch("/schedules/{name}", auth=OPERATE, response=ScheduleOut, openapi_extra=_doc(400, 404, 415))
def update_schedule(request: HttpRequest, name: str, body: SchedulePatch):
    """Change some fields (null or absent: unchanged)."""
    changes = body.model_dump(exclude_none=True)
    with _problems():
        return schedule_out(services.update_schedule(name, owner=owner_scope(request.auth), **changes))


@router.delete("/schedules/{name}", auth=OPERATE, response={204: None}, openapi_extra=_doc(404))
def delete_schedule(request: HttpRequest, name: str):
    """Delete a schedule (its jobs stay). A code schedule comes back at the next start while declared."""
    with _problems():
        services.delete_schedule(name, owner=owner_scope(request.auth))
    return Status(204, None)


@router.post("/schedules/{name}/run", auth=OPERATE, response={202: JobOut}, openapi_extra=_doc(404))
def run_schedule(request: HttpRequest, name: str):
    """Submit the schedule's job now (its ticks go on as before). 202 with the job."""
    with _problems():
        job = services.run_now(name, owner=owner_scope(request.auth))
    return Status(202, job_out(job, attempts=[]))


def schedule_out(schedule: Schedule) -> dict[str, Any]:
    last_job = schedule.last_job if schedule.last_job_id else None
    return {
        "name": schedule.name,
        "kind": schedule.kind,
        "payload": schedule.payload,
        "cron": schedule.cron or None,
        "interval_seconds": schedule.interval_seconds,
        "timezone": schedule.timezone,
        "enabled": schedule.enabled,
        "overlap": schedule.overlap,
        "queue": schedule.queue or None,
        "priority": schedule.priority,
        "max_attempts": schedule.max_attempts,
        "source": schedule.source,
        "next_run_at": schedule.next_run_at,
        "last_run_at": schedule.last_run_at,
        "last_job_id": schedule.last_job_id,
        "last_job_state": last_job.state if last_job else None,
        "last_error": schedule.last_error,
        "skipped": schedule.skipped,
        "last_skipped_at": schedule.last_skipped_at,
    }


@contextmanager
def _problems() -> Iterator[None]:
    try:
        yield
    except services.ScheduleNotFound as exc:
        raise Problem("schedule-not-found", exc.message) from None
    except services.InvalidSchedule as exc:
        raise Problem("invalid-schedule", "The schedule is refused.", errors=exc.errors) from None
