"""Hardening of Django-Q2's cluster process (installed by JobsConfig.ready).

Django-Q2 hands tasks to its workers through one multiprocessing queue. An
idle worker waits for the next task inside `Queue.get()`, *holding the
queue's read lock*. If that worker is SIGKILLed (the OOM killer likes a worker
with a hundred LLM calls in flight in its asyncio lane), the lock is never
released: the reincarnated worker and every other worker block on it forever
and the cluster stops taking work, with rows piling up in the broker.

The sentinel therefore watches the lock: when tasks are waiting in the queue
and nobody has been able to take them for a while, the holder is dead (a
live holder with data available reads it in microseconds), and the sentinel
releases the lock (a multiprocessing Lock is a semaphore: any process may
release it).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

STUCK_AFTER_SECONDS = 2.0
CHECK_EVERY_SECONDS = 0.5


def install() -> None:
    from django_q.cluster import Sentinel
    from django_q.status import Stat

    if getattr(Sentinel, "_conveyor_hardened", False):
        return
    original = Sentinel.spawn_cluster
    original_stat = Stat.__init__

    def stat_init(self, sentinel) -> None:
        original_stat(self, sentinel)
        # The queue the cluster serves, which Django-Q2's heartbeat leaves out:
        # /readyz and /metrics count clusters per queue (jobs/metrics.py).
        self.queue = sentinel.queue_name()

    Stat.__init__ = stat_init

    def spawn_cluster(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        threading.Thread(target=watch_task_queue, args=(self,), name="conveyor-queue-watch", daemon=True).start()
        return result

    Sentinel.spawn_cluster = spawn_cluster
    Sentinel._conveyor_hardened = True


def watch_task_queue(sentinel) -> None:
    queue = sentinel.task_queue
    read_lock = queue._rlock
    stuck_since: float | None = None
    while not sentinel.stop_event.is_set():
        time.sleep(CHECK_EVERY_SECONDS)
        try:
            waiting = queue.qsize()
        except (NotImplementedError, OSError):
            return
        if waiting == 0:
            stuck_since = None
            continue
        if read_lock.acquire(False):
            read_lock.release()
            stuck_since = None
            continue
        now = time.monotonic()
        stuck_since = stuck_since or now
        if now - stuck_since >= STUCK_AFTER_SECONDS:
            log.warning("task queue read lock held by a dead worker for %.1f s with %d tasks waiting; releasing it",
                        now - stuck_since, waiting)
            try:
                read_lock.release()
            except ValueError:
                pass  # released meanwhile
            stuck_since = None
