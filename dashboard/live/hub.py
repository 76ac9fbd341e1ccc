"""The per-process event hub: one Postgres LISTEN connection feeds every SSE
stream that this Daphne process serves.

1. One autocommit psycopg connection LISTENs on `conveyor_events` (never
   Django's request connection: it must stay open and idle in LISTEN).
2. A notification carries only ids (see jobs/db/events.py). Each batch of
   notifications is read back with one query, the event joined with its job,
   so the database work per event does not depend on how many people watch.
3. Each update is offered to every subscription whose filter wants it,
   through a bounded asyncio.Queue. Subscriptions to one job's events are
   filed under that job, so an event is checked against its job's streams
   and the unscoped ones, not against every stream of the process. A
   subscription whose queue is full is dropped: its stream ends, the browser
   reconnects with Last-Event-ID and replays from the event log, and memory
   never grows with a slow reader.
4. Rows read back are passed on once the WAL is flushed past them: workers
   commit asynchronously, and a crash must not take back what a client saw.
5. When the connection drops (Postgres restart, network), reconnect with
   exponential backoff and read what was missed from the event log. Event ids
   are drawn before commit, so they do not commit in order: the catch-up
   starts a margin below the last id seen and skips ids already delivered.
6. While the hub runs it also publishes the queue statistics (see
   dashboard/live/publisher.py): at most once a second across all processes.
7. Every `ACCESS_CHECK_SECONDS` it checks the credentials of its open
   streams, all in one batch (`credentials.invalid_credentials`, at most three
   queries), and ends the streams of a revoked key, a logged-out session or
   a deactivated user: no query per event or per viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone
from psycopg.conninfo import make_conninfo

from jobs.db import durability
from jobs.db.events import CHANNEL
from jobs.djangoq.broker import listen_params
from jobs.models import Job, JobEvent

log = logging.getLogger(__name__)

STATS_EVENT = "queue.stats"
HISTORY = timedelta(minutes=15)
MIN_BACKOFF, MAX_BACKOFF = 0.5, 30.0
# How far below the last id seen a catch-up starts (see step 5); ids seen
# recently are remembered so that the overlap is not delivered twice.
CATCH_UP_MARGIN = 1000
_READ_CHUNK = 1000

_EVENT_FIELDS = [f.attname for f in JobEvent._meta.concrete_fields]
_JOB_FIELDS = [f.attname for f in Job._meta.concrete_fields]


def _select(where: str) -> str:
    # Columns in the models' field order, as Model.from_db expects them.
    event_columns = ", ".join(f"e.{f.column}" for f in JobEvent._meta.concrete_fields)
    job_columns = ", ".join(f"j.{f.column}" for f in Job._meta.concrete_fields)
    return (
        f"SELECT {event_columns}, {job_columns} "
        f"FROM {JobEvent._meta.db_table} e LEFT JOIN {Job._meta.db_table} j ON j.id = e.job_id "
        f"WHERE {where} ORDER BY e.id"
    )


_EVENTS_BY_ID = _select("e.id = ANY(%s)")
_EVENTS_AFTER = _select("e.id > %s") + " LIMIT %s"
_LAST_ID = f"SELECT coalesce(max(id), 0) FROM {JobEvent._meta.db_table}"
# Backwards along the (job, id) index: the newest job-less events first.
_RECENT_STATS = (
    f"SELECT id, created_at, data FROM {JobEvent._meta.db_table} "
    f"WHERE job_id IS NULL AND type = '{STATS_EVENT}' ORDER BY id DESC LIMIT %s"
)


class Update:
    """One event as the hub delivers it: the event row, the job as it was read
    right after the event committed, and a per-update cache that lets every
    stream of the process share one rendering of each fragment."""

    __slots__ = ("event", "job", "_memo")

    def __init__(self, event: JobEvent, job: Job | None) -> None:
        self.event = event
        self.job = job
        self._memo: dict[Any, Any] = {}

    @property
    def id(self) -> int:
        return self.event.id

    @property
    def type(self) -> str:
        return self.event.type

    @property
    def queue(self) -> str:
        return self.job.queue if self.job is not None else ""

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        try:
            return self._memo[key]
        except KeyError:
            value = self._memo[key] = build()
            return value

    def __repr__(self) -> str:
        return f"<Update {self.id} {self.type} job={self.event.job_id}>"


class SubscriberTooSlow(Exception):
    """The subscription's queue overflowed; the stream must end."""


class AccessRevoked(Exception):
    """The credentials the stream was opened with are no longer valid; it must end."""


class HubUnavailable(Exception):
    """The hub could not reach Postgres in time."""


class Subscription:
    """A stream's bounded inbox. Its reader waits on a bare future rather than
    an `asyncio.Queue` inside `asyncio.wait` (a task, a wait set and a timer per
    message): with many streams that machinery cost more than the message.
    The keep-alive timeout is one timer per subscription,
    moved on lazily when it fires early, not a timer per wait."""

    def __init__(
        self, wants: Callable[[Update], bool], maxsize: int, *, job_id: Any = None, credential: Any = None
    ) -> None:
        self.wants = wants
        self.job_id = job_id  # not None: wants nothing but this job's events
        self.credential = credential  # what the hub re-checks (credentials.Credential)
        self.maxsize = maxsize
        self.pending: deque[Update] = deque()
        self.dropped = False
        self.revoked = False
        self._waiter: asyncio.Future | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def offer(self, update: Update) -> bool:
        if len(self.pending) >= self.maxsize:
            self.dropped = True
            return False
        self.pending.append(update)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def revoke(self) -> None:
        """End the stream: its next (or current) get() raises AccessRevoked."""
        self.revoked = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, timeout: float) -> Update | None:
        """The next update, or None after `timeout` seconds without one.

        Raises SubscriberTooSlow once the hub has dropped this subscription
        (which only happens with a full queue, so never to a waiting reader),
        and AccessRevoked once its credentials are no longer valid.
        """
        if self.revoked:
            raise AccessRevoked
        if self.dropped:
            raise SubscriberTooSlow
        if not self.pending:
            loop = asyncio.get_running_loop()
            self._deadline = loop.time() + timeout
            if self._timer is None or self._timer.when() > self._deadline:
                self.close()
                self._timer = loop.call_at(self._deadline, self._time_out)
            waiter = self._waiter = loop.create_future()
            try:
                await waiter  # cancelled with the stream itself
            finally:
                self._waiter = None
            if self.revoked:
                raise AccessRevoked
            if not self.pending:
                return None
        return self.pending.popleft()

    def _time_out(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # not waiting: the next get() arms a timer again
        loop = waiter.get_loop()
        if self._deadline - loop.time() > 0.001:  # armed for an earlier wait
            self._timer = loop.call_at(self._deadline, self._time_out)
        else:
            waiter.set_result(None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def drain(self) -> list[Update]:
        """Whatever else is already waiting (to render a burst as one batch)."""
        updates = list(self.pending)
        self.pending.clear()
        return updates


class SharedReads:
    """Reads that several streams need after the same event (the dead-letter
    groups, a batch's totals, a job's attempts), done once per process and
    reused by every stream whose cursor the cached value already covers."""

    def __init__(self, size: int = 512) -> None:
        self._values: OrderedDict[Any, tuple[int, Any]] = OrderedDict()
        self._locks: dict[Any, asyncio.Lock] = {}
        self._size = size
        self.count = 0

    async def get(self, key: Any, version: int, read: Callable[[], Any]) -> Any:
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._values.get(key)
            if cached is not None and cached[0] >= version:
                self._values.move_to_end(key)
                return cached[1]
            value = await sync_to_async(read)()
            self.count += 1
            self._values[key] = (version, value)
            self._values.move_to_end(key)
            while len(self._values) > self._size:
                old, _ = self._values.popitem(last=False)
                self._locks.pop(old, None)
            return value


class EventHub:
    def __init__(
        self,
        *,
        queue_size: int | None = None,
        keepalive: float | None = None,
        publish_stats: bool | None = None,
        stats_interval: float | None = None,
        access_interval: float | None = None,
    ) -> None:
        live = settings.CONVEYOR_LIVE
        self.queue_size = queue_size or live["SUBSCRIBER_QUEUE_SIZE"]
        self.keepalive = keepalive or live["KEEPALIVE_SECONDS"]
        self.publish_stats = live["PUBLISH_QUEUE_STATS"] if publish_stats is None else publish_stats
        self.stats_interval = stats_interval or live["STATS_INTERVAL_SECONDS"]
        self.access_interval = access_interval or live["ACCESS_CHECK_SECONDS"]
        self.subscriptions: set[Subscription] = set()
        # The same subscriptions split for the fan-out (see step 3).
        self._unscoped: set[Subscription] = set()
        self._by_job: dict[Any, set[Subscription]] = {}
        self.shared = SharedReads()
        self.last_id = 0
        # Events up to this id committed before the hub first listened: they
        # are history, never delivered live (not even by a catch-up).
        self.first_id = 0
        # Queries that read events back after notifications: at most one per
        # batch of notifications, however many subscriptions there are.
        self.reads = 0
        self.connects = 0
        self.stats_history: deque[tuple[datetime, dict]] = deque()
        self.latest_stats: Update | None = None
        self._recent: deque[int] = deque(maxlen=4 * CATCH_UP_MARGIN)
        self._recent_set: set[int] = set()
        self._ready = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task | None = None
        self._publisher: asyncio.Task | None = None
        self._access: asyncio.Task | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    # --- subscribers ---------------------------------------------------------

    async def subscribe(
        self,
        wants: Callable[[Update], bool],
        *,
        job_id: Any = None,
        credential: Any = None,
        timeout: float = 10.0,
    ) -> Subscription:
        """Register a subscription once the hub is listening (so that nothing
        committed after this returns can be missed); raises HubUnavailable.

        With `job_id`, `wants` is only ever asked about that job's events.
        With `credential` (a `credentials.Credential`), the subscription is
        revoked once that credential is no longer valid (step 6).
        """
        self.start()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise HubUnavailable("the event hub is not connected to Postgres") from None
        subscription = Subscription(wants, self.queue_size, job_id=job_id, credential=credential)
        self.subscriptions.add(subscription)
        if job_id is None:
            self._unscoped.add(subscription)
        else:
            self._by_job.setdefault(job_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        self.subscriptions.discard(subscription)
        if subscription.job_id is None:
            self._unscoped.discard(subscription)
            return
        scoped = self._by_job.get(subscription.job_id)
        if scoped is not None:
            scoped.discard(subscription)
            if not scoped:
                del self._by_job[subscription.job_id]

    # --- life cycle ----------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="conveyor-event-hub")
            if self.publish_stats:
                self._publisher = self._loop.create_task(self._publish_stats(), name="conveyor-queue-stats")
            self._access = self._loop.create_task(self._check_access(), name="conveyor-stream-access")

    async def stop(self) -> None:
        for task in (self._publisher, self._access, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._publisher = self._access = None
        self._ready.clear()

    async def _run(self) -> None:
        delay = MIN_BACKOFF
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(_conninfo(), autocommit=True) as conn:
                    await conn.execute("SET TIME ZONE 'UTC'")
                    await conn.execute(f"LISTEN {CHANNEL}")
                    # LISTEN first, then find the cursor: whatever commits
                    # after this point is either notified or read here.
                    if self.connects == 0:
                        await self._start_at_now(conn)
                    else:
                        await self._catch_up(conn)
                    self.connects += 1
                    self._ready.set()
                    delay = MIN_BACKOFF
                    await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect, never die
                self._ready.clear()
                log.warning("event hub: connection lost (%s); reconnecting in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    async def _start_at_now(self, conn: psycopg.AsyncConnection) -> None:
        self.last_id = self.first_id = (await (await conn.execute(_LAST_ID)).fetchone())[0]
        # The chart's last 15 minutes (at most one sample a second).
        cutoff = timezone.now() - HISTORY
        rows = await (await conn.execute(_RECENT_STATS, [int(HISTORY.total_seconds()) + 60])).fetchall()
        for event_id, created_at, data in reversed(rows):
            if created_at >= cutoff:
                self._remember_stats(event_id, created_at, data)
        if rows:
            event_id, created_at, data = rows[0]
            self.latest_stats = Update(JobEvent(id=event_id, type=STATS_EVENT, data=data, created_at=created_at), None)

    async def _catch_up(self, conn: psycopg.AsyncConnection) -> None:
        after = max(self.first_id, self.last_id - CATCH_UP_MARGIN)
        while True:
            self.reads += 1
            rows = await (await conn.execute(_EVENTS_AFTER, [after, _READ_CHUNK])).fetchall()
            await _durable(conn)
            for row in rows:
                self._deliver(_update_from_row(row))
            if len(rows) < _READ_CHUNK:
                return
            after = rows[-1][0]

    async def _listen(self, conn: psycopg.AsyncConnection) -> None:
        while True:
            ids = []
            # Returns after the first packet of notifications (and whatever
            # arrived while the previous batch was being read), or after the
            # keepalive period without any.
            async for notify in conn.notifies(timeout=self.keepalive, stop_after=1):
                event_id = _event_id(notify.payload)
                if event_id is not None and event_id not in self._recent_set:
                    ids.append(event_id)
            if not ids:
                # Keepalive: a dead connection fails here rather than
                # leaving the hub deaf.
                await conn.execute("SELECT 1")
                continue
            for start in range(0, len(ids), _READ_CHUNK):
                self.reads += 1
                rows = await (await conn.execute(_EVENTS_BY_ID, [ids[start : start + _READ_CHUNK]])).fetchall()
                await _durable(conn)
                for row in rows:
                    self._deliver(_update_from_row(row))

    # --- fan-out -------------------------------------------------------------

    def _deliver(self, update: Update) -> None:
        if update.id in self._recent_set:
            return
        if len(self._recent) == self._recent.maxlen:  # the deque is about to forget its oldest id
            self._recent_set.discard(self._recent[0])
        self._recent.append(update.id)
        self._recent_set.add(update.id)
        self.last_id = max(self.last_id, update.id)
        if update.type == STATS_EVENT and update.job is None:
            self._remember_stats(update.id, update.event.created_at, update.event.data)
            if self.latest_stats is None or update.id > self.latest_stats.id:
                self.latest_stats = update
        candidates = list(self._unscoped)
        if update.event.job_id is not None:
            candidates.extend(self._by_job.get(update.event.job_id, ()))
        for subscription in candidates:
            try:
                wanted = subscription.wants(update)
            except Exception:  # noqa: BLE001 - one broken filter must not starve the others
                log.exception("event hub: a subscription filter failed on %r", update)
                continue
            if wanted and not subscription.offer(update):
                self.unsubscribe(subscription)
                log.info("event hub: dropped a subscriber that fell %d events behind", self.queue_size)

    def _remember_stats(self, event_id: int, created_at: datetime, data: dict) -> None:
        self.stats_history.append((created_at, data))
        cutoff = created_at - HISTORY
        while self.stats_history and self.stats_history[0][0] < cutoff:
            self.stats_history.popleft()

    # --- queue statistics ----------------------------------------------------

    async def _publish_stats(self) -> None:
        from dashboard.live.publisher import publish_queue_stats

        publish = sync_to_async(publish_queue_stats)
        while True:
            await asyncio.sleep(self.stats_interval)
            if not self._ready.is_set():
                continue
            try:
                await publish(min_interval=self.stats_interval)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - statistics are best effort; the next tick tries again
                log.exception("event hub: publishing queue statistics failed")

    # --- credentials of open streams ------------------------------------------

    async def _check_access(self) -> None:
        from dashboard.live.credentials import invalid_credentials

        check = database_sync_to_async(invalid_credentials)
        while True:
            await asyncio.sleep(self.access_interval)
            watched = {s.credential for s in self.subscriptions if s.credential is not None}
            if not watched:
                continue
            try:
                invalid = await check(watched)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - an outage must not end every stream; the next tick checks again
                log.exception("event hub: checking the streams' credentials failed")
                continue
            if not invalid:
                continue
            for subscription in list(self.subscriptions):
                if subscription.credential in invalid:
                    self.unsubscribe(subscription)
                    subscription.revoke()


async def _durable(conn: psycopg.AsyncConnection) -> None:
    """Wait until what was just read cannot be rolled back by a crash
    (workers commit asynchronously: jobs/db/durability.py)."""
    lsn, flushed = await (await conn.execute(durability.WAL_NOW)).fetchone()

    async def check(lsn: str) -> bool:
        return (await (await conn.execute(durability.FLUSHED, [lsn])).fetchone())[0]

    async def force() -> bool:
        return (await (await conn.execute(durability.FORCE_FLUSH)).fetchone())[1]

    await durability.until_flushed(lsn, flushed, check, force)


def _event_id(payload: str) -> int | None:
    try:
        return int(json.loads(payload)["id"])
    except (ValueError, KeyError, TypeError):
        log.warning("event hub: ignoring malformed notification %r", payload[:200])
        return None


def _update_from_row(row: tuple) -> Update:
    n = len(_EVENT_FIELDS)
    event = JobEvent.from_db("default", _EVENT_FIELDS, row[:n])
    job = Job.from_db("default", _JOB_FIELDS, row[n:]) if row[1] is not None and row[n] is not None else None
    return Update(event, job)


def update_from_event(event: JobEvent) -> Update:
    """An Update for an event read through the ORM (replays), with its job if loaded."""
    return Update(event, event.job if event.job_id is not None else None)


def _conninfo() -> str:
    return make_conninfo(**listen_params("conveyor-event-hub"))


# --- the process's hub -------------------------------------------------------

_hub: EventHub | None = None


def get_hub() -> EventHub:
    """This process's hub, created on first use in the running event loop."""
    global _hub
    loop = asyncio.get_running_loop()
    if _hub is None or _hub.loop is not loop:
        _hub = EventHub()
    return _hub


def install_hub(hub: EventHub | None) -> None:
    """Make `hub` the process's hub (tests build hubs with their own options)."""
    global _hub
    _hub = hub
