"""The SSE endpoints: Channels consumers fed by the process's event hub.

Channels pitfall (django/channels#1302, #1747): an AsyncHttpConsumer stops
when `handle()` returns, and while `handle()` runs it dispatches nothing, not
even the client's `http.disconnect`. So `handle()` only checks the request,
subscribes and starts the stream as a task of its own; `http_request` keeps
the consumer alive past it, and `http.disconnect` cancels the task. The task
reads from the subscription's bounded queue, never from a channel layer.

A stream, once open:
1. sends `retry:` and a comment (so that proxies and clients see it start);
2. with a cursor (`Last-Event-ID`, else `?after=`), replays the events after
   it from the event log, or sends a snapshot for streams that show state;
   without one, job-scoped streams start at the job's first event and the
   others at "now", after a snapshot;
3. then sends live updates, a burst at a time, skipping those the replay
   already sent, and a keep-alive comment after 15 s of silence;
4. ends when its subscriber falls too far behind (the client reconnects and
   replays), when the key, session or user it was opened with is no longer
   valid (the hub re-checks them every second; the client's reconnection
   then gets 401), or when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.http import AsyncHttpConsumer
from django.db import connection

from dashboard import api_auth, queries
from dashboard.live import sse
from dashboard.live.hub import (
    CATCH_UP_MARGIN,
    AccessRevoked,
    EventHub,
    HubUnavailable,
    SubscriberTooSlow,
    Subscription,
    get_hub,
)
from dashboard.live.hub import update_from_event as _update
from dashboard.permissions import can_operate
from dashboard.streams import (
    ApiStream,
    BatchesStream,
    BatchStream,
    DeadLetterStream,
    JobsStream,
    JobStream,
    OverviewStream,
    Stream,
    Viewer,
)
from jobs.db import durability

log = logging.getLogger(__name__)

RETRY_MILLISECONDS = 2000
REPLAY_CHUNK = 500
MAX_IDS = 200


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class EventStreamConsumer(AsyncHttpConsumer):
    # No channel layer: the hub feeds the stream (see the module docstring).
    channel_layer_alias = "__no_channel_layer__"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._task: asyncio.Task | None = None
        self._cursor = 0
        # What the caller was let in with; make_stream sets it.
        self.credential: api_auth.Credential | None = None

    async def make_stream(self, hub: EventHub) -> Stream:
        """The stream this request asks for, having set `self.credential`; raises HttpError."""
        raise NotImplementedError

    # --- the consumer's life -------------------------------------------------

    async def http_request(self, message) -> None:
        # Replaces AsyncHttpConsumer's, which stops the consumer when
        # handle() returns; here the stream outlives handle().
        if "body" in message:
            self.body.append(message["body"])
        if message.get("more_body"):
            return
        await self.handle(b"".join(self.body))
        if self._task is None:  # answered with an error
            await self.disconnect()
            raise StopConsumer()

    async def disconnect(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def handle(self, body: bytes) -> None:
        hub = get_hub()
        try:
            if self.scope["method"] != "GET":
                raise HttpError(405, "use GET", [(b"Allow", b"GET")])
            stream = await self.make_stream(hub)
            await stream.open()
            subscription = await hub.subscribe(stream.wants, job_id=stream.only_job, credential=self.credential)
        except HttpError as error:
            await self.send_response(
                error.status,
                error.message.encode() + b"\n",
                headers=[(b"Content-Type", b"text/plain; charset=utf-8"), *error.headers],
            )
            return
        except HubUnavailable:
            await self.send_response(
                503, b"live updates are unavailable; retry shortly\n", headers=[(b"Retry-After", b"5")]
            )
            return
        # Taken right after subscribing: every event up to here is either in
        # the log for a replay or accounted for by a snapshot.
        start_id = hub.last_id
        await self.send_headers(
            headers=[
                (b"Content-Type", b"text/event-stream; charset=utf-8"),
                (b"Cache-Control", b"no-cache"),
                (b"X-Accel-Buffering", b"no"),  # nginx: do not buffer the stream
            ]
        )
        self._task = asyncio.ensure_future(self._stream(hub, stream, subscription, start_id))

    # --- the stream ----------------------------------------------------------

    async def _stream(self, hub: EventHub, stream: Stream, subscription: Subscription, start_id: int) -> None:
        try:
            await self.send_body(sse.retry(RETRY_MILLISECONDS) + b": connected\n\n", more_body=True)
            cursor = self.cursor()
            if cursor is None:
                cursor = stream.start_cursor()
            replayed: set[int] = set()
            if cursor is None or stream.replay_events() is None:
                await self._send(await stream.snapshot(max(cursor or 0, start_id), since=cursor))
            else:
                replayed = await self._replay(stream, cursor, floor=start_id - CATCH_UP_MARGIN)
            while True:
                update = await subscription.get(timeout=hub.keepalive)
                if update is None:
                    await self.send_body(sse.KEEPALIVE, more_body=True)
                    continue
                updates = [u for u in (update, *subscription.drain()) if u.id not in replayed]
                if updates:
                    await self._send(await stream.render(updates))
        except SubscriberTooSlow:
            log.info("SSE %s: the client fell behind; closing (it will reconnect and replay)", self.scope["path"])
        except AccessRevoked:
            log.info("SSE %s: its key, session or user is no longer valid; closing", self.scope["path"])
        except asyncio.CancelledError:
            hub.unsubscribe(subscription)
            raise
        except Exception:
            log.exception("SSE %s: stream failed", self.scope["path"])
        hub.unsubscribe(subscription)
        await self.send_body(b"", more_body=False)

    async def _replay(self, stream: Stream, cursor: int, *, floor: int) -> set[int]:
        """Send the events after `cursor` from the log; return the ids the live
        stream may deliver again (those near or after the hub's position)."""
        replayed: set[int] = set()
        query = stream.replay_events()
        after = cursor
        while True:
            events, lsn, flushed = await sync_to_async(_read_chunk)(query, after)
            if not events:
                break
            # Workers commit asynchronously: send only what a crash cannot take back.
            await durability.until_flushed(lsn, flushed, sync_to_async(_flushed), sync_to_async(_force_flush))
            updates = [_update(event) for event in events]
            replayed.update(u.id for u in updates if u.id >= floor)
            await self._send(await stream.render(updates, replaying=True))
            after = events[-1].id
            if len(events) < REPLAY_CHUNK:
                break
        await self._send(await stream.resume(after))
        return replayed

    async def _send(self, messages: list[sse.Message]) -> None:
        if len(messages) > 1:
            messages = sse.compact(messages)
        if not messages:
            return
        # The client resumes from the last id it saw: never let it go back
        # (live events may arrive slightly out of id order). Only then is the
        # message copied; otherwise it goes out as the stream got it, framed
        # once for every stream that shares it.
        fixed = []
        for message in messages:
            if message.id is not None:
                if message.id < self._cursor:
                    message = sse.Message(message.event, message.data, self._cursor, message.mode)
                else:
                    self._cursor = message.id
            fixed.append(message)
        await self.send_body(sse.encode(fixed), more_body=True)

    # --- request helpers -----------------------------------------------------

    def query(self) -> dict[str, str]:
        parsed = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        return {name: values[-1] for name, values in parsed.items()}

    def cursor(self) -> int | None:
        """`Last-Event-ID` (sent by a reconnecting EventSource), else `?after=`."""
        for name, value in self.scope.get("headers", []):
            if name.lower() == b"last-event-id":
                cursor = sse.parse_cursor(value)
                if cursor is not None:
                    return cursor
        return sse.parse_cursor(self.query().get("after"))

    def route(self, name: str):
        return self.scope["url_route"]["kwargs"].get(name)

    async def user(self):
        """The signed-in user (None without one); sets `self.credential` to the session."""
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return None
        self.credential = await database_sync_to_async(api_auth.session_credential)(self.scope)
        return user


def _read_chunk(query, after: int) -> tuple[list, str, bool]:
    """The next events, and the WAL position they are durable at (durability.WAL_NOW)."""
    events = list(query.filter(id__gt=after).select_related("job").order_by("id")[:REPLAY_CHUNK])
    with connection.cursor() as cursor:
        cursor.execute(durability.WAL_NOW)
        lsn, flushed = cursor.fetchone()
    return events, lsn, flushed


def _flushed(lsn: str) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(durability.FLUSHED, [lsn])
        return cursor.fetchone()[0]


def _force_flush() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(durability.FORCE_FLUSH)
        return cursor.fetchone()[1] and connection.get_autocommit() and not connection.in_atomic_block


def _uuids(value: str) -> set[uuid.UUID]:
    ids = set()
    for part in value.split(",")[:MAX_IDS]:
        try:
            ids.add(uuid.UUID(part.strip()))
        except ValueError:
            continue
    return ids


class DashboardEventsConsumer(EventStreamConsumer):
    """/events/<page>: the HTML fragments of one dashboard page."""

    async def make_stream(self, hub: EventHub) -> Stream:
        user = await self.user()
        if user is None:
            raise HttpError(401, "sign in to watch live updates")
        viewer = Viewer(
            can_operate=await database_sync_to_async(can_operate)(user), staff=user.is_staff or user.is_superuser
        )
        page, query = self.route("page"), self.query()
        if page == "overview":
            return OverviewStream(hub, viewer)
        if page == "jobs":
            filters = queries.JobFilters.from_query(query)
            return JobsStream(hub, viewer, ids=_uuids(query.get("ids", "")), filters=filters)
        if page == "job":
            return JobStream(hub, viewer, job_id=self.route("job_id"))
        if page == "dead-letter":
            return DeadLetterStream(hub, viewer)
        if page == "batches":
            return BatchesStream(hub, viewer, ids=_uuids(query.get("ids", "")))
        if page == "batch":
            return BatchStream(hub, viewer, batch_id=self.route("batch_id"))
        raise HttpError(404, "no such stream")


class ApiEventsConsumer(EventStreamConsumer):
    """/api/v1/events?job=&queue=: the events as JSON, for API clients."""

    async def make_stream(self, hub: EventHub) -> Stream:
        token = api_auth.bearer_token(self.scope.get("headers", []))
        owner = None  # dashboard users see every job's events
        if token is not None:
            principal = await database_sync_to_async(api_auth.authenticate_bearer)(token)
            if principal is None:
                raise HttpError(401, "invalid API key", [(b"WWW-Authenticate", b'Bearer error="invalid_token"')])
            if api_auth.READ_SCOPE not in principal.scopes:
                raise HttpError(403, f"this API key lacks the {api_auth.READ_SCOPE!r} scope")
            owner = principal.visible_owner
            self.credential = api_auth.Credential(api_key_id=principal.key_id)
        elif await self.user() is None:
            raise HttpError(
                401, "send an API key (Authorization: Bearer …) or sign in", [(b"WWW-Authenticate", b"Bearer")]
            )
        query = self.query()
        job_id = None
        if query.get("job"):
            try:
                job_id = uuid.UUID(query["job"])
            except ValueError:
                raise HttpError(400, "job must be a job id") from None
            # Another owner's job is "not found", as on the REST API.
            if owner is not None and not await database_sync_to_async(api_auth.owns_job)(job_id, owner):
                raise HttpError(404, "no such job")
        return ApiStream(hub, Viewer(), job_id=job_id, queue=query.get("queue") or None, owner=owner)
