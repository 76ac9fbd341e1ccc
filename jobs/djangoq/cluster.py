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
cluster serves, for /readyz and /metrics, and carries each worker's memory
(`conveyor_memory`: pid -> (RSS, PSS) bytes, read at most every
MEMORY_EVERY_SECONDS) for the workers page: in the same pickled row, so the
heartbeat is still one write.

A SIGTERM stops the cluster gracefully: workers finish the task in hand, which
takes as long as it takes. But with its database unreachable (a network gone
silent: every query waits forever) the sentinel blocks in its heartbeat and the
cluster never exits. So after a SIGTERM the cluster process checks the database
every STOP_CHECK_SECONDS while it waits; once the database does not answer a
new connection within PROBE_TIMEOUT_SECONDS, nothing can finish cleanly any
more (no outcome can be recorded) and it kills its processes and exits: their
jobs' leases expire and they run again elsewhere.

An idle cluster stops in well under a second: its pusher's wait for rows
(up to a second) ends when the sentinel tells it to stop (`waking_pusher`).

All of this patches Django-Q2 1.11.1 internals: `Sentinel.spawn_cluster`,
`Sentinel.spawn_pusher`, `Cluster.sig_handler`, `Stat.__init__(self,
sentinel)`, and `Queue.get` with multiprocessing's
`_rlock`/`_recv_bytes`/`_sem`/`_closed` and Django-Q2's `size` counter. On
any other version none of it is installed (one warning;
config/server/patching.py) and the cluster runs as Django-Q2 ships it.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from multiprocessing.reduction import ForkingPickler

import psutil

from config.server.patching import guarded
from jobs.djangoq import delivery

log = logging.getLogger(__name__)

CHECK_EVERY_SECONDS = 0.5
STOP_CHECK_SECONDS = 1
PROBE_TIMEOUT_SECONDS = 3
# Reading a process's PSS walks its memory map: not every half second.
MEMORY_EVERY_SECONDS = 2.0


NAME = "django-q2-cluster"

# Loops higher layers run in each cluster's sentinel process, as threads:
# (name, target(stop_event)) — the engine's schedules (jobs/apps.py registers it).
CLUSTER_THREADS: list[tuple[str, Callable[[threading.Event], None]]] = []


def add_cluster_thread(name: str, target: Callable[[threading.Event], None]) -> None:
    """Run `target(stop_event)` on a thread of each cluster's sentinel, from its
    start until the cluster stops (idempotent by name)."""
    if all(existing != name for existing, _ in CLUSTER_THREADS):
        CLUSTER_THREADS.append((name, target))


def start_cluster_threads(sentinel) -> None:
    for name, target in CLUSTER_THREADS:
        threading.Thread(target=target, args=(sentinel.stop_event,), name=name, daemon=True).start()


PACKAGE = "django-q2"
VERSIONS = ("1.11.1",)


def install() -> bool:
    """Harden Django-Q2's cluster on the version this was written for
    (idempotent; True when installed), and guard the runner's settling of its
    own broker rows (jobs/djangoq/delivery.py)."""
    delivery.install()
    return guarded(NAME, package=PACKAGE, versions=VERSIONS, install=lambda: _install())


def _install() -> None:
    from django_q.cluster import Cluster, Sentinel, get_mp_context
    from django_q.queues import Queue as TaskQueue
    from django_q.status import Stat

    if getattr(Sentinel, "_conveyor_hardened", False):
        return
    original = Sentinel.spawn_cluster
    original_stat = Stat.__init__

    @functools.wraps(original_stat)
    def stat_init(self, sentinel) -> None:
        original_stat(self, sentinel)
        # The queue the cluster serves, which Django-Q2's heartbeat leaves out:
        # /readyz and /metrics count clusters per queue (jobs/metrics.py).
        self.queue = sentinel.queue_name()
        self.conveyor_memory = worker_memory(self.workers)

    Stat.__init__ = stat_init

    @functools.wraps(original)
    def spawn_cluster(self, *args, **kwargs):
        # Before the workers fork: they inherit it.
        self.task_queue._conveyor_holder = get_mp_context().Value("i", 0, lock=False)
        # What the sentinel has loaded (all of Django and the project) stays
        # out of the cyclic collector's passes in the processes it forks: a full
        # pass writes to every object it walks, which copied each worker's
        # share of those pages (a busy lane worker's PSS grew 3x).
        gc.freeze()
        result = original(self, *args, **kwargs)
        threading.Thread(target=watch_task_queue, args=(self,), name="conveyor-queue-watch", daemon=True).start()
        if not getattr(self, "_conveyor_threads_started", False):
            self._conveyor_threads_started = True
            start_cluster_threads(self)
        return result

    Sentinel.spawn_cluster = spawn_cluster

    @functools.wraps(Sentinel.spawn_pusher)
    def spawn_pusher(self):
        # Django-Q2's own, with a pusher that stops waiting for rows when told
        # to stop (Sentinel.stop waits for the pusher before anything else).
        return self.spawn_process(waking_pusher, self.task_queue, self.event_out, self.broker)

    Sentinel.spawn_pusher = spawn_pusher
    original_sig_handler = Cluster.sig_handler

    @functools.wraps(original_sig_handler)
    def sig_handler(self, signum, frame) -> None:
        # Started before Django-Q2's handler blocks joining the sentinel.
        if not getattr(self, "_conveyor_stop_watch", None):
            self._conveyor_stop_watch = threading.Thread(
                target=watch_stop, args=(self,), name="conveyor-stop-watch", daemon=True
            )
            self._conveyor_stop_watch.start()
        original_sig_handler(self, signum, frame)

    Cluster.sig_handler = sig_handler
    TaskQueue.get = _recording_get(TaskQueue.get)
    Sentinel._conveyor_hardened = True


def _recording_get(original_get):
    # wraps: the original stays reachable (inspect.unwrap) for the shape test.
    @functools.wraps(original_get)
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


def waking_pusher(task_queue, event, broker=None) -> None:
    """Django-Q2's pusher, whose broker stops waiting for rows once `event`
    (the sentinel's stop for it) is set. Django-Q2 checks the event only
    between two `dequeue` calls, and an idle broker's dequeue waits up to a
    second: most of an idle cluster's stop."""
    from django_q.brokers import get_broker
    from django_q.pusher import pusher

    broker = broker or get_broker()
    if hasattr(broker, "stop_waiting"):

        def stop_waiting() -> None:
            event.wait()
            broker.stop_waiting()

        threading.Thread(target=stop_waiting, name="conveyor-pusher-stop", daemon=True).start()
    pusher(task_queue, event, broker)


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


def watch_stop(cluster) -> None:
    """After a stop signal: while the sentinel lives, kill the cluster's
    processes and exit once the database stops answering."""
    while True:
        time.sleep(STOP_CHECK_SECONDS)
        sentinel = cluster.sentinel
        if sentinel is None or not sentinel.is_alive():
            return
        if database_answers():
            continue
        log.error("the database does not answer while the cluster stops; killing its processes")
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        os._exit(1)


def database_answers() -> bool:
    """The server answers a new connection in time (an error it sends, such as
    too many clients, is an answer: that cluster may still finish its work)."""
    import psycopg
    from django.db import connection

    params = connection.get_connection_params()
    for key in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(key, None)
    params["connect_timeout"] = PROBE_TIMEOUT_SECONDS
    try:
        psycopg.connect(**params).close()
    except psycopg.Error as exc:
        return exc.sqlstate is not None
    return True


_memory: dict[int, tuple[float, tuple[int, int | None]]] = {}


def worker_memory(pids: list[int]) -> dict[int, tuple[int, int | None]]:
    """pid -> (RSS, PSS) in bytes of each live process in `pids` (PSS None
    where the system does not tell), each read at most every MEMORY_EVERY_SECONDS."""
    now = time.monotonic()
    for pid in list(_memory):
        if pid not in pids:
            del _memory[pid]
    found = {}
    for pid in pids:
        read_at, value = _memory.get(pid, (0.0, None))
        if value is None or now - read_at >= MEMORY_EVERY_SECONDS:
            try:
                info = psutil.Process(pid).memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            value = (info.rss, getattr(info, "pss", None))
            _memory[pid] = (now, value)
        found[pid] = value
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
