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

The steps live in their own modules: claims.py (1, and claims of many ready
jobs), execute.py and context.py (3), leases.py and heartbeat.py (the lease
and progress a running job writes), finish.py (4, and the rescue of 2),
chain.py (the jobs a sync delivery runs after its own), lane.py (async jobs).
Every change of state is jobs/engine/states.py's.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from datetime import timedelta
from uuid import UUID

from django.db import transaction
from django.utils import timezone
from django_q.signals import pre_execute

from jobs.db.durability import relax_commit_durability
from jobs.djangoq import broker
from jobs.engine.registry import get_handler
from jobs.models import Job, State
from jobs.worker.chain import run_chain
from jobs.worker.claims import claim, fill_lane
from jobs.worker.execute import execute, record
from jobs.worker.finish import rescue_expired, rescue_job
from jobs.worker.lane import get_lane
from jobs.worker.leases import worker_id

__all__ = ["rescue_expired", "run_job"]  # rescue_expired: the schedule and the jobs.runner shim name it here

log = logging.getLogger(__name__)


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
    worker = worker_id()
    job = claim(job_id, worker, delivery=delivery.ack_id)
    claimed = time.monotonic()
    if job is None:
        _look_after_unclaimed(job_id, delivery)
        return
    handler = get_handler(job.kind)
    if handler is not None and handler.is_async:
        if job.watchdog_id is not None and job.watchdog_id == delivery.ack_id:
            delivery.settled()  # re-armed as the watchdog
        lane = get_lane()
        lane.submit(job, handler, worker, watchdog_id=job.watchdog_id)
        if fill_lane(lane, job.queue, worker):
            # A backlog: the lane claims the next ready jobs as places free.
            lane.refill = functools.partial(fill_lane, lane, job.queue, worker)
        return
    began = time.monotonic() - claimed
    outcome, value = execute(job, handler, worker)
    if outcome == "lost":
        record(job, worker, outcome, value, ack=None)
        return  # the monitor acknowledges the delivery
    if delivery.task is not None and threading.current_thread() is threading.main_thread():
        # A Django-Q2 worker, under its alarm.
        took = time.monotonic() - claimed
        run_chain(job, worker, started, outcome, value, ack=delivery.ack_id, began=began, took=took)
    else:
        record(job, worker, outcome, value, ack=delivery.ack_id)
    delivery.settled()


# A delivery refused by its queue's controls comes back this much later
# (a resume makes it visible at once).
HELD_RECHECK_SECONDS = 1


def _look_after_unclaimed(job_id: str, delivery: _Delivery | None = None) -> None:
    """The delivery did not claim the job: it may be the watchdog of a running
    one, or the job's queue held it (paused, or no place free)."""
    job = Job.objects.filter(id=job_id).only("state", "lease_expires_at", "queue", "timeout", "run_after").first()
    if job is not None and job.state in (State.QUEUED, State.SCHEDULED, State.RETRYING):
        if job.run_after is None or job.run_after <= timezone.now():
            _hold(job, delivery)
        return  # not yet due: a duplicate delivery, its own row comes later
    if job is None or job.state != State.RUNNING:
        return  # duplicate delivery of a finished job
    if job.lease_expires_at and job.lease_expires_at <= timezone.now():
        rescue_job(job.id)
    else:
        # The worker is alive: look again when its lease would run out.
        with transaction.atomic():
            broker.enqueue(
                job.id, queue=job.queue, timeout=job.timeout, run_at=job.lease_expires_at + timedelta(seconds=1)
            )


def _hold(job: Job, delivery: _Delivery | None) -> None:
    """A due job its queue held back: its delivery's row comes back a moment
    later instead of being acknowledged (or, without one, a new row)."""
    if delivery is not None and delivery.ack_id is not None:
        broker.delay_row(delivery.ack_id, HELD_RECHECK_SECONDS)
        delivery.settled()
        return
    with transaction.atomic():
        broker.enqueue(
            job.id,
            queue=job.queue,
            timeout=job.timeout,
            run_at=timezone.now() + timedelta(seconds=HELD_RECHECK_SECONDS),
        )
