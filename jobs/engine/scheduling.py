"""Recurring schedules: a job submitted on a cron expression or every N
seconds, in a time zone.

- **Tick math** (`next_tick`, `upcoming`) is pure: cron expressions are
  evaluated by cronsim in the schedule's zone (zoneinfo), so a daily 02:30 in
  Europe/Berlin follows the DST changes; intervals are anchored on the
  previous tick. A schedule that missed ticks (everything was down) runs once
  on catch-up, then resumes at its first tick after now.
- **Firing** (`tick_due`): each due schedule is locked (`FOR UPDATE SKIP
  LOCKED`) and moved forward in one transaction with the submission of its
  tick's job, idempotency key `schedule:<name>:<tick ISO>`: with any number of
  clusters, one of them does each tick, and a tick submits one job.
- **Overlap**: with `overlap="skip"` (the default) a tick while the previous
  job is unfinished submits nothing; `skipped` and `last_skipped_at` record it.
- **The loop** (`run_ticker`, a thread in each qcluster) sleeps until the next
  `next_run_at` and is woken by `pg_notify('conveyor_schedules')` when a
  schedule changes: ticks fire within a second, without polling.
- **Code schedules** (`schedule(...)`, `declare_for_handler`) are declared in
  a module-level registry and synced into the table (`sync_declared`) after
  migrate and when a cluster starts, marked `source="code"`.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import psycopg
from cronsim import CronSim, CronSimError
from django.db import DatabaseError, IntegrityError, connection, connections, transaction
from django.utils import timezone

from jobs.djangoq.broker import listen_params
from jobs.engine import registry
from jobs.engine.submission import prepare_job, submit_job
from jobs.errors import ConveyorError, InvalidJob
from jobs.models import ACTIVE_STATES, Job, Schedule

log = logging.getLogger(__name__)

CHANNEL = "conveyor_schedules"
ALIASES = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
}
NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
MAX_INTERVAL = 366 * 24 * 3600
MAX_SLEEP_SECONDS = 30.0  # a backstop only: changes wake the loop at once
MIN_SLEEP_SECONDS = 0.05
FIELDS = ("kind", "payload", "cron", "interval_seconds", "timezone", "enabled", "overlap", "queue", "priority")
FIELDS += ("max_attempts",)
FORM_FIELDS = ("name", *FIELDS)  # what a form edits
# What a start writes over from the code: not `enabled`, which an operator may have changed.
SYNCED = tuple(f for f in FIELDS if f != "enabled")


class InvalidSchedule(ConveyorError):
    """The schedule is refused; `errors` lists each problem with its field."""

    code = "invalid-schedule"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


class ScheduleNotFound(ConveyorError):
    code = "schedule-not-found"


# --- tick math (pure) ----------------------------------------------------------------


def cron_error(expression: str) -> str | None:
    """Why a cron expression is refused, or None."""
    if not isinstance(expression, str) or not expression.strip():
        return "must be five fields (minute hour day month weekday) or @hourly, @daily, @weekly, @monthly"
    expression = ALIASES.get(expression.strip(), expression.strip())
    if len(expression.split()) != 5:
        return "must be five fields (minute hour day month weekday) or @hourly, @daily, @weekly, @monthly"
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except (CronSimError, ValueError) as exc:
        return f"is not a valid cron expression ({exc})"
    return None


def zone_error(name: Any) -> str | None:
    if not isinstance(name, str) or name not in _zones():
        return "must be an IANA time zone name, such as UTC or Europe/Berlin"
    return None


def next_tick(
    *,
    cron: str = "",
    interval_seconds: int | None = None,
    tz: str = "UTC",
    after: datetime,
    anchor: datetime | None = None,
) -> datetime:
    """The first tick strictly after `after` (UTC). A cron expression is read
    in zone `tz`; an interval counts from `anchor` (the previous tick), or
    from `after` cut to the whole second when there is none."""
    if cron:
        expression = ALIASES.get(cron.strip(), cron.strip())
        local = after.astimezone(ZoneInfo(tz))
        return next(iter(CronSim(expression, local))).astimezone(UTC)
    step = timedelta(seconds=interval_seconds)
    if anchor is None:
        return after.replace(microsecond=0) + step
    if anchor > after:
        return anchor
    missed = (after - anchor) // step
    return anchor + (missed + 1) * step


def upcoming(
    *, cron: str = "", interval_seconds: int | None = None, tz: str = "UTC", after: datetime, count: int = 5
) -> list[datetime]:
    """The next `count` ticks after `after` (UTC)."""
    ticks: list[datetime] = []
    anchor = None
    for _ in range(count):
        tick = next_tick(cron=cron, interval_seconds=interval_seconds, tz=tz, after=after, anchor=anchor)
        ticks.append(tick)
        after = anchor = tick
    return ticks


def _zones() -> set[str]:
    global _ZONES
    if _ZONES is None:
        _ZONES = available_timezones() | {"UTC"}
    return _ZONES


_ZONES: set[str] | None = None


# --- validation ----------------------------------------------------------------------


def clean(fields: dict[str, Any]) -> dict[str, Any]:
    """Validate a whole schedule (every field of FIELDS plus `name`) and return
    it normalized (the payload as the kind's schema makes it). Raises
    InvalidSchedule naming each field that is wrong."""
    errors: list[dict[str, str]] = []
    name = fields.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        errors.append({"field": "name", "message": "must be 1-100 letters, digits, '_', '.', ':' or '-'"})
    cron = fields.get("cron") or ""
    interval = fields.get("interval_seconds")
    if cron and interval is not None:
        errors.append({"field": "cron", "message": "give either cron or interval_seconds, not both"})
    elif not cron and interval is None:
        errors.append({"field": "cron", "message": "give cron or interval_seconds"})
    elif cron:
        problem = cron_error(cron)
        if problem:
            errors.append({"field": "cron", "message": problem})
        cron = cron.strip()
    elif isinstance(interval, bool) or not isinstance(interval, int) or not 1 <= interval <= MAX_INTERVAL:
        errors.append({"field": "interval_seconds", "message": f"must be an integer from 1 to {MAX_INTERVAL}"})
    tz = fields.get("timezone") or "UTC"
    problem = zone_error(tz)
    if problem:
        errors.append({"field": "timezone", "message": problem})
    overlap = fields.get("overlap") or Schedule.Overlap.SKIP
    if overlap not in Schedule.Overlap.values:
        errors.append({"field": "overlap", "message": "must be skip or allow"})
    enabled = fields.get("enabled", True)
    if not isinstance(enabled, bool):
        errors.append({"field": "enabled", "message": "must be true or false"})
    payload: Any = fields.get("payload")
    payload = {} if payload is None else payload
    queue = fields.get("queue") or ""
    priority = 0 if fields.get("priority") is None else fields.get("priority")
    try:
        prepared = prepare_job(
            fields.get("kind"), payload, queue=queue or None, priority=priority, max_attempts=fields.get("max_attempts")
        )
        payload = prepared["payload"]
    except InvalidJob as exc:
        errors += exc.errors
    if errors:
        raise InvalidSchedule(errors)
    return {
        "name": name,
        "kind": fields["kind"],
        "payload": payload,
        "cron": cron,
        "interval_seconds": None if cron else interval,
        "timezone": tz,
        "enabled": enabled,
        "overlap": overlap,
        "queue": queue,
        "priority": priority,
        "max_attempts": fields.get("max_attempts"),
    }


# --- runtime CRUD ----------------------------------------------------------------------


def list_schedules(*, owner: str | None = None) -> list[Schedule]:
    """By name; with `owner`, only that owner's."""
    query = Schedule.objects.select_related("last_job")
    if owner is not None:
        query = query.filter(owner=owner)
    return list(query.order_by("name"))


def get_schedule(name: str, *, owner: str | None = None) -> Schedule:
    """Raises ScheduleNotFound (also for another owner's: names do not leak
    beyond what creating one with the same name tells)."""
    return _find(Schedule.objects.select_related("last_job"), name, owner)


def _find(query, name: str, owner: str | None) -> Schedule:
    if owner is not None:
        query = query.filter(owner=owner)
    try:
        return query.get(name=name)
    except Schedule.DoesNotExist:
        raise ScheduleNotFound(f"no schedule named {name!r}") from None


def create_schedule(*, owner: str = "", source: str = Schedule.Source.RUNTIME, **fields: Any) -> Schedule:
    cleaned = clean(fields)
    with transaction.atomic():
        if Schedule.objects.filter(name=cleaned["name"]).exists():
            raise InvalidSchedule([{"field": "name", "message": "is already taken"}])
        schedule = Schedule(owner=owner, source=source, **cleaned)
        schedule.next_run_at = _first_tick(schedule, timezone.now())
        try:
            with transaction.atomic():
                schedule.save()
        except IntegrityError:
            raise InvalidSchedule([{"field": "name", "message": "is already taken"}]) from None
        _notify()
    return schedule


def update_schedule(name: str, *, owner: str | None = None, **changes: Any) -> Schedule:
    """Change some fields (a new `cron` replaces an interval and the other way
    round); the next tick is computed anew when the timing changes."""
    with transaction.atomic():
        schedule = _locked(name, owner)
        current = {field: getattr(schedule, field) for field in FIELDS}
        if changes.get("cron") and "interval_seconds" not in changes:
            changes["interval_seconds"] = None
        if changes.get("interval_seconds") is not None and "cron" not in changes:
            changes["cron"] = ""
        cleaned = clean({**current, **changes, "name": schedule.name})
        timing = ("cron", "interval_seconds", "timezone", "enabled")
        retime = any(cleaned[f] != current[f] for f in timing)
        for field, value in cleaned.items():
            setattr(schedule, field, value)
        if retime:
            schedule.next_run_at = _first_tick(schedule, timezone.now())
        schedule.save()
        _notify()
    return schedule


def set_enabled(name: str, enabled: bool, *, owner: str | None = None) -> Schedule:
    return update_schedule(name, owner=owner, enabled=enabled)


def delete_schedule(name: str, *, owner: str | None = None) -> None:
    with transaction.atomic():
        _locked(name, owner).delete()
        _notify()


def run_now(name: str, *, owner: str | None = None) -> Job:
    """Submit the schedule's job at once (outside its ticks; the overlap rule
    does not apply to an operator asking). Raises ScheduleNotFound or InvalidJob."""
    with transaction.atomic():
        schedule = _locked(name, owner)
        job = submit_job(schedule.kind, schedule.payload, owner=schedule.owner, **_job_options(schedule)).job
        Schedule.objects.filter(pk=schedule.pk).update(last_job=job, last_run_at=timezone.now(), last_error="")
    return job


def _locked(name: str, owner: str | None) -> Schedule:
    return _find(Schedule.objects.select_for_update(), name, owner)


def _first_tick(schedule: Schedule, now: datetime) -> datetime | None:
    if not schedule.enabled:
        return None
    return next_tick(cron=schedule.cron, interval_seconds=schedule.interval_seconds, tz=schedule.timezone, after=now)


def _job_options(schedule: Schedule) -> dict[str, Any]:
    return {"queue": schedule.queue or None, "priority": schedule.priority, "max_attempts": schedule.max_attempts}


def _notify() -> None:
    """Wake every cluster's loop (delivered when the transaction commits)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, '')", [CHANNEL])


# --- firing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fired:
    schedule: str
    tick: datetime
    outcome: str  # "submitted", "skipped" (overlap) or "failed" (see the schedule's last_error)
    job: Job | None = None


def idempotency_key(name: str, tick: datetime) -> str:
    return f"schedule:{name}:{tick.astimezone(UTC).isoformat()}"


def tick_due(now: datetime | None = None) -> list[Fired]:
    """Fire every schedule due at `now`: each in its own transaction, locked
    and moved forward with the submission of its job. A schedule another
    cluster holds is skipped here (it is firing there)."""
    fired: list[Fired] = []
    while True:
        current = now or timezone.now()
        with transaction.atomic():
            schedule = (
                Schedule.objects.select_for_update(skip_locked=True)
                .filter(enabled=True, next_run_at__lte=current)
                .order_by("next_run_at")
                .first()
            )
            if schedule is None:
                return fired
            fired.append(_fire(schedule, current))


def _fire(schedule: Schedule, now: datetime) -> Fired:
    tick = schedule.next_run_at
    schedule.next_run_at = next_tick(
        cron=schedule.cron, interval_seconds=schedule.interval_seconds, tz=schedule.timezone, after=now, anchor=tick
    )
    fields = ["next_run_at", "updated_at"]
    if (
        schedule.overlap == Schedule.Overlap.SKIP
        and schedule.last_job_id is not None
        and Job.objects.filter(id=schedule.last_job_id, state__in=ACTIVE_STATES).exists()
    ):
        schedule.skipped += 1
        schedule.last_skipped_at = now
        schedule.save(update_fields=[*fields, "skipped", "last_skipped_at"])
        return Fired(schedule.name, tick, "skipped")
    job = None
    try:
        job = submit_job(
            schedule.kind,
            schedule.payload,
            owner=schedule.owner,
            idempotency_key=idempotency_key(schedule.name, tick),
            **_job_options(schedule),
        ).job
        schedule.last_job = job
        schedule.last_error = ""
        log.info("schedule %s: tick %s submitted job %s", schedule.name, tick.isoformat(), job.id)
    except ConveyorError as exc:
        # The kind or its schema changed under a stored schedule (or the key
        # was used with another request): the tick passes, and the schedule says why.
        log.warning("schedule %s: tick %s not submitted: %s", schedule.name, tick.isoformat(), exc.message)
        schedule.last_error = exc.message
    schedule.last_run_at = now
    schedule.save(update_fields=[*fields, "last_job", "last_error", "last_run_at"])
    return Fired(schedule.name, tick, "submitted" if job else "failed", job)


def seconds_until_due(now: datetime | None = None) -> float | None:
    """Seconds until the earliest enabled schedule is due (0 if one is), or None."""
    due = Schedule.objects.filter(enabled=True, next_run_at__isnull=False).order_by("next_run_at").first()
    if due is None:
        return None
    return max(0.0, (due.next_run_at - (now or timezone.now())).total_seconds())


def run_ticker(stop: threading.Event) -> None:
    """The loop of a cluster: sync the code schedules, then fire what is due
    and sleep until the next tick or a change, until `stop` is set."""
    wake = threading.Event()
    listener = threading.Thread(target=_listen, args=(stop, wake), name="conveyor-schedules-listen", daemon=True)
    listener.start()
    synced = False
    backoff = 0.5
    log.info("schedules loop started")
    while not stop.is_set():
        delay = MAX_SLEEP_SECONDS
        try:
            if not synced:
                sync_declared()
                synced = True
            wake.clear()
            tick_due()
            due = seconds_until_due()
            if due is not None:
                # A schedule still due is being fired by another cluster (its
                # row was locked): look again shortly, not in a tight loop.
                delay = min(delay, max(due + 0.002, MIN_SLEEP_SECONDS))
            backoff = 0.5
        except DatabaseError as exc:
            log.warning("schedules: database error (%s); trying again in %.1f s", exc, backoff)
            connection.close()
            delay, backoff = backoff, min(backoff * 2, 10.0)
        except Exception:
            # A bug must not end the loop of every schedule for good.
            log.exception("schedules: the loop failed; trying again in %.1f s", backoff)
            delay, backoff = backoff, min(backoff * 2, 10.0)
        wake.wait(delay)
    connection.close()


def _listen(stop: threading.Event, wake: threading.Event) -> None:
    backoff = 0.5
    while not stop.is_set():
        try:
            with psycopg.connect(**listen_params("conveyor-schedules"), autocommit=True) as listener:
                listener.execute(f"LISTEN {CHANNEL}")
                backoff = 0.5
                wake.set()  # changes may have come while not listening
                while not stop.is_set():
                    for _ in listener.notifies(timeout=1.0):
                        wake.set()
        except psycopg.Error as exc:
            log.warning("schedules LISTEN connection lost (%s); reconnecting in %.1f s", exc, backoff)
        stop.wait(backoff)
        backoff = min(backoff * 2, 10.0)


# --- schedules declared in code -------------------------------------------------------------

# The declarations live in the registry (jobs/engine/registry.py), which loads no
# models, so that `from jobs import schedule` works before the apps are ready.
_DECLARED = registry.declared_schedules


def sync_after_migrate(using: str = "default", **_signal_kwargs: Any) -> None:
    """post_migrate: sync, unless the migrations run stopped before the table."""
    if Schedule._meta.db_table in connections[using].introspection.table_names():
        sync_declared()


def sync_declared() -> list[str]:
    """Write the declared schedules into the table (idempotent): create the
    new ones, update the changed ones (their next tick is kept unless their
    timing changed), delete code schedules no longer declared. A declaration
    that does not validate is logged and left out. Returns the names written."""
    written = []
    for name, fields in _DECLARED.items():
        try:
            cleaned = clean(fields)
        except InvalidSchedule as exc:
            log.error("code schedule %s is invalid and not synced: %s", name, exc.message)
            continue
        with transaction.atomic():
            existing = Schedule.objects.select_for_update().filter(name=name).first()
            if existing is None:
                create_schedule(owner="", source=Schedule.Source.CODE, **cleaned)
            elif existing.source != Schedule.Source.CODE:
                log.error("code schedule %s not synced: a runtime schedule has that name", name)
                continue
            elif any(getattr(existing, f) != cleaned[f] for f in SYNCED):
                update_schedule(name, **{f: cleaned[f] for f in SYNCED})
        written.append(name)
    stale = Schedule.objects.filter(source=Schedule.Source.CODE).exclude(name__in=list(_DECLARED))
    if stale.exists():
        with transaction.atomic():
            stale.delete()
            _notify()
    return written
