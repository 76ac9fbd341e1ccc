"""The Django-Q2 task that runs jobs, and the rescue of jobs whose worker died.

`run_job(job_id)` is what every broker row names. Delivery is at least once,
so a delivery only means "look at this job":

1. Claim it: one conditional UPDATE from queued/scheduled/retrying (and due)
   to running, taking a lease; the attempt row and `job.started` event commit
   with it. A duplicate delivery finds the job claimed or finished.
2. If the claim fails because the job is running, this delivery is the
   watchdog: a lease that has expired means its worker died, so the attempt
   is recorded as lost and the job retried (or dead-lettered); a live lease
   re-arms the watchdog for when it would expire.
3. Run the handler while the process's lease thread renews the lease.
4. Finish with one transition (succeeded, retrying, dead or cancelled) that
   only matches while this worker still holds the lease.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.db.models.functions import Now
from django.utils import timezone
from django_q.conf import Conf
from django_q.exceptions import TimeoutException
from django_q.signals import pre_execute

from config.logs import job_log_context
from jobs import broker, events, retries, sql, webhooks
from jobs.durability import relax_commit_durability
from jobs.errors import Cancelled, LeaseLost
from jobs.lane import get_lane
from jobs.models import Attempt, Job, State
from jobs.registry import async_kinds, get_handler, sync_kinds
from jobs.states import ALLOWED, OPEN_ATTEMPT, Sql, close_attempt, state_literals, transition

log = logging.getLogger(__name__)


def _worker_id() -> str:
    # Forked workers inherit the module; the pid must be the current one.
    pid = os.getpid()
    if _worker_ids.get(pid) is None:
        _worker_ids.clear()
        _worker_ids[pid] = f"{socket.gethostname()}:{pid}"
    return _worker_ids[pid]


_worker_ids: dict[int, str] = {}


def lease_seconds() -> int:
    return settings.CONVEYOR["LEASE_SECONDS"]


class Context:
    """What a handler gets besides its payload: progress, cancellation, attempt."""

    def __init__(self, job: Job, worker: str) -> None:
        self.job_id = job.id
        self.kind = job.kind
        self.queue = job.queue
        self.attempt = job.attempts
        self.worker = worker
        self.lease_lost = threading.Event()

    def report_progress(self, percent: int, message: str = "") -> None:
        """Record progress (0-100) and a message; raises Cancelled if an
        operator cancelled the job, LeaseLost if it was taken from this worker."""
        percent = max(0, min(100, int(percent)))
        message = message[:500]
        # One statement: the progress, its event (unless a cancel is pending)
        # and the notification.
        with sql.cursor() as cursor:
            cursor.execute(
                "WITH j AS (UPDATE jobs_job SET progress_percent = %s, progress_message = %s, updated_at = now()"
                " WHERE id = %s AND state = 'running' AND lease_owner = %s RETURNING id, queue, cancel_requested_at)"
                + events.ctes(when="cancel_requested_at IS NULL")
                + " SELECT j.cancel_requested_at, (SELECT count(*) FROM n) FROM j",
                [
                    percent,
                    message,
                    str(self.job_id),
                    self.worker,
                    "job.progress",
                    json.dumps({"percent": percent, "message": message}),
                    "job.progress",
                ],
            )
            row = cursor.fetchone()
        if row is None:
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
        if row[0] is not None:
            raise Cancelled("cancelled by an operator")

    def check_cancelled(self) -> None:
        """Raise Cancelled when an operator asked this job to stop."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
        requested = Job.objects.filter(id=self.job_id).values_list("cancel_requested_at", flat=True).first()
        if requested is not None:
            raise Cancelled("cancelled by an operator")


class _Delivery:
    """The broker row a worker is running, when Django-Q2 said so (its
    `pre_execute` signal carries the task, which holds the row's `ack_id`).

    The runner then settles the row in a statement it makes anyway: the
    finishing transition deletes it, and a lane claim re-arms it as the job's
    watchdog. It takes `ack_id` off the task once that statement has run, so
    Django-Q2's monitor has no acknowledgement to make. Without a task (a
    direct call, a test) the monitor-less paths work as before."""

    _current = threading.local()

    def __init__(self, task: dict | None) -> None:
        self.task = task

    @classmethod
    def take(cls, job_id: str) -> _Delivery:
        task = getattr(cls._current, "task", None)
        cls._current.task = None
        if task is None or task.get("args") != (job_id,) or not task.get("ack_id"):
            return cls(None)
        return cls(task)

    @property
    def ack_id(self) -> int | None:
        return self.task.get("ack_id") if self.task is not None else None

    def settled(self) -> None:
        if self.task is not None:
            self.task.pop("ack_id", None)


def _note_delivery(sender, func=None, task=None, **kwargs) -> None:
    _Delivery._current.task = task if func is run_job else None


pre_execute.connect(_note_delivery, dispatch_uid="conveyor-runner-delivery")


def run_job(job_id: str) -> None:
    """Entry point of every broker row (see the module docstring)."""
    delivery = _Delivery.take(job_id)
    try:
        UUID(str(job_id))
    except ValueError:
        log.warning("ignoring a delivery for the malformed job id %r", job_id)
        return
    relax_commit_durability()
    started = time.monotonic()
    worker = _worker_id()
    job = _claim(job_id, worker, delivery=delivery.ack_id)
    if job is None:
        _look_after_unclaimed(job_id)
        return
    handler = get_handler(job.kind)
    if handler is not None and handler.is_async:
        if job.watchdog_id is not None and job.watchdog_id == delivery.ack_id:
            delivery.settled()  # re-armed as the watchdog
        lane = get_lane()
        lane.submit(job, handler, worker, watchdog_id=job.watchdog_id)
        _fill_lane(lane, job.queue, worker)
        return
    outcome, value = _execute(job, handler, worker)
    if outcome == "lost":
        _record(job, worker, outcome, value, ack=None)
        return  # the monitor acknowledges the delivery
    if delivery.task is not None and threading.current_thread() is threading.main_thread():
        _run_chain(job, worker, started, outcome, value, ack=delivery.ack_id)  # a Django-Q2 worker, under its alarm
    else:
        _record(job, worker, outcome, value, ack=delivery.ack_id)
    delivery.settled()


def _execute(job: Job, handler, worker: str) -> tuple[str, Any]:
    """Run the handler under the job's lease: ("succeeded", result),
    ("failed", exception), ("cancelled", None) or ("lost", None)."""
    ctx = Context(job, worker)
    _leases.hold(job.id, worker, ctx.lease_lost)
    with job_log_context(job):
        try:
            if handler is None:
                raise _UnknownKind(f"no handler is registered for kind {job.kind!r} on this worker")
            payload = handler.schema.model_validate(job.payload)
            return "succeeded", _storable(handler.func(ctx, payload))
        except Cancelled:
            return "cancelled", None
        except LeaseLost:
            return "lost", None
        except Exception as exc:  # noqa: BLE001 - every handler error becomes a retry or a dead job
            return "failed", exc
        finally:
            _handler_done(job.id)


def _record(job: Job, worker: str, outcome: str, value: Any, *, ack: int | None) -> None:
    with job_log_context(job):
        if outcome == "succeeded":
            _finish_succeeded(job, worker, value, ack=ack)
        elif outcome == "failed":
            _finish_failed(job, worker, value, ack=ack)
        elif outcome == "cancelled":
            _finish_cancelled(job, worker, ack=ack)
        else:
            log.warning("job %s: lease lost while running; another delivery owns it now", job.id)


def _run_chain(delivered: Job, worker: str, started: float, outcome: str, value: Any, *, ack: int | None) -> int:
    """Record the delivered job's outcome, then run more ready jobs of the
    queue's sync kinds on this delivery for at most CONVEYOR_CHAIN_SECONDS:
    each success is recorded by the statement that claims the next job,
    straight through its broker row. A job then costs one statement instead
    of two plus a trip through Django-Q2 (the pusher's claim, its task queue,
    the worker's hand-off, the monitor). Returns how many more jobs ran.

    The row is claimed as the broker's claim would (visible, SKIP LOCKED,
    priority then FIFO) and gets the broker's visibility timeout, so if this
    process dies, the row is delivered again and finds the lease expired, as
    for any delivery. Django-Q2 limits this task's time to the delivered job's
    timeout (its alarm, and its guard a few seconds later), so a job is only
    chained if its own timeout ends within that, and it runs under an alarm of
    its own timeout. A success that asks for a webhook message, and every
    other outcome, is recorded by the usual transition."""
    seconds = settings.CONVEYOR["CHAIN_SECONDS"]
    kinds = sync_kinds()
    key = broker.cluster_for_queue(delivered.queue)
    deadline = started + seconds

    def record_and_claim(job: Job, outcome: str, value: Any, row: int | None) -> list[tuple]:
        # Django-Q2's guard stops this process about 3 s after the delivered
        # job's timeout: a chained job's own timeout must end 2 s before that.
        now = time.monotonic()
        left = int(delivered.timeout + 1 - (now - started))
        claim = 1 if seconds and kinds and now < deadline and left >= 1 else 0
        quiet = outcome == "succeeded" and row is not None and webhooks.quiet_condition(State.SUCCEEDED) is not None
        if not quiet:
            _record(job, worker, outcome, value, ack=row)
            if not claim:
                return []
        try:
            rows, finished = _claim_ready(
                key, worker, claim, kinds or [""], rearm=_VISIBLE_AGAIN, max_timeout=left,
                finish=(job, value, row) if quiet else None,
            )
        except DatabaseError as exc:  # nothing claimed: the rows are delivered as usual
            log.warning("could not claim the next job (%s)", exc)
            rows, finished = [], False
        if quiet and not finished:  # it asks for a webhook message, or is no longer ours
            _record(job, worker, outcome, value, ack=row)
        return rows

    rows = record_and_claim(delivered, outcome, value, ack)
    ran = 0
    while rows:
        job, row_id = sql.job_from_row(rows[0]), rows[0][-1]
        with _alarm(job.timeout):
            outcome, value = _execute(job, get_handler(job.kind), worker)
        ran += 1
        rows = record_and_claim(job, outcome, value, row_id)
    return ran


@contextlib.contextmanager
def _alarm(seconds: int):
    """Django-Q2's timeout (SIGALRM raising its TimeoutException) for a chained job."""

    def expired(signum, frame):
        raise TimeoutException(f"Task exceeded maximum timeout value ({seconds} seconds)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


class _UnknownKind(Exception):
    pass


def _handler_done(job_id: UUID) -> None:
    """Stop renewing the lease, and replace the worker's connection if the
    handler's last query found it broken (Postgres restarted mid-job): the
    outcome is recorded on a fresh one instead of failing the delivery too."""
    _leases.release(job_id)
    broker.replace_broken_connection()


def _storable(result: Any) -> Any:
    """The result as the job will store it. A result JSON cannot hold (a
    datetime, NaN) fails the attempt here, inside the handler's error
    handling, rather than in the final UPDATE where nothing catches it."""
    if result is None:
        return {}
    json.dumps(result, allow_nan=False)  # jsonb refuses NaN and Infinity
    return result


def _claim(job_id: str, worker: str, *, delivery: int | None = None) -> Job | None:
    return transition(
        job_id,
        target=State.RUNNING,
        where=Sql("run_after IS NULL OR run_after <= now()"),
        event="job.started",
        attempt=OPEN_ATTEMPT,
        watchdog=_lane_watchdog(job_id, delivery),
        attempts=Sql("attempts + 1"),
        lease_owner=worker,
        lease_expires_at=Sql("now() + make_interval(secs => %s)", lease_seconds()),
        started_at=Sql("now()"),
        cancel_requested_at=None,
    )


# What a claim does to a job's broker row: an async job's is re-armed as its
# watchdog, due a second after the lease would end (see `_lane_watchdog`); a
# chained job makes it invisible for the broker's visibility timeout, as the
# broker's claim does, and deletes it when it finishes.
_AS_WATCHDOG = "j.lease_expires_at + interval '1 second'"
_VISIBLE_AGAIN = "now() + make_interval(secs => %s)"


def _lane_watchdog(job_id: str, delivery: int | None) -> Sql | None:
    """For async kinds, the claim also arms the broker row that looks at the
    job again when its lease would end: the worker is done with the delivery at
    hand-off, so this row is what notices a lane process that died. The
    delivery's own row is re-armed when the runner knows it; otherwise a row
    is inserted. (The key is the job's queue: `broker.cluster_for_queue` is
    the identity.)"""
    kinds = async_kinds()
    if not kinds:
        return None
    if delivery is not None:
        return Sql(
            f"UPDATE django_q_ormq SET lock = {_AS_WATCHDOG}"
            f" FROM j WHERE django_q_ormq.id = %s AND j.kind IN ({_quoted(tuple(kinds))})"
            " RETURNING django_q_ormq.id",
            delivery,
        )
    return Sql(
        "INSERT INTO django_q_ormq (key, payload, lock, priority, job_id)"
        f" SELECT queue, %s, {_AS_WATCHDOG}, 0, id FROM j WHERE kind IN ({_quoted(tuple(kinds))})"
        " RETURNING id",
        broker.task_package(job_id, 60),
    )


def _fill_lane(lane, queue: str, worker: str) -> int:
    """Claim more ready jobs of async kinds in `queue` for the lane's free places
    (at most CONVEYOR_LANE_FILL), in one statement, and hand them over; returns
    how many. A backlog of LLM calls then fills the lane at once, instead of
    one Django-Q2 delivery (pusher, task queue, claim) per job.

    The claim goes through the jobs' broker rows: visible rows of the queue
    (those not already on their way to a worker), locked SKIP LOCKED as the
    broker's own claim does, so a row is either delivered or claimed here,
    never both. Each claimed job's row is re-armed as its watchdog, exactly as
    a delivery's row is (see `_lane_watchdog`). Rows without a job id (written
    before the column existed) are left to the broker."""
    most = settings.CONVEYOR["LANE_FILL"]
    kinds = async_kinds()
    room = lane.reserve(most) if most and kinds and not lane.stopping else 0
    if not room:
        return 0
    try:
        rows, _ = _claim_ready(broker.cluster_for_queue(queue), worker, room, kinds)
    except DatabaseError as exc:  # nothing was claimed; deliveries carry on as usual
        log.warning("lane: could not claim ready jobs (%s)", exc)
        rows = []
    for row in rows:
        job = sql.job_from_row(row)
        lane.submit(job, get_handler(job.kind), worker, watchdog_id=row[-1], reserved=True)
    lane.unreserve(room - len(rows))
    return len(rows)




def _claim_ready(
    key: str,
    worker: str,
    limit: int,
    kinds,
    *,
    rearm: str = _AS_WATCHDOG,
    max_timeout: int | None = None,
    finish: tuple[Job, Any, int] | None = None,
) -> tuple[list[tuple], bool]:
    """The claim of `_claim` for up to `limit` ready jobs of `kinds` through
    their visible broker rows of `key`: the rows of `job_columns()` plus the
    id of each job's broker row, set by `rearm`.

    `finish` (job, result, its broker row): in the same statement, record the
    job's success as `_finish_succeeded` would, if it is still this worker's
    and asks for no webhook message (the second value says whether it was)."""
    columns = sql.job_columns()[0]
    names = columns.split(", ")
    qualified = ", ".join(f"jobs_job.{column}" for column in names)
    ready = state_literals(ALLOWED[State.RUNNING])
    parts, params = ["WITH "], []
    if finish is not None:
        finishing, finish_params = _quiet_success(*finish, worker)
        parts.append(finishing + ", ")
        params += finish_params
    params += [key, limit, worker, lease_seconds()]
    within = ""
    if max_timeout is not None:
        within = " AND jobs_job.timeout <= %s"
        params.append(max_timeout)
    if rearm == _VISIBLE_AGAIN:
        params.append(Conf.RETRY)
    parts.append(
        "picked AS (SELECT id AS row_id, job_id FROM django_q_ormq"
        " WHERE key = %s AND lock <= now() AND job_id IS NOT NULL"
        " ORDER BY priority DESC, lock, id LIMIT %s FOR UPDATE SKIP LOCKED),"
        " j AS (UPDATE jobs_job SET state = 'running', updated_at = now(), attempts = attempts + 1,"
        " lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s), started_at = now(),"
        " cancel_requested_at = NULL FROM picked WHERE jobs_job.id = picked.job_id"
        f" AND jobs_job.state IN ({ready}) AND (jobs_job.run_after IS NULL OR jobs_job.run_after <= now())"
        f" AND jobs_job.kind IN ({_quoted(tuple(kinds))}){within} RETURNING {qualified}, picked.row_id),"
        f" a AS ({OPEN_ATTEMPT.expression}),"
        f" w AS (UPDATE django_q_ormq SET lock = {rearm} FROM j WHERE django_q_ormq.id = j.row_id)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)")
    )
    params += ["job.started", "job.started"]
    claimed = ", ".join(f"j.{column}" for column in names)
    if finish is None:
        parts.append(f" SELECT {claimed}, j.row_id FROM j, (SELECT count(*) FROM n) AS notified")
    else:
        # One row even when nothing was claimed: it says whether the job finished.
        parts.append(
            f" SELECT {claimed}, j.row_id, finished.count FROM (SELECT count(*) FROM f) AS finished"
            " LEFT JOIN j ON true, (SELECT count(*) FROM n) AS notified, (SELECT count(*) FROM fn) AS f_notified"
        )
    with sql.cursor() as cursor:
        cursor.execute("".join(parts), params)
        rows = cursor.fetchall()
    if finish is None:
        return rows, False
    return [row[:-1] for row in rows if row[-2] is not None], bool(rows and rows[0][-1])


def _quiet_success(job: Job, result: Any, row_id: int, worker: str) -> tuple[str, list[Any]]:
    """CTEs (f, fa, fd, fe, fn) that record `job`'s success as
    `_finish_succeeded` does, and delete its broker row, when the job is still
    this worker's and needs no webhook message (`webhooks.quiet_condition`)."""
    quiet = webhooks.quiet_condition(State.SUCCEEDED)
    stored = Job._meta.get_field("result").get_db_prep_save(result, connection)
    statement = (
        "f AS (UPDATE jobs_job SET state = 'succeeded', updated_at = now(), result = %s, progress_percent = 100,"
        " finished_at = now(), lease_owner = '', lease_expires_at = NULL, error_type = '', error_message = '',"
        " error_traceback = '' WHERE id = %s AND state = 'running' AND lease_owner = %s"
        f" AND ({quiet.expression}) RETURNING id, queue, state, attempts),"
        " fa AS (UPDATE jobs_attempt SET finished_at = now(), outcome = 'succeeded', error_type = '',"
        " error_message = '', traceback = '' WHERE job_id = (SELECT id FROM f) AND finished_at IS NULL),"
        " fd AS (DELETE FROM django_q_ormq WHERE id = %s AND EXISTS (SELECT 1 FROM f))"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)", source="f", prefix="f")
    )
    return statement, [stored, str(job.id), worker, *quiet.params, row_id, "job.succeeded", "job.succeeded"]


@functools.cache
def _quoted(kinds: tuple[str, ...]) -> str:
    # Literals rather than an array parameter: psycopg builds a list dumper per
    # array parameter and execution. (standard_conforming_strings is on.)
    return ", ".join("'" + kind.replace("'", "''") + "'" for kind in kinds)


def _look_after_unclaimed(job_id: str) -> None:
    """The delivery did not claim the job: it may be the watchdog of a running one."""
    job = Job.objects.filter(id=job_id).only("state", "lease_expires_at", "queue", "timeout").first()
    if job is None or job.state != State.RUNNING:
        return  # duplicate delivery of a finished or not-yet-due job
    if job.lease_expires_at and job.lease_expires_at <= timezone.now():
        rescue_job(job.id)
    else:
        # The worker is alive: look again when its lease would run out.
        with transaction.atomic():
            broker.enqueue(
                job.id, queue=job.queue, timeout=job.timeout, run_at=job.lease_expires_at + timedelta(seconds=1)
            )


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
            _to_retrying(job, owner_where=expired, delay=delay, error=("WorkerLost", message, ""), attempt=lost)
        else:
            transition(
                job.id, target=State.DEAD, where=expired, attempt=lost, **_ended(), **_error("WorkerLost", message, "")
            )
    log.warning("job %s: rescued after its lease expired (%s)", job_id, message)
    return True


def rescue_expired(limit: int = 500) -> int:
    """The periodic sweep (a Django-Q2 schedule): rescue every running job whose
    lease has expired. The broker's redelivery normally gets there first."""
    grace = timezone.now() - timedelta(seconds=1)
    ids = list(Job.objects.filter(state=State.RUNNING, lease_expires_at__lt=grace).values_list("id", flat=True)[:limit])
    return sum(rescue_job(job_id) for job_id in ids)


# --- finishing ------------------------------------------------------------


def _mine(worker: str) -> Sql:
    return Sql("lease_owner = %s", worker)


def _ended() -> dict[str, Any]:
    return {"finished_at": Sql("now()"), "lease_owner": "", "lease_expires_at": None}


def _error(error_type: str, message: str, tb: str) -> dict[str, Any]:
    return {"error_type": error_type[:200], "error_message": message, "error_traceback": tb}


def _finish_succeeded(job: Job, worker: str, result: Any, *, output: str | None = None, ack: int | None = None) -> None:
    done = transition(
        job.id,
        target=State.SUCCEEDED,
        source=frozenset({State.RUNNING}),
        where=_mine(worker),
        attempt=close_attempt(Attempt.Outcome.SUCCEEDED, output=output or None),
        ack=ack,
        result=result,
        progress_percent=100,
        **_ended(),
        **_error("", "", ""),
    )
    if not done:
        log.warning("job %s: finished, but it was no longer ours (lease lost); result dropped", job.id)


def _finish_cancelled(job: Job, worker: str, *, ack: int | None = None) -> None:
    transition(
        job.id,
        target=State.CANCELLED,
        where=_mine(worker),
        ack=ack,
        attempt=close_attempt(Attempt.Outcome.CANCELLED, error_type="Cancelled", message="cancelled by an operator"),
        **_ended(),
    )


def _finish_failed(job: Job, worker: str, exc: Exception, *, output: str | None = None, ack: int | None = None) -> None:
    error_type = type(exc).__name__
    message = str(exc) or error_type
    tb = "".join(traceback.format_exception(exc))
    failed = close_attempt(Attempt.Outcome.FAILED, error_type=error_type, message=message, tb=tb, output=output or None)
    decision = retries.decide(
        exc, attempts=job.attempts, max_attempts=job.max_attempts, base=job.backoff_base, maximum=job.backoff_max
    )
    if decision.retry:
        with transaction.atomic():
            _to_retrying(
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
            **_ended(),
            **_error(error_type, message, tb),
        )


def _to_retrying(
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


class _Leases:
    """Renews the leases of this process's running (sync) jobs on one thread
    of the process (with its own database connection), each every third of a
    lease from its start, and sets a job's `lost` event when its renewal
    matches nothing. One thread for the process's life rather than one per
    job: starting and joining a thread cost a noop job a seventh of its time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._held: dict[UUID, tuple[str, threading.Event, float]] = {}
        self._thread: threading.Thread | None = None
        self._connected = False  # the thread has renewed since it last closed its connection
        self._sleeping_until = 0.0

    def hold(self, job_id: UUID, worker: str, lost: threading.Event) -> None:
        with self._lock:
            due = time.monotonic() + lease_seconds() / 3
            self._held[job_id] = (worker, lost, due)
            if self._thread is None or not self._thread.is_alive():  # a forked child has no thread yet
                self._thread = threading.Thread(target=self._run, name="conveyor-leases", daemon=True)
                self._thread.start()
            elif due < self._sleeping_until:
                self._wake.set()

    def release(self, job_id: UUID) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            if not self._held and self._connected:
                self._wake.set()  # to give the connection back

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                due = [(job_id, worker, lost) for job_id, (worker, lost, at) in self._held.items() if at <= now]
            for job_id, worker, lost in due:
                self._renew(job_id, worker, lost)
            with self._lock:
                self._wake.clear()
                next_at = min((at for _, _, at in self._held.values()), default=None)
                idle = next_at is None
                # Idle, it sleeps no longer than a new job's first renewal is
                # due: holding a job then never has to wake it.
                self._sleeping_until = next_at = time.monotonic() + lease_seconds() / 3 if idle else next_at
            if idle and self._connected:
                # Nothing held: give the connection back until a long job needs one.
                self._connected = False
                close_old_connections()
                connection.close()
            self._wake.wait(next_at - time.monotonic())

    def _renew(self, job_id: UUID, worker: str, lost: threading.Event) -> None:
        interval = lease_seconds() / 3
        self._connected = True
        try:
            renewed = Job.objects.filter(id=job_id, state=State.RUNNING, lease_owner=worker).update(
                lease_expires_at=Now() + timedelta(seconds=lease_seconds())
            )
        except DatabaseError as exc:
            # Postgres restarting: try again on a new connection at the next
            # beat. If the outage outlasts the lease, the job is rescued and
            # the next renewal matches nothing.
            log.warning("job %s: lease renewal failed (%s); retrying", job_id, exc)
            connection.close()
            renewed = 1
        except Exception:  # noqa: BLE001 - a failed renewal must not stop the thread; the lease decides
            log.exception("job %s: lease renewal failed; retrying", job_id)
            renewed = 1
        with self._lock:
            if job_id not in self._held:
                return  # finished meanwhile
            if renewed:
                self._held[job_id] = (worker, lost, time.monotonic() + interval)
                return
            del self._held[job_id]
        lost.set()


_leases = _Leases()
