"""Claims: of a delivered job, and of many ready jobs at once through their
broker rows (a chain's next batch, the lane's free places)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError

from jobs.db import sql
from jobs.djangoq import broker
from jobs.engine import queues, states
from jobs.engine.registry import async_kinds, get_handler
from jobs.engine.states import OPEN_ATTEMPT, QuietSuccess, Sql, transition
from jobs.models import Job, State
from jobs.worker.leases import lease_seconds

log = logging.getLogger(__name__)


def claim(job_id: str, worker: str, *, delivery: int | None = None) -> Job | None:
    """Claim a delivered job: due, its queue not paused, a place free if the
    queue is limited (`jobs.engine.queues`), taken in the same statement."""
    before, gate, after = queues.single_claim(job_id)
    return transition(
        job_id,
        target=State.RUNNING,
        where=Sql(f"(run_after IS NULL OR run_after <= now()) AND {gate.expression}"),
        around=(before, after),
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
AS_WATCHDOG = "j.lease_expires_at + interval '1 second'"


VISIBLE_AGAIN = "now() + make_interval(secs => %s)"  # with Conf.RETRY


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
            f"UPDATE django_q_ormq SET lock = {AS_WATCHDOG}"
            f" FROM j WHERE django_q_ormq.id = %s AND j.kind IN ({sql.literals(tuple(kinds))})"
            " RETURNING django_q_ormq.id",
            delivery,
        )
    return Sql(
        "INSERT INTO django_q_ormq (key, payload, lock, priority, job_id)"
        f" SELECT queue, %s, {AS_WATCHDOG}, 0, id FROM j WHERE kind IN ({sql.literals(tuple(kinds))})"
        " RETURNING id",
        broker.task_package(job_id, 60),
    )


def fill_lane(lane, queue: str, worker: str) -> int:
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
        rows, _ = claim_ready(broker.cluster_for_queue(queue), worker, room, kinds)
    except DatabaseError as exc:  # nothing was claimed; deliveries carry on as usual
        log.warning("lane: could not claim ready jobs (%s)", exc)
        rows = []
    for row in rows:
        job = sql.job_from_row(row)
        lane.submit(job, get_handler(job.kind), worker, watchdog_id=row[-1], reserved=True)
    lane.unreserve(room - len(rows))
    return len(rows)


def claim_ready(
    key: str,
    worker: str,
    limit: int,
    kinds,
    *,
    rearm: Sql | None = None,
    max_timeout: int | None = None,
    succeeded: Sequence[QuietSuccess] = (),
) -> tuple[list[tuple], set[UUID]]:
    """`states.claim_ready` with this worker's lease; `rearm` defaults to
    re-arming each job's broker row as its watchdog."""
    floor = broker.claim_floor(key, "ready")
    rows, finished = states.claim_ready(
        key,
        worker,
        limit,
        kinds,
        lease_seconds=lease_seconds(),
        rearm=rearm or Sql(AS_WATCHDOG),
        max_timeout=max_timeout,
        succeeded=succeeded,
        floor=floor.bound(),
    )
    floor.claimed([row[-2] for row in rows], asked=limit)
    return rows, finished
