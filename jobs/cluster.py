"""Hardening of Django-Q2's cluster process (installed by JobsConfig.ready).

Django-Q2 hands tasks to its workers through one multiprocessing queue. An
idle worker waits for the next task inside `Queue.get()`, *holding the
queue's read lock*. If that worker is SIGKILLed (the OOM killer likes a worker
with a hundred LLM calls in flight in its asyncio lane), the lock is never
released: the reincarnated worker and every other worker block on it forever
and the cluster stops taking work, with rows piling up in the broker.

So workers record, in shared memory, the pid of the one holding the read lock
while it waits, and the sentinel watches: when tasks are waiting, the lock is
held, and its recorded holder is dead, it releases the lock (a
multiprocessing Lock is a semaphore: any process may release it). A live
holder is never second-guessed, however slow.

Its heartbeat (the `Stat` it saves every half second) also names the queue the
cluster serves, for /readyz and /metrics.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from multiprocessing.reduction import ForkingPickler

import psutil

log = logging.getLogger(__name__)

CHECK_EVERY_SECONDS = 0.5


def install() -> None:
    from django_q.cluster import Sentinel, get_mp_context
    from django_q.queues import Queue as TaskQueue
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
        # Before the workers fork: they inherit it.
        self.task_queue._conveyor_holder = get_mp_context().Value("i", 0, lock=False)
        result = original(self, *args, **kwargs)
        threading.Thread(target=watch_task_queue, args=(self,), name="conveyor-queue-watch", daemon=True).start()
        return result

    Sentinel.spawn_cluster = spawn_cluster
    TaskQueue.get = _recording_get(TaskQueue.get)
    Sentinel._conveyor_hardened = True


def _recording_get(original_get):
    def get(self, block=True, timeout=None):
        """Django-Q2's worker loop `get()`, recording who holds the read lock."""
        holder = getattr(self, "_conveyor_holder", None)
        if holder is None or not block or timeout is not None:
            return original_get(self, block, timeout)
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        with self._rlock:
            holder.value = os.getpid()
            try:
                res = self._recv_bytes()
            finally:
                holder.value = 0
        self._sem.release()
        self.size.increment(-1)
        return ForkingPickler.loads(res)

    return get


def watch_task_queue(sentinel) -> None:
    queue = sentinel.task_queue
    read_lock = queue._rlock
    holder = queue._conveyor_holder
    while not sentinel.stop_event.is_set():
        time.sleep(CHECK_EVERY_SECONDS)
        try:
            if queue.qsize() == 0:
                continue
        except (NotImplementedError, OSError):
            return
        pid = holder.value
        if not pid or _alive(pid):
            continue
        if read_lock.acquire(False):  # freed meanwhile
            read_lock.release()
            continue
        log.warning("task queue read lock held by dead worker %s with tasks waiting; releasing it", pid)
        holder.value = 0
        try:
            read_lock.release()
        except ValueError:
            pass  # released meanwhile


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
