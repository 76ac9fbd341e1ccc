"""The asyncio lane: many I/O-bound jobs in flight inside one worker process.

A Django-Q2 worker process runs one task at a time. For handlers written as
`async def` (LLM calls that wait seconds on the network), the runner claims
the job as usual and then hands it to this process's lane: an event loop on a
background thread that runs up to `CONVEYOR_LANE_CAPACITY` jobs at once. The
hand-off blocks while the lane is full, so a busy process stops taking
deliveries and its cluster's other workers (or other hosts) get them.

Everything that makes a job safe stays the same:
- the claim, the attempt row and every finishing transition are the runner's.
  A delivery that hands a job over also claims, in one statement, more ready
  jobs of async kinds for the lane's free places (`claims.fill_lane`), so a
  backlog fills the lane at once rather than one Django-Q2 delivery at a time;
- leases are renewed for all in-flight jobs in one UPDATE per interval; a job
  whose renewal matches nothing (cancelled, or rescued after a stall) has its
  task cancelled. A job a delivery claimed while the lane was full has its
  lease renewed in the same UPDATE while the delivery waits for a place, and
  is not started if that found it lost;
- the worker is done with the delivery at hand-off, so a broker row is armed
  for the lease's end instead (the runner's usual "look again" delivery): if
  the process dies, that delivery finds the lease expired and rescues the job.
  The claim itself arms it, re-arming the delivery's own row (no extra round
  trip); rows of finished jobs are deleted in one statement per 250 ms;
- progress reports are coalesced: the latest report of each job is written
  every 250 ms in one statement, with the text streamed since the last one
  (a `job.output` event) and the lines logged since (a `job.log` event), so
  streaming output does not make the database the bottleneck;
- successes are written in batches (`_succeed`): their successes in one
  statement (`states.succeed_many`), which also writes the text and log lines
  each job had not yet sent (its `job.output` and `job.log` events, ahead of
  `job.succeeded`); only jobs with a progress report due have their last
  reports written first, in one statement. A job the success statement did
  not move (lease lost, a hook must hear of it alone) goes through
  `finish_succeeded`;
- on exit (recycle or cluster stop) the process waits for in-flight jobs.

Database work runs on executor threads, each with its own Django connection
(Django's ORM is synchronous): the lane's claims, flushes and renewals on one,
in order; the handlers' `ctx.run_db` on HANDLER_DB_THREADS; outcomes on
FINISH_DB_THREADS, each after any flush in progress. While a delivery's fill
found a backlog, the lane claims the queue's next ready jobs itself as places
free (`_refill`), rather than one Django-Q2 delivery per place.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import util as mp_util
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError

from config.logs import job_log_contextvars
from jobs.db.durability import handler_writes, relax_commit_durability
from jobs.djangoq import broker
from jobs.engine import dependencies
from jobs.engine.states import LaneSuccess, succeed_many
from jobs.errors import Cancelled, LeaseLost
from jobs.worker.execute import storable
from jobs.worker.finish import finish_cancelled, finish_failed, finish_succeeded
from jobs.worker.heartbeat import Progress, record_progress, renew_leases
from jobs.worker.joblogs import JobLog, start_capture

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
# Threads (each with its own connection) for the handlers' database work
# (`ctx.run_db`: a provider's limits, a page to store), beside the one thread
# that writes the lane's progress, renewals and outcomes in order. On that one
# thread the handlers' statements queued behind the engine's: a full lane of
# 256 LLM calls a second waited on it, not on the provider. With 3 threads a
# page's statements (a slot, then the page with the slot's release) still
# waited about a second in their queue in the 10,000-page run.
HANDLER_DB_THREADS = 8
# Threads that write jobs' outcomes (each job's last report, then its
# finishing transition, in that order). One thread finished at most about 40
# jobs a second per process, and a lane of 256 one-second calls wants 250.
FINISH_DB_THREADS = 3
# The cyclic collector's young-generation threshold in a process running a
# lane (Python's default is 700). Each of hundreds of calls in flight keeps
# what it allocated alive for seconds, past the collector's next young pass,
# so with the default it ran every few calls and walked those objects again
# and again in its older generations.
GC_THRESHOLD = 20_000
# The most text one `job.output` event carries; more waits for the next flush.
MAX_OUTPUT_DELTA = 16 * 1024

_lane: Lane | None = None
_lane_lock = threading.Lock()


def get_lane() -> Lane:
    global _lane
    with _lane_lock:
        if _lane is None:
            _lane = Lane(capacity=settings.CONVEYOR["LANE_CAPACITY"])
            _lane.start()
        return _lane


class AsyncContext:
    """What an async handler gets besides its payload."""

    def __init__(self, lane: Lane, job, worker: str) -> None:
        self._lane = lane
        self.job_id = job.id
        self.kind = job.kind
        self.queue = job.queue
        self.attempt = job.attempts
        self.batch_id = job.batch_id
        self.worker = worker
        self.output = ""  # text produced so far (kept in the attempt if it fails)
        self.sent = 0  # how much of `output` went out in `job.output` events
        self.joblog = JobLog()
        self.percent = job.progress_percent
        self.message = job.progress_message
        self.cancel_reason: str | None = None

    def report_progress(self, percent: int, message: str = "", *, output: str | None = None) -> None:
        """Record progress; written (coalesced) within FLUSH_SECONDS. Streaming
        handlers pass the text produced so far as `output`."""
        if self.cancel_reason:
            raise Cancelled(self.cancel_reason) if self.cancel_reason == "cancelled" else LeaseLost(self.cancel_reason)
        if output is not None:
            self.output = output
        self.percent, self.message = max(0, min(100, int(percent))), message[:500]
        self._lane.pending[self.job_id] = (self.percent, self.message, self)

    def log(self, message: str, level: int = logging.INFO) -> None:
        """A line for the job's log (as a `logging` call inside the job would give)."""
        self.joblog.log(message, level)

    def unsent(self) -> bool:
        return self.sent != len(self.output) or self.joblog.changed

    async def run_db(self, func, *args, **kwargs):
        """Run synchronous ORM code on one of the lane's handler database
        threads (committing with the server's durability, not the lane's own)."""
        return await self._lane._handler_db(_handlers, func, *args, **kwargs)

    async def dependency_results(self) -> dict[str, Any]:
        """{dependency job id: its result} (`await ctx.dependency_results()`)."""
        return await self.run_db(dependencies.dependency_results, self.job_id)

    async def batch_counts(self) -> dict[str, Any] | None:
        """A batch's `then` job: the batch's counts (`await ctx.batch_counts()`); None otherwise."""
        return await self.run_db(dependencies.batch_counts, self.job_id)

    def check_cancelled(self) -> None:
        if self.cancel_reason == "cancelled":
            raise Cancelled("cancelled by an operator")
        if self.cancel_reason:
            raise LeaseLost(self.cancel_reason)


class _Waiting:
    """A claimed job whose delivery waits for a place in the full lane."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.lost = False  # its renewal matched nothing: someone else has it now


class Lane:
    def __init__(self, *, capacity: int) -> None:
        self.capacity = capacity
        self.slots = threading.BoundedSemaphore(capacity)
        self.loop = asyncio.new_event_loop()
        self.db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lane-db")
        self.handler_db = ThreadPoolExecutor(max_workers=HANDLER_DB_THREADS, thread_name_prefix="lane-handler-db")
        self.finish_db = ThreadPoolExecutor(max_workers=FINISH_DB_THREADS, thread_name_prefix="lane-finish-db")
        # Set while no progress flush is being written: a finish waits for it,
        # so a job's last reported text is written before its outcome.
        self.flush_idle: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run_loop, name="conveyor-lane", daemon=True)
        self.tasks: dict[UUID, tuple[asyncio.Task, AsyncContext]] = {}
        self.waiting: dict[UUID, _Waiting] = {}
        self.watchdogs: dict[UUID, int] = {}
        self.disarm: list[int] = []
        # Latest report of each job, or None for one with only new log lines.
        self.pending: dict[UUID, tuple[int, str, AsyncContext] | None] = {}
        self.stopping = False
        # How to claim more ready jobs for free places (set by the runner from
        # a delivery: claims.fill_lane for its queue); None once a fill found none.
        self.refill: Callable[[], int] | None = None
        self.refilling = False
        # Successes waiting for a writer (`_succeed`), and how many write.
        self.successes: list[tuple[Any, AsyncContext, Any, asyncio.Future]] = []
        self.writers = 0

    # --- worker thread side ---------------------------------------------------

    def start(self) -> None:
        # The cyclic collector's young generation: see GC_THRESHOLD.
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._housekeeping(), self.loop)
        # Runs when the worker process exits (Django-Q2 recycles or stops it).
        mp_util.Finalize(self, self.drain, exitpriority=100)

    def submit(self, job, handler, worker: str, *, watchdog_id: int | None = None, reserved: bool = False) -> None:
        """Run a claimed job in the lane; blocks while the lane is full (unless
        its place was `reserve`d). `watchdog_id`: the broker row the claim armed
        (see claims._lane_watchdog)."""
        waiting = None
        if not reserved and not self.slots.acquire(blocking=False):
            # The job is claimed already: its lease is renewed with the lane's
            # while it waits, or the sweep would rescue it and this copy run too.
            waiting = self.waiting[job.id] = _Waiting(worker)
            try:
                self.slots.acquire()
            finally:
                self.waiting.pop(job.id, None)
        self.loop.call_soon_threadsafe(self._start_task, job, handler, worker, watchdog_id, waiting)

    def reserve(self, most: int) -> int:
        """Take up to `most` free places without waiting; returns how many.
        Each is then used by a `submit(..., reserved=True)` or given back."""
        taken = 0
        while taken < most and self.slots.acquire(blocking=False):
            taken += 1
        return taken

    def unreserve(self, count: int) -> None:
        for _ in range(count):
            self.slots.release()

    def drain(self, timeout: float = 60.0) -> None:
        """Wait for in-flight jobs (used at process exit)."""
        self.stopping = True
        future = asyncio.run_coroutine_threadsafe(self._wait_idle(timeout), self.loop)
        try:
            future.result(timeout + 5)
        except Exception:  # noqa: BLE001 - leases of what is left expire and are rescued
            log.warning("lane: %d jobs still in flight at exit; their leases will expire", len(self.tasks))

    # --- loop side ------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _start_task(self, job, handler, worker: str, watchdog_id: int | None, waiting: _Waiting | None = None) -> None:
        if waiting is not None and waiting.lost:
            # Its lease lapsed or it was cancelled while it waited: it is not ours to run.
            log.warning("job %s: lost its lease while waiting for a place in the lane; not started", job.id)
            self.slots.release()
            return
        ctx = AsyncContext(self, job, worker)
        ctx.joblog.on_add = lambda: self.pending.setdefault(job.id, None)
        # Its own context: the task's log lines carry its job's fields.
        task = self.loop.create_task(self._run_job(job, handler, ctx), context=job_log_contextvars(job))
        self.tasks[job.id] = (task, ctx)
        if watchdog_id is not None:
            self.watchdogs[job.id] = watchdog_id

    async def _db(self, func, *args, **kwargs):
        return await self.loop.run_in_executor(self.db, lambda: _in_db_thread(func, *args, **kwargs))

    async def _handler_db(self, func, *args, **kwargs):
        return await self.loop.run_in_executor(self.handler_db, lambda: _in_db_thread(func, *args, **kwargs))

    async def _finish_db(self, func, *args, **kwargs):
        return await self.loop.run_in_executor(self.finish_db, lambda: _in_db_thread(func, *args, **kwargs))

    def _idle_event(self) -> asyncio.Event:
        if self.flush_idle is None:  # created on the loop's thread
            self.flush_idle = asyncio.Event()
            self.flush_idle.set()
        return self.flush_idle

    def close_connections(self, timeout: float = 10) -> None:
        """Close the connection of every lane database thread (the engine's and
        each handler thread's), from outside the lane; used when it is idle."""
        from django.db import connections

        self.db.submit(connections.close_all).result(timeout)
        for pool, threads in ((self.handler_db, HANDLER_DB_THREADS), (self.finish_db, FINISH_DB_THREADS)):
            # One task per thread: each waits at the barrier until all are
            # taken, so no thread runs two and every thread closes its own.
            barrier = threading.Barrier(threads)

            def close(barrier=barrier) -> None:
                barrier.wait(timeout)
                connections.close_all()

            for future in [pool.submit(close) for _ in range(threads)]:
                future.result(timeout + 5)

    async def _run_job(self, job, handler, ctx: AsyncContext) -> None:
        start_capture(ctx.joblog)  # this task's context: its log records are the job's
        try:
            try:
                payload = handler.parse(job.payload)
                result = storable(await handler.func(ctx, payload))
            except asyncio.CancelledError:
                if ctx.cancel_reason == "cancelled":
                    await self._finish(finish_cancelled, job, ctx.worker, logs=_logs(ctx))
                else:
                    log.warning("job %s: lease lost in the lane (%s)", job.id, ctx.cancel_reason)
                return
            except Cancelled:
                await self._finish(finish_cancelled, job, ctx.worker, logs=_logs(ctx))
                return
            except LeaseLost:
                log.warning("job %s: lease lost in the lane", job.id)
                return
            except Exception as exc:  # noqa: BLE001 - every handler error becomes a retry or a dead job
                await self._finish(finish_failed, job, ctx.worker, exc, output=ctx.output, logs=_logs(ctx))
                return
            await self._succeed(job, ctx, result)
        finally:
            self.tasks.pop(job.id, None)
            self.pending.pop(job.id, None)
            watchdog = self.watchdogs.pop(job.id, None)
            if watchdog is not None:
                self.disarm.append(watchdog)
            self.slots.release()
            if self.refill is not None and not self.refilling and not self.stopping:
                self.refilling = True
                self.loop.create_task(self._refill())

    async def _refill(self) -> None:
        """Fill the places jobs leave with the queue's next ready jobs, at once,
        while there are some. Otherwise a place waited for a Django-Q2 delivery
        (pusher, task queue, a worker blocked on the full lane), and a backlog
        of thousands ran at the rate of deliveries, not of the lane."""
        try:
            while self.refill is not None and not self.stopping:
                if not self.reserve(1):  # full: the next job to finish comes back here
                    return
                self.unreserve(1)
                refill = self.refill
                if not await self._db(refill):
                    if self.refill is refill:  # no ready job left: deliveries take over again
                        self.refill = None
                    return
        except Exception:  # noqa: BLE001 - deliveries still fill the lane
            log.exception("lane: refilling failed")
        finally:
            self.refilling = False

    async def _succeed(self, job, ctx: AsyncContext, result: Any) -> None:
        """Record a success with the others that arrive meanwhile: one writer
        (of at most FINISH_DB_THREADS) takes every success waiting and writes
        them in one statement (`_write_successes`). The job stays in `tasks`
        until then, so its lease is renewed, and cancelled if lost."""
        done = self.loop.create_future()
        self.successes.append((job, ctx, result, done))
        if self.writers < FINISH_DB_THREADS:
            self.writers += 1
            self.loop.create_task(self._write_successes())
        await done

    async def _write_successes(self) -> None:
        try:
            while self.successes:
                batch, self.successes = self.successes, []
                try:
                    await self._succeed_batch([(job, ctx, result) for job, ctx, result, _ in batch])
                except BaseException as exc:  # noqa: BLE001 - each job's task hears of it
                    for *_, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                else:
                    for *_, done in batch:
                        if not done.done():  # its task may have been cancelled meanwhile
                            done.set_result(None)
        finally:
            self.writers -= 1

    async def _succeed_batch(self, batch: list[tuple[Any, AsyncContext, Any]]) -> None:
        """As `_finish(finish_succeeded, ...)` for each job, in one statement
        for the batch (`states.succeed_many`), which also writes what each job
        had not yet sent of its text and log lines; only jobs with a progress
        report due have their last reports written first, in one statement. A
        job the success statement did not move (no longer its worker's, or a
        finish hook must hear of it alone) goes through `finish_succeeded`,
        which only matches while the lease is ours, after its unsent text."""
        await self._idle_event().wait()
        reports, unsent = {}, {}
        for job, ctx, _ in batch:
            entry = self.pending.pop(job.id, None)
            if entry is not None:
                reports[job.id] = _report(entry, ctx)
            elif ctx.unsent():
                unsent[job.id] = _report(None, ctx)
        if reports:
            with contextlib.suppress(DatabaseError):  # the outcome keeps the whole text and log anyway
                await self._finish_db(record_progress, reports)
        done = []
        for job, ctx, result in batch:
            left = unsent.get(job.id)
            tail = (
                {}
                if left is None
                else {"offset": left.offset, "delta": left.delta, "lines": left.lines, "first": left.first}
            )
            done.append(
                LaneSuccess(job.id, ctx.worker, result, ctx.output or None, _logs(ctx), job.has_dependents, **tail)
            )
        finished = await self._retrying(job_ids(batch), succeed_many, done)
        for job, ctx, result in batch:
            if job.id not in finished:
                if job.id in unsent:
                    with contextlib.suppress(DatabaseError):  # as above
                        await self._finish_db(record_progress, {job.id: unsent[job.id]})
                await self._finish(finish_succeeded, job, ctx.worker, result, output=ctx.output, logs=_logs(ctx))

    async def _finish(self, finish, job, worker, *args, **kwargs) -> None:
        # What is still buffered for this job (its last report, text and log
        # lines not yet sent) goes out ahead of the outcome, not after it.
        # A flush being written may carry this job's report: it goes first.
        await self._idle_event().wait()
        entry = self.pending.pop(job.id, None)
        ctx = self._context(job.id)
        if ctx is not None and (entry is not None or ctx.unsent()):
            with contextlib.suppress(DatabaseError):  # the outcome keeps the whole text and log anyway
                await self._finish_db(record_progress, {job.id: _report(entry, ctx)})
        await self._retrying(str(job.id), finish, job, worker, *args, **kwargs)

    async def _retrying(self, jobs: str, finish, *args, **kwargs):
        delay = FLUSH_SECONDS
        while True:
            try:
                return await self._finish_db(finish, *args, **kwargs)
            except DatabaseError as exc:
                # Postgres restarting: the outcome is known and the job still
                # in `tasks`, its lease renewed, so write it again rather than
                # leave the job to be rescued and run again. The write only
                # matches while the lease is ours; a lost lease cancels this task.
                log.warning("job %s: could not record its outcome (%s); trying again", jobs, exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def _housekeeping(self) -> None:
        """Flush coalesced progress often; renew leases every third of a lease."""
        lease = settings.CONVEYOR["LEASE_SECONDS"]
        next_renewal = self.loop.time() + lease / 3
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            try:
                if self.disarm:
                    disarm, self.disarm = self.disarm, []
                    await self._db(broker.delete_rows, disarm)
                if self.pending:
                    await self._flush()
                if (self.tasks or self.waiting) and self.loop.time() >= next_renewal:
                    waiting = dict(self.waiting)
                    owned = {job_id: entry.worker for job_id, entry in waiting.items()}
                    owned.update((job_id, ctx.worker) for job_id, (_, ctx) in self.tasks.items())
                    lost = await self._db(renew_leases, owned, lease)
                    self._cancel(lost, "lease lost")
                    for job_id in lost:
                        if job_id in waiting:  # not to be started (if it started meanwhile, it was cancelled above)
                            waiting[job_id].lost = True
                if self.loop.time() >= next_renewal:
                    next_renewal = self.loop.time() + lease / 3
            except Exception:  # noqa: BLE001 - the next round tries again; leases decide
                log.exception("lane housekeeping failed")

    def _cancel(self, job_ids, reason: str) -> None:
        for job_id in job_ids:
            entry = self.tasks.get(job_id)
            if entry and not entry[1].cancel_reason:
                entry[1].cancel_reason = reason
                entry[0].cancel()

    async def _wait_idle(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while self.tasks and self.loop.time() < deadline:
            await asyncio.sleep(0.1)
        if self.pending:
            await self._flush()

    async def _flush(self) -> None:
        """Write the pending reports (with the new output and log lines) in
        one statement. What a report could not carry (output beyond
        MAX_OUTPUT_DELTA) stays pending for the next flush."""
        batch, self.pending = self.pending, {}
        contexts = {job_id: (entry[2] if entry else self._context(job_id)) for job_id, entry in batch.items()}
        before = {job_id: (ctx.sent, ctx.joblog.mark()) for job_id, ctx in contexts.items() if ctx is not None}
        reports = {
            job_id: _report(entry, ctx) for job_id, entry in batch.items() if (ctx := contexts[job_id]) is not None
        }
        idle = self._idle_event()
        idle.clear()
        try:
            cancelled = await self._db(record_progress, reports) if reports else {}
        except BaseException:
            for job_id, (sent, mark) in before.items():  # sent nothing: send it again next time
                contexts[job_id].sent = sent
                contexts[job_id].joblog.rewind(mark)
                self.pending.setdefault(job_id, batch[job_id])
            raise
        finally:
            idle.set()
        self._cancel([job_id for job_id, requested in cancelled.items() if requested], "cancelled")
        for job_id, ctx in contexts.items():
            if ctx is not None and job_id in self.tasks and ctx.unsent():
                self.pending.setdefault(job_id, None)

    def _context(self, job_id: UUID) -> AsyncContext | None:
        entry = self.tasks.get(job_id)
        return entry[1] if entry else None


# --- database work (on the lane's executor thread) ---------------------------


def _in_db_thread(func, *args, **kwargs):
    # The lane's thread keeps one connection for the life of the process:
    # replace it once a query found it broken (Postgres restarted), or every
    # later renewal and outcome would fail on it too.
    broker.replace_broken_connection()
    relax_commit_durability()
    return func(*args, **kwargs)


def _handlers(func, *args, **kwargs):
    with handler_writes():
        return func(*args, **kwargs)


def _report(entry: tuple[int, str, AsyncContext] | None, ctx: AsyncContext) -> Progress:
    """A job's report for the flush: its latest progress (None: unchanged),
    the output not yet sent (from `ctx.sent`) and the new log lines."""
    output = ctx.output
    if len(output) < ctx.sent:  # the handler started its text over
        ctx.sent = 0
    offset = ctx.sent
    delta = output[offset : offset + MAX_OUTPUT_DELTA]
    ctx.sent = offset + len(delta)
    logs, lines, first = ctx.joblog.take()
    percent, message = (entry[0], entry[1]) if entry else (ctx.percent, ctx.message)
    return Progress(
        percent,
        message,
        ctx.worker,
        output,
        attempt=ctx.attempt,
        offset=offset,
        delta=delta,
        logs=logs,
        lines=lines,
        first=first,
        report=entry is not None,
    )


def job_ids(batch) -> str:
    return ", ".join(str(job.id) for job, *_ in batch)


def _logs(ctx: AsyncContext) -> str | None:
    return ctx.joblog.text() if ctx.joblog.count else None
