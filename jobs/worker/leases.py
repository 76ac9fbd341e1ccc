"""Leases of the sync jobs this worker process runs: its worker id, the lease
length, and the one thread that renews them (and gives back a chain's
unstarted jobs when they are due, see jobs/worker/chain.py)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Protocol
from uuid import UUID

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection

from jobs.worker.heartbeat import renew_leases

log = logging.getLogger(__name__)


class WatchedBatch(Protocol):
    """What the thread watches of a chain's batch (jobs/worker/chain.py)."""

    due: float

    def release_rest(self) -> None: ...


def worker_id() -> str:
    # Forked workers inherit the module; the pid must be the current one.
    pid = os.getpid()
    if _worker_ids.get(pid) is None:
        _worker_ids.clear()
        _worker_ids[pid] = f"{socket.gethostname()}:{pid}"
    return _worker_ids[pid]


_worker_ids: dict[int, str] = {}


def lease_seconds() -> int:
    return settings.CONVEYOR["LEASE_SECONDS"]


class Leases:
    """Renews the leases of this process's running (sync) jobs, and of chained
    jobs that succeeded and wait to be recorded, on one thread
    of the process (with its own database connection), each every third of a
    lease from its start, and sets a job's `lost` event when its renewal
    matches nothing. One thread for the process's life rather than one per
    job: starting and joining a thread would cost a short job more than its work.

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
        self._batch: WatchedBatch | None = None

    def hold(self, job_id: UUID, worker: str, lost: threading.Event) -> None:
        with self._lock:
            due = time.monotonic() + lease_seconds() / 3
            self._held[job_id] = (worker, lost, due)
            self._wake_by(due)

    def watch(self, batch: WatchedBatch) -> None:
        with self._lock:
            self._batch = batch
            self._wake_by(batch.due)

    def unwatch(self, batch: WatchedBatch) -> None:
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
            renewed = not renew_leases({job_id: worker}, lease_seconds())
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


sync_leases = Leases()
