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

import collections
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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, close_old_connections, connection, connections, transaction
from django.db.models.functions import Now
from django.utils import timezone
from django_q.conf import Conf
from django_q.exceptions import TimeoutException
from django_q.signals import pre_execute

from config.logs import job_log_context
from jobs.db import events, sql
from jobs.db.durability import engine_statements, handler_writes, relax_commit_durability
from jobs.djangoq import broker
from jobs.engine import retries
from jobs.engine.registry import async_kinds, get_handler, sync_kinds
from jobs.engine.states import ALLOWED, OPEN_ATTEMPT, Sql, close_attempt, state_literals, transition
from jobs.errors import Cancelled, LeaseLost
from jobs.models import Attempt, Job, State
from jobs.webhooks import endpoints as webhooks
from jobs.worker.lane import get_lane

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
        with engine_statements(), sql.cursor() as cursor:
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
        with engine_statements():
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
    claimed = time.monotonic()
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
    began = time.monotonic() - claimed
    outcome, value = _execute(job, handler, worker)
    if outcome == "lost":
        _record(job, worker, outcome, value, ack=None)
        return  # the monitor acknowledges the delivery
    if delivery.task is not None and threading.current_thread() is threading.main_thread():
        # A Django-Q2 worker, under its alarm.
        took = time.monotonic() - claimed
        _run_chain(job, worker, started, outcome, value, ack=delivery.ack_id, began=began, took=took)
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
            payload = handler.parse(job.payload)
            with handler_writes():
                return "succeeded", _storable(handler.func(ctx, payload))
        except Cancelled:
            return "cancelled", None
        except LeaseLost:
            return "lost", None
        except Exception as exc:  # noqa: BLE001 - every handler error becomes a retry or a dead job
            return "failed", exc
        finally:
            _handler_done(job.id)
            with contextlib.suppress(DatabaseError):  # then the outcome's own statement fails, and says so
                relax_commit_durability()  # the handler may have restored the server's setting


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


@dataclass
class _Ran:
    """A job a chain ran whose success is not recorded yet: `began` and `took`
    are the seconds from the moment its claim's answer arrived to its
    handler's start and end."""

    job: Job
    row: int
    value: Any
    began: float
    took: float


def _run_chain(
    delivered: Job, worker: str, started: float, outcome: str, value: Any, *, ack: int | None, began: float, took: float
) -> int:
    """Record the delivered job's outcome, then run more ready jobs of the
    queue's sync kinds on this delivery for about CONVEYOR_CHAIN_SECONDS,
    claimed straight through their broker rows; returns how many more ran.

    1. Claim a batch of ready jobs (one statement, at most CONVEYOR_CHAIN_BATCH),
       in the statement that records the previous batch's successes.
    2. Run its jobs one after another. A failure, a cancellation, and a success
       that asks for a webhook message are recorded at once by the usual
       transition; other successes wait for step 1's next statement, their
       leases renewed meanwhile as a running job's are.
    3. Size the next batch from how long these jobs took: twice as many at
       most, and no more than fit in about 20 ms (`_BATCH_WINDOW`). A chain of
       slow jobs claims them one at a time.

    A job then costs a fraction of one statement, where a delivery costs two
    plus a trip through Django-Q2 (the pusher's claim, its task queue, the
    worker's hand-off, the monitor).

    Rows are claimed as the broker's claim would (visible, SKIP LOCKED,
    priority then FIFO) and get the broker's visibility timeout, so if this
    process dies they are delivered again and find their leases expired, as for
    any delivery. Django-Q2 limits this task's time to the delivered job's
    timeout (its alarm, and its guard a few seconds later), so a job only
    starts if its own timeout ends within that, and it runs under an alarm of
    its own timeout. A job of a batch that has not started CONVEYOR_CHAIN_SECONDS
    after its claim (behind a slow one, or past the timeout bound) goes back to
    the queue unstarted (`_Batch`, `_release`)."""
    chain = _Chain(delivered, worker, started)
    return chain.run(_Ran(delivered, ack, value, began, took) if ack is not None else None, outcome, value)


# A batch's jobs are meant to be done within this many seconds of its claim:
# the next batch is sized from the last one's run times to fit.
_BATCH_WINDOW = 0.02


class _Chain:
    def __init__(self, delivered: Job, worker: str, started: float) -> None:
        self.delivered = delivered
        self.worker = worker
        self.started = started
        self.seconds = settings.CONVEYOR["CHAIN_SECONDS"]
        self.most = settings.CONVEYOR["CHAIN_BATCH"]
        self.deadline = started + self.seconds
        self.kinds = sync_kinds()
        self.key = broker.cluster_for_queue(delivered.queue)
        self.quiet = webhooks.quiet_condition(State.SUCCEEDED) is not None
        # Pending jobs hold leases nobody renews: they must start well within one.
        self.patience = min(self.seconds, lease_seconds() / 3)

    def run(self, first: _Ran | None, outcome: str, value: Any) -> int:
        done: list[_Ran] = []
        if first is not None and outcome == "succeeded" and self.quiet:
            done.append(first)
            size = self._next_size(1, first.took - first.began, 1)
        else:
            _record(self.delivered, self.worker, outcome, value, ack=first.row if first else None)
            size = 1
        ran = 0
        try:
            while True:
                rows = self._record_and_claim(done, size)
                claimed = time.monotonic()
                done = []
                if not rows:
                    return ran
                batch = _Batch(rows, self.worker, claimed + self.patience)
                spent = self._run_batch(batch, claimed, done)
                ran += len(rows) - len(batch.released)
                size = self._next_size(size, spent, len(rows) - len(batch.released))
        except BaseException:
            # Django-Q2's alarm (or a failed statement) ends the chain: record
            # what already succeeded rather than leave it to be rescued and rerun.
            if done:
                with contextlib.suppress(DatabaseError):
                    self._record_and_claim(done, 0)
            raise

    def _run_batch(self, batch: _Batch, claimed: float, done: list[_Ran]) -> float:
        """Run the batch's jobs; returns the seconds their handlers took."""
        spent = 0.0
        _leases.watch(batch)
        try:
            for job, row in iter(batch.next, None):
                if job.timeout > self._left():
                    batch.put_back(job, row)
                    break
                began = time.monotonic() - claimed
                with _alarm(job.timeout):
                    outcome, value = _execute(job, get_handler(job.kind), self.worker)
                took = time.monotonic() - claimed
                spent += took - began
                if outcome == "succeeded" and self.quiet:
                    # Recorded with the next claim: until then its lease is
                    # renewed, or a slow batch-mate would outlast it and the
                    # sweep would rescue and rerun a job that succeeded.
                    _leases.hold(job.id, self.worker, threading.Event())
                    done.append(_Ran(job, row, value, began, took))
                else:
                    _record(job, self.worker, outcome, value, ack=row)
        finally:
            _leases.unwatch(batch)
            batch.release_rest()
        return spent

    def _left(self) -> int:
        """Whole seconds left before Django-Q2's guard stops this task, less a
        margin: it stops the process about 3 s after the delivered job's
        timeout, and a job's own timeout must end 2 s before that."""
        return int(self.delivered.timeout + 1 - (time.monotonic() - self.started))

    def _next_size(self, size: int, spent: float, count: int) -> int:
        if count <= 0:
            return 1
        fit = min(2 * size, self.most, int(_BATCH_WINDOW / max(spent / count, 1e-6)))
        return 1 << (max(fit, 1).bit_length() - 1)  # a power of two: few statement texts to prepare

    def _record_and_claim(self, done: list[_Ran], size: int) -> list[tuple]:
        """Record `done` and claim up to `size` more jobs in one statement;
        what that statement could not record (it asks for a webhook message
        after all, or is no longer ours) goes through the usual transition."""
        left = self._left()
        claim = size if self.seconds and self.kinds and time.monotonic() < self.deadline and left >= 1 else 0
        if not claim and not done:
            return []
        try:
            try:
                rows, finished = _claim_ready(
                    self.key,
                    self.worker,
                    claim,
                    self.kinds or [""],
                    rearm=_VISIBLE_AGAIN,
                    max_timeout=left,
                    finish=done or None,
                )
            except DatabaseError as exc:  # nothing claimed: the rows are delivered as usual
                log.warning("could not claim the next jobs (%s)", exc)
                rows, finished = [], set()
            for item in done:
                if item.job.id not in finished:
                    _record(item.job, self.worker, "succeeded", item.value, ack=item.row)
        finally:
            # Recorded, or the recording failed: then the lease must run out
            # so the job is rescued, rather than stay renewed for ever.
            for item in done:
                _leases.release(item.job.id)
        return rows


class _Batch:
    """The jobs one claim took for this worker, started one after another.

    What has not started by `due` goes back to the queue (`_release`): the
    main thread checks between two jobs, and the lease thread while a job
    runs, so a slow job never holds the rest of its batch for longer than
    that. The lock makes each job either started or given back, never both."""

    def __init__(self, rows: list[tuple], worker: str, due: float) -> None:
        self.worker = worker
        self.due = due
        self.released: list[tuple[Job, int]] = []
        self._lock = threading.Lock()
        self._pending = collections.deque((sql.job_from_row(row), row[-1]) for row in rows)

    def next(self) -> tuple[Job, int] | None:
        with self._lock:
            if self._pending and time.monotonic() < self.due:
                return self._pending.popleft()
            return None

    def put_back(self, job: Job, row: int) -> None:
        with self._lock:
            self._pending.appendleft((job, row))

    def release_rest(self) -> None:
        with self._lock:
            rest = list(self._pending)
            self._pending.clear()
            self.released += rest
        if rest:
            _release(rest, self.worker)


_RELEASE = (
    "WITH r AS (UPDATE jobs_job SET state = 'queued', updated_at = now(), attempts = attempts - 1,"
    " lease_owner = '', lease_expires_at = NULL, started_at = NULL WHERE id = ANY(%s::uuid[])"
    " AND state = 'running' AND lease_owner = %s AND cancel_requested_at IS NULL RETURNING id, queue, state, attempts),"
    " ra AS (DELETE FROM jobs_attempt USING r WHERE jobs_attempt.job_id = r.id AND jobs_attempt.finished_at IS NULL),"
    " rb AS (UPDATE django_q_ormq SET lock = now() FROM r"
    " WHERE django_q_ormq.id = ANY(%s::bigint[]) AND django_q_ormq.job_id = r.id RETURNING django_q_ormq.key),"
    f" rn AS (SELECT pg_notify('{broker.CHANNEL}', key) FROM (SELECT DISTINCT key FROM rb) AS k)"
    + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts, 'reason', 'released')", source="r")
    + " SELECT (SELECT array_agg(id) FROM r), (SELECT count(*) FROM n), (SELECT count(*) FROM rn)"
)


def _release(jobs: list[tuple[Job, int]], worker: str) -> None:
    """Give back claimed jobs this worker has not started: each is `queued`
    again as if it had never been claimed (its attempt count as before, its
    open attempt row gone), with a `job.queued` event, and its broker row is
    visible again, with a wake-up for the queue's clusters. A job an operator
    asked to stop meanwhile is cancelled instead: it never started."""
    try:
        relax_commit_durability()
        ids = [job.id for job, _ in jobs]
        released = set(
            sql.fetchone(_RELEASE, [ids, worker, [row for _, row in jobs], "job.queued", "job.queued"])[0] or ()
        )
        for job, row in jobs:
            if job.id not in released:
                transition(
                    job.id,
                    target=State.CANCELLED,
                    where=Sql("lease_owner = %s AND cancel_requested_at IS NOT NULL", worker),
                    ack=row,
                    attempt=close_attempt(
                        Attempt.Outcome.CANCELLED, error_type="Cancelled", message="cancelled before it started"
                    ),
                    **_ended(),
                )
    except DatabaseError as exc:
        # They stay claimed under leases nobody renews: rescued once those expire.
        log.warning("could not give back %d unstarted jobs (%s)", len(jobs), exc)


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
    finish: list[_Ran] | None = None,
) -> tuple[list[tuple], set[UUID]]:
    """The claim of `_claim` for up to `limit` ready jobs of `kinds` through
    their visible broker rows of `key`, in the broker's order (priority, then
    FIFO): the rows of `job_columns()` plus the id of each job's broker row,
    set by `rearm`.

    `finish`: in the same statement, record these jobs' successes as
    `_finish_succeeded` would, those still this worker's that ask for no
    webhook message (the ids of those it recorded come back second)."""
    columns = sql.job_columns()[0]
    names = columns.split(", ")
    qualified = ", ".join(f"jobs_job.{column}" for column in names)
    ready = state_literals(ALLOWED[State.RUNNING])
    parts, params = ["WITH "], []
    if finish:
        finishing, finish_params = _quiet_successes(finish, worker)
        parts.append(finishing + ", ")
        params += finish_params
    params += [key, worker, lease_seconds()]
    within = ""
    if max_timeout is not None:
        within = " AND jobs_job.timeout <= %s"
        params.append(max_timeout)
    if rearm == _VISIBLE_AGAIN:
        params.append(Conf.RETRY)
    # The limit is part of the text (one prepared statement per limit): bound
    # as a parameter, the generic plan expects 100 rows and joins them back to
    # jobs_job and django_q_ormq by sequential scans, so Postgres planned a
    # custom plan each time instead, which took longer than the claim itself.
    parts.append(
        "picked AS (SELECT id AS row_id, job_id, lock AS ready_at FROM django_q_ormq"
        " WHERE key = %s AND lock <= now() AND job_id IS NOT NULL"
        f" ORDER BY priority DESC, lock, id LIMIT {int(limit)} FOR UPDATE SKIP LOCKED),"
        " j AS (UPDATE jobs_job SET state = 'running', updated_at = now(), attempts = attempts + 1,"
        " lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s), started_at = now(),"
        " cancel_requested_at = NULL FROM picked WHERE jobs_job.id = picked.job_id"
        f" AND jobs_job.state IN ({ready}) AND (jobs_job.run_after IS NULL OR jobs_job.run_after <= now())"
        f" AND jobs_job.kind IN ({_quoted(tuple(kinds))}){within}"
        f" RETURNING {qualified}, picked.ready_at, picked.row_id),"
        f" a AS ({OPEN_ATTEMPT.expression}),"
        f" w AS (UPDATE django_q_ormq SET lock = {rearm} FROM j WHERE django_q_ormq.id = j.row_id)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)")
    )
    params += ["job.started", "job.started"]
    claimed = ", ".join(f"j.{column}" for column in names)
    order = " ORDER BY j.priority DESC, j.ready_at, j.row_id"
    if not finish:
        parts.append(f" SELECT {claimed}, j.row_id FROM j, (SELECT count(*) FROM n) AS notified{order}")
    else:
        # One row even when nothing was claimed: it says which jobs finished.
        parts.append(
            f" SELECT {claimed}, j.row_id, finished.ids FROM (SELECT array_agg(id) AS ids FROM f) AS finished"
            " LEFT JOIN j ON true, (SELECT count(*) FROM n) AS notified, (SELECT count(*) FROM fn) AS f_notified"
            + order
        )
    with sql.cursor() as cursor:
        cursor.execute("".join(parts), params)
        rows = cursor.fetchall()
    if not finish:
        return rows, set()
    return [row[:-1] for row in rows if row[-2] is not None], set(rows[0][-1] or ()) if rows else set()


def _quiet_successes(done: list[_Ran], worker: str) -> tuple[str, list[Any]]:
    """CTEs (v, f, fa, fd, fe, fn) that record the successes of `done` as
    `_finish_succeeded` does, and delete their broker rows, for the jobs still
    this worker's that need no webhook message (`webhooks.quiet_condition`).

    Their times are those the worker measured, counted from the claim's
    `started_at`: a batch's successes are written together, after its last
    job, and one statement's now() would give them all the same end. The
    offsets start when the claim's answer arrived, a little after Postgres
    took the claim's now(), so the times are that little early, all by the
    same amount: their order and run times are as measured."""
    quiet = webhooks.quiet_condition(State.SUCCEEDED)
    db = connections[DEFAULT_DB_ALIAS]
    field = Job._meta.get_field("result")
    statement = (
        "v AS (SELECT * FROM unnest(%s::uuid[], %s::jsonb[], %s::float8[], %s::float8[], %s::bigint[])"
        " AS v(id, result, began, took, row_id)),"
        " f AS (UPDATE jobs_job SET state = 'succeeded', updated_at = now(), result = v.result, progress_percent = 100,"
        # Never past now() (a clock that jumped), the measured run time kept.
        " started_at = greatest(jobs_job.started_at, least(jobs_job.started_at + make_interval(secs => v.took), now())"
        " - make_interval(secs => v.took - v.began)),"
        " finished_at = least(jobs_job.started_at + make_interval(secs => v.took), now()),"
        " lease_owner = '', lease_expires_at = NULL, error_type = '', error_message = '', error_traceback = ''"
        " FROM v WHERE jobs_job.id = v.id AND jobs_job.state = 'running' AND jobs_job.lease_owner = %s"
        f" AND ({quiet.expression}) RETURNING jobs_job.id, jobs_job.queue, jobs_job.state, jobs_job.attempts,"
        " jobs_job.started_at, jobs_job.finished_at, v.row_id),"
        " fa AS (UPDATE jobs_attempt SET started_at = f.started_at, finished_at = f.finished_at,"
        " outcome = 'succeeded', error_type = '', error_message = '', traceback = ''"
        " FROM f WHERE jobs_attempt.job_id = f.id AND jobs_attempt.finished_at IS NULL),"
        " fd AS (DELETE FROM django_q_ormq USING f WHERE django_q_ormq.id = f.row_id)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'attempts', attempts)", source="f", prefix="f")
    )
    params = [
        [item.job.id for item in done],
        [field.get_db_prep_save(item.value, db) for item in done],
        [item.began for item in done],
        [item.took for item in done],
        [item.row for item in done],
        worker,
        *quiet.params,
        "job.succeeded",
        "job.succeeded",
    ]
    return statement, params


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
    """Renews the leases of this process's running (sync) jobs, and of chained
    jobs that succeeded and wait to be recorded, on one thread
    of the process (with its own database connection), each every third of a
    lease from its start, and sets a job's `lost` event when its renewal
    matches nothing. One thread for the process's life rather than one per
    job: starting and joining a thread cost a noop job a seventh of its time.

    It also watches the chain's current batch (`watch`): if the batch still has
    unstarted jobs when it is due, the thread gives them back, so a job that
    runs long does not hold the rest of its batch. It sleeps until that time
    and is woken only when a batch falls due before it would wake anyway:
    about once per CONVEYOR_CHAIN_SECONDS while chains run, not once a batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._held: dict[UUID, tuple[str, threading.Event, float]] = {}
        self._thread: threading.Thread | None = None
        self._connected = False  # the thread has used its connection since it last closed it
        self._sleeping_until = 0.0
        self._batch: _Batch | None = None

    def hold(self, job_id: UUID, worker: str, lost: threading.Event) -> None:
        with self._lock:
            due = time.monotonic() + lease_seconds() / 3
            self._held[job_id] = (worker, lost, due)
            self._wake_by(due)

    def watch(self, batch: _Batch) -> None:
        with self._lock:
            self._batch = batch
            self._wake_by(batch.due)

    def unwatch(self, batch: _Batch) -> None:
        with self._lock:
            if self._batch is batch:
                self._batch = None

    def _wake_by(self, due: float) -> None:
        """Call with the lock held: make sure the thread runs by `due`."""
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
            batch = self._batch
            if batch is not None and batch.due <= time.monotonic():
                self._connected = True
                batch.release_rest()
            with self._lock:
                self._wake.clear()
                next_at = min((at for _, _, at in self._held.values()), default=None)
                batch = self._batch
                if batch is not None and batch.due > time.monotonic():
                    next_at = batch.due if next_at is None else min(next_at, batch.due)
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
            # Postgres restarting: the lease still ends when it did, so try
            # again soon on a new connection, not a whole beat later. If the
            # outage outlasts the lease, the job is rescued and the next
            # renewal matches nothing.
            log.warning("job %s: lease renewal failed (%s); retrying", job_id, exc)
            connection.close()
            renewed = None
        except Exception:  # noqa: BLE001 - a failed renewal must not stop the thread; the lease decides
            log.exception("job %s: lease renewal failed; retrying", job_id)
            renewed = None
        with self._lock:
            if job_id not in self._held:
                return  # finished meanwhile
            if renewed is None:
                self._held[job_id] = (worker, lost, time.monotonic() + min(interval, _RENEWAL_RETRY))
                return
            if renewed:
                self._held[job_id] = (worker, lost, time.monotonic() + interval)
                return
            del self._held[job_id]
        lost.set()


# Seconds before a renewal that failed is tried again.
_RENEWAL_RETRY = 0.5


_leases = _Leases()
