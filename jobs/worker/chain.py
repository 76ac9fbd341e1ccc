"""The chain: after its job, a sync delivery runs more ready jobs of its queue,
claimed in batches (`run_chain`)."""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django_q.conf import Conf
from django_q.exceptions import TimeoutException

from jobs.db import sql
from jobs.db.durability import relax_commit_durability
from jobs.djangoq import broker
from jobs.engine import hooks
from jobs.engine.registry import get_handler, sync_kinds
from jobs.engine.states import QuietSuccess, Sql, release_unstarted
from jobs.models import Job, State
from jobs.worker.claims import VISIBLE_AGAIN, claim_ready
from jobs.worker.execute import execute, record
from jobs.worker.leases import lease_seconds, sync_leases

log = logging.getLogger(__name__)


@dataclass
class Ran:
    """A job a chain ran whose success is not recorded yet: `began` and `took`
    are the seconds from the moment its claim's answer arrived to its
    handler's start and end."""

    job: Job
    row: int
    value: Any
    began: float
    took: float


def run_chain(
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
    the queue unstarted (`Batch`, `_release`)."""
    chain = _Chain(delivered, worker, started)
    return chain.run(Ran(delivered, ack, value, began, took) if ack is not None else None, outcome, value)


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
        self.quiet = hooks.quiet_condition(State.SUCCEEDED) is not None
        # Pending jobs hold leases nobody renews: they must start well within one.
        self.patience = min(self.seconds, lease_seconds() / 3)

    def run(self, first: Ran | None, outcome: str, value: Any) -> int:
        done: list[Ran] = []
        if first is not None and outcome == "succeeded" and self.quiet:
            done.append(first)
            size = self._next_size(1, first.took - first.began, 1)
        else:
            record(self.delivered, self.worker, outcome, value, ack=first.row if first else None)
            size = 1
        ran = 0
        try:
            while True:
                rows = self._record_and_claim(done, size)
                claimed = time.monotonic()
                done = []
                if not rows:
                    return ran
                batch = Batch(rows, self.worker, claimed + self.patience)
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

    def _run_batch(self, batch: Batch, claimed: float, done: list[Ran]) -> float:
        """Run the batch's jobs; returns the seconds their handlers took."""
        spent = 0.0
        sync_leases.watch(batch)
        try:
            for job, row in iter(batch.next, None):
                if job.timeout > self._left():
                    batch.put_back(job, row)
                    break
                began = time.monotonic() - claimed
                with _alarm(job.timeout):
                    outcome, value = execute(job, get_handler(job.kind), self.worker)
                took = time.monotonic() - claimed
                spent += took - began
                if outcome == "succeeded" and self.quiet:
                    # Recorded with the next claim: until then its lease is
                    # renewed, or a slow batch-mate would outlast it and the
                    # sweep would rescue and rerun a job that succeeded.
                    sync_leases.hold(job.id, self.worker, threading.Event())
                    done.append(Ran(job, row, value, began, took))
                else:
                    record(job, self.worker, outcome, value, ack=row)
        finally:
            sync_leases.unwatch(batch)
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

    def _record_and_claim(self, done: list[Ran], size: int) -> list[tuple]:
        """Record `done` and claim up to `size` more jobs in one statement
        (in a transaction with the workflows' one for the batch's edges, when
        jobs with dependents are among them: `states.claim_ready`); what that
        statement could not record (it asks for a webhook message after all,
        gained a dependent since its claim, or is no longer ours) goes through
        the usual transition."""
        left = self._left()
        claim = size if self.seconds and self.kinds and time.monotonic() < self.deadline and left >= 1 else 0
        if not claim and not done:
            return []
        try:
            try:
                rows, finished = claim_ready(
                    self.key,
                    self.worker,
                    claim,
                    self.kinds or [""],
                    rearm=Sql(VISIBLE_AGAIN, Conf.RETRY),
                    max_timeout=left,
                    succeeded=[
                        QuietSuccess(i.job.id, i.value, i.began, i.took, i.row, i.job.has_dependents) for i in done
                    ],
                )
            except DatabaseError as exc:  # nothing claimed: the rows are delivered as usual
                log.warning("could not claim the next jobs (%s)", exc)
                rows, finished = [], set()
            for item in done:
                if item.job.id not in finished:
                    record(item.job, self.worker, "succeeded", item.value, ack=item.row)
        finally:
            # Recorded, or the recording failed: then the lease must run out
            # so the job is rescued, rather than stay renewed for ever.
            for item in done:
                sync_leases.release(item.job.id)
        return rows


class Batch:
    """The jobs one claim took for this worker, started one after another.

    What has not started by `due` goes back to the queue (`_release`): the
    main thread checks between two jobs, and the lease thread while a job
    runs, so a slow job never holds the rest of its batch for longer than
    that. The lock makes each job either started or given back, never both,
    and is held until the give-back is written."""

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
        # The statement runs under the lock: whichever thread gives the rest
        # back, the other waits for it (in `next` or here), so a delivery never
        # returns while jobs it claimed are still being given back.
        with self._lock:
            rest = list(self._pending)
            self._pending.clear()
            self.released += rest
            if rest:
                _release(rest, self.worker)


def _release(jobs: list[tuple[Job, int]], worker: str) -> None:
    """Give back claimed jobs this worker has not started (`states.release_unstarted`)."""
    try:
        relax_commit_durability()
        release_unstarted([(job.id, row) for job, row in jobs], worker)
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
