"""What each SSE stream shows: which updates it wants and the messages it
makes of them.

Dashboard streams send HTML fragments rendered from the same partial
templates as the pages, named after the element they replace (`job-<id>`,
`job-summary-<id>`, `queue-cards`, `dead-letter`, …): the page's `sse-swap`
attributes line up with them. The API stream sends the events themselves as
JSON, named by type (`job.progress`, `job.succeeded`, `queue.stats`, …).

A fragment is rendered once per update and viewer class (operator or
reader) and shared by every stream of the process (`Update.memo`); reads an
update calls for beyond the event and its job go through `hub.shared`, once
per process.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.db.models import QuerySet
from django.template.loader import render_to_string
from django.urls import reverse

from dashboard import charts, queries
from dashboard.live.hub import STATS_EVENT, EventHub, Update
from dashboard.live.sse import Message
from dashboard.templatetags.conveyor import page_title, short_id
from dashboard.waiting import waiting_reason
from jobs import services
from jobs.models import LIVE_TEXT_EVENTS, OUTPUT_EVENT, PROGRESS_EVENT, Job, JobEvent

PROGRESS = PROGRESS_EVENT
# Events after which the dead-letter queue may look different.
DEAD_LETTER_EVENTS = frozenset({"job.dead", "job.discarded", "job.queued"})


@dataclass(frozen=True)
class Viewer:
    can_operate: bool = False
    staff: bool = False  # sees the query of a long-open transaction (the overview's horizon warning)


def fragment(update: Update | None, template: str, context: dict[str, Any], *, key: Any = None) -> str:
    """Render a partial; with an update, once per (update, template, key)."""
    if update is None:
        return render_to_string(template, context)
    return update.memo((template, key), lambda: render_to_string(template, context))


def shared(update: Update | None, message: Message) -> Message:
    """The first message equal to `message` that a stream made of this update:
    streams that send the same fragment then share one framing of it."""
    if update is None:
        return message
    return update.memo(("message", message), lambda: message)


class Stream:
    """Base of every stream. Subclasses say what they want and how to show it."""

    title = ""
    # Set when the stream wants one job's events and nothing else: the hub
    # then asks it about that job's events only.
    only_job: uuid.UUID | None = None

    def __init__(self, hub: EventHub, viewer: Viewer) -> None:
        self.hub = hub
        self.viewer = viewer

    async def open(self) -> None:
        """Per-connection setup (reads once at connect, never per event)."""

    def wants(self, update: Update) -> bool:
        raise NotImplementedError

    def replay_events(self) -> QuerySet[JobEvent] | None:
        """The events to replay after a cursor, or None to send a snapshot instead
        (streams that show current state rather than history)."""
        return None

    def start_cursor(self) -> int | None:
        """The cursor of a stream opened without one: None means "now, after a snapshot"."""
        return None

    async def render(self, updates: list[Update], *, replaying: bool = False) -> list[Message]:
        messages: list[Message] = []
        for update in updates:
            messages.extend(await self.render_one(update, replaying=replaying))
        return messages

    async def render_one(self, update: Update, *, replaying: bool) -> list[Message]:
        raise NotImplementedError

    async def snapshot(self, cursor: int, *, since: int | None = None) -> list[Message]:
        """The current state, as of `cursor`; `since` is the client's own cursor
        (None without one), so that a page that is current gets nothing."""
        return []

    async def resume(self, cursor: int) -> list[Message]:
        """Sent after a replay that ended at `cursor`."""
        return []


class DashboardStream(Stream):
    """Every page shows the dead-letter count in its title and navigation."""

    def __init__(self, hub: EventHub, viewer: Viewer) -> None:
        super().__init__(hub, viewer)
        self.dead: int | None = None

    def wants(self, update: Update) -> bool:
        return update.type == STATS_EVENT and update.job is None

    async def render_one(self, update: Update, *, replaying: bool) -> list[Message]:
        if update.type == STATS_EVENT:
            return self.render_stats(update)
        return []

    def render_stats(self, update: Update) -> list[Message]:
        dead = update.event.data.get("dead", 0)
        if dead == self.dead:
            return []
        self.dead = dead
        html = render_to_string(
            "dashboard/partials/chrome.html#dead-count",
            {"dead_count": dead, "title": page_title(self.title, dead), "with_title": True},
        )
        return [Message("dead-count", html, update.id)]

    async def snapshot(self, cursor: int, *, since: int | None = None) -> list[Message]:
        latest = self.hub.latest_stats
        if latest is None or (since is not None and latest.id <= since):
            return []
        return [Message(m.event, m.data, cursor, m.mode) for m in await self.render_one(latest, replaying=True)]

    async def resume(self, cursor: int) -> list[Message]:
        latest = self.hub.latest_stats
        if latest is None:
            return []
        return [Message(m.event, m.data, cursor, m.mode) for m in self.render_stats(latest)]

    def latest_stats(self) -> dict:
        return self.hub.latest_stats.event.data if self.hub.latest_stats else {}


# --- pages -------------------------------------------------------------------


class OverviewStream(DashboardStream):
    title = "Overview"
    horizon_html: str | None = None  # the horizon warning last sent

    async def render_one(self, update: Update, *, replaying: bool) -> list[Message]:
        if update.type != STATS_EVENT:
            return []
        data = update.event.data
        history = list(self.hub.stats_history)
        cards = fragment(
            update,
            "dashboard/partials/queue.html#queue-cards",
            {
                "queues": data.get("queues", []),
                "backlog": charts.backlog_warnings(history),
                "can_operate": self.viewer.can_operate,
            },
            key=self.viewer.can_operate,
        )
        chart = fragment(
            update, "dashboard/partials/queue.html#queue-chart", {"charts": charts.overview_charts(history)}
        )
        workers = fragment(update, "dashboard/partials/queue.html#workers", {"clusters": data.get("clusters", [])})
        return [
            Message("queue-cards", cards, update.id),
            Message("queue-chart", chart, update.id),
            Message("workers", workers, update.id),
            *self.render_stats(update),
            *await self._horizon(update),
        ]

    async def _horizon(self, update: Update) -> list[Message]:
        """The long-open-transaction warning: first, then when it appears,
        changes or goes; for staff with the query, read once per event for
        every staff viewer of the process."""
        held = update.event.data.get("horizon")
        if held is not None and self.viewer.staff:
            held = await self.hub.shared.get(("horizon", "query"), update.id, lambda: queries.horizon(with_query=True))
        html = fragment(update, "dashboard/partials/queue.html#horizon", {"horizon": held}, key=self.viewer.staff)
        if html == self.horizon_html:
            return []
        self.horizon_html = html
        return [Message("horizon", html, update.id)]


ROW = "dashboard/partials/job.html#job-row"


class JobsStream(DashboardStream):
    """The jobs list: its rows, and a count of new jobs that match its filters."""

    title = "Jobs"

    def __init__(self, hub: EventHub, viewer: Viewer, *, ids: set[uuid.UUID], filters: queries.JobFilters) -> None:
        super().__init__(hub, viewer)
        self.ids = ids
        self.filters = filters
        self.new_jobs = 0

    def wants(self, update: Update) -> bool:
        if update.job is None:
            return super().wants(update)
        if update.type in LIVE_TEXT_EVENTS:  # a row shows none of it
            return False
        return update.job.id in self.ids or (update.type == "job.created" and self._matches(update))

    def _matches(self, update: Update) -> bool:
        job, f = update.job, self.filters
        return (
            not f.q
            and (not f.state or f.state == job.state)
            and (not f.queue or f.queue == job.queue)
            and (not f.kind or f.kind == job.kind)
            and (not f.batch or f.batch == str(job.batch_id))
        )

    def replay_events(self) -> QuerySet[JobEvent]:
        return JobEvent.objects.filter(job_id__in=self.ids)

    async def render_one(self, update: Update, *, replaying: bool) -> list[Message]:
        if update.job is None:
            return await super().render_one(update, replaying=replaying)
        messages = []
        if update.job.id in self.ids and self.viewer.can_operate:
            # An operator's rows carry the selection checkbox (kept across swaps: hx-preserve).
            row = fragment(update, ROW, {"job": update.job, "selectable": True}, key="selectable")
            messages.append(Message(f"job-{update.job.id}", row, update.id))
        elif update.job.id in self.ids:
            messages.append(shared(update, Message(f"job-{update.job.id}", job_row(update), update.id)))
        elif update.type == "job.created" and not replaying:
            self.new_jobs += 1
            html = render_to_string("dashboard/partials/job.html#jobs-new", {"new_jobs": self.new_jobs})
            messages.append(Message("jobs-new", html, update.id))
        return messages


class JobStream(DashboardStream):
    """One job's page: summary and progress, outcome, attempts, timeline."""

    def __init__(self, hub: EventHub, viewer: Viewer, *, job_id: uuid.UUID) -> None:
        super().__init__(hub, viewer)
        self.job_id = job_id
        self.title = f"Job {short_id(job_id)}"
        self.job: Job | None = None
        self.waiting = None
        self.related: set[uuid.UUID] = set()  # its dependencies and dependents shown on the page

    async def open(self) -> None:
        self.job = await Job.objects.filter(id=self.job_id).afirst()
        self.related = (await sync_to_async(services.workflow_of)(self.job_id)).related

    def wants(self, update: Update) -> bool:
        return update.event.job_id == self.job_id or update.event.job_id in self.related or super().wants(update)

    async def _workflow(self, update: Update | None, event_id: int) -> Message:
        """The panel of dependencies and dependents with their states, read
        again (once per event for every viewer of this job)."""
        workflow = await self.hub.shared.get(
            ("workflow", self.job_id), event_id, lambda: services.workflow_of(self.job_id)
        )
        self.related = workflow.related
        context = {"job": self.job, "workflow": workflow}
        key = (
            self.job_id,
            self.job.updated_at,
            tuple((j.id, j.state) for j in (*workflow.dependencies, *workflow.dependents)),
        )
        html = fragment(update, "dashboard/partials/job.html#job-workflow", context, key=key)
        return Message(f"job-workflow-{self.job_id}", html, event_id)

    def replay_events(self) -> QuerySet[JobEvent]:
        return JobEvent.objects.filter(job_id=self.job_id)

    def start_cursor(self) -> int:
        return 0  # the whole event log of the job, then live

    async def render_one(self, update: Update, *, replaying: bool) -> list[Message]:
        if update.event.job_id in self.related and update.event.job_id != self.job_id:
            if self.job is None or update.type == PROGRESS:
                return []
            return [shared(update, await self._workflow(update, update.id))]
        if update.event.job_id != self.job_id:
            messages = await super().render_one(update, replaying=replaying)
            if self.job is not None and self.job.state == "queued":
                # Workers came or went: the reason it waits may have changed.
                summary = self._summary(update, update.id, only_if_changed=True)
                if summary is not None:
                    messages.append(summary)
            return messages
        if update.job is not None and (self.job is None or update.job.updated_at >= self.job.updated_at):
            self.job = update.job
        if self.job is None:
            return []  # purged while someone watched
        if update.type in LIVE_TEXT_EVENTS:
            # The event itself: the page appends it at its offset (static/conveyor.js).
            # No read and no rendering beyond the JSON, shared by every viewer.
            name = "job-output" if update.type == OUTPUT_EVENT else "job-logs"
            body = update.memo("live-text", lambda: json.dumps(update.event.data))
            return [shared(update, Message(f"{name}-{self.job_id}", body, update.id, mode="append"))]
        messages = [self._summary(update, update.id)]
        entry = fragment(update, "dashboard/partials/job.html#job-event", {"event": update.event})
        messages.append(Message(f"job-timeline-{self.job_id}", entry, update.id, mode="append"))
        if update.type != PROGRESS and self.job is not None:
            for part in ("job-outcome", "job-details"):
                html = fragment(
                    update, f"dashboard/partials/job.html#{part}", {"job": self.job}, key=self.job.updated_at
                )
                messages.append(Message(f"{part}-{self.job_id}", html, update.id))
            attempts = await self.hub.shared.get(
                ("attempts", self.job_id), update.id, lambda: queries.job_attempts(self.job_id)
            )
            html = fragment(
                update,
                "dashboard/partials/job.html#job-attempts",
                {"job": self.job, "attempts": attempts},
                key=self.job.updated_at,
            )
            messages.append(Message(f"job-attempts-{self.job_id}", html, update.id))
            if self.related or self.job.pending_dependencies:
                messages.append(await self._workflow(update, update.id))
        return [shared(update, message) for message in messages]

    def _summary(self, update: Update | None, event_id: int, *, only_if_changed: bool = False) -> Message | None:
        job = self.job
        stats = self.latest_stats()
        queue = next((q for q in stats.get("queues", []) if q["queue"] == job.queue), None)
        waiting = waiting_reason(job, clusters=stats.get("clusters") if stats else None, queue=queue)
        if only_if_changed and waiting == self.waiting:
            return None
        self.waiting = waiting
        context = {"job": job, "can_operate": self.viewer.can_operate, "waiting": waiting}
        # Streams of other jobs render from the same statistics update: the key
        # names everything the fragment depends on.
        key = (job.id, job.updated_at, self.viewer.can_operate, waiting)
        html = fragment(update, "dashboard/partials/job.html#job-summary", context, key=key)
        return Message(f"job-summary-{self.job_id}", html, event_id)

    async def snapshot(self, cursor: int, *, since: int | None = None) -> list[Message]:
        messages = await super().snapshot(cursor, since=since)
        if self.job is not None:
            messages.append(self._summary(None, cursor))
            if self.related:
                messages.append(await self._workflow(None, cursor))
        return messages


class DeadLetterStream(DashboardStream):
    title = "Dead letter"

    def wants(self, update: Update) -> bool:
        return update.type in DEAD_LETTER_EVENTS or super().wants(update)

    def replay_events(self) -> QuerySet[JobEvent]:
        # Rendered as one snapshot at the end (see render): a page that is
        # already current is not re-rendered under the operator's cursor.
        return JobEvent.objects.filter(type__in=DEAD_LETTER_EVENTS)

    async def render(self, updates: list[Update], *, replaying: bool = False) -> list[Message]:
        # One rendering per burst: a group retried at once is hundreds of events.
        messages = []
        for update in updates:
            if update.type == STATS_EVENT:
                messages.extend(self.render_stats(update))
        changed = [u for u in updates if u.type in DEAD_LETTER_EVENTS]
        if changed:
            last = max(changed, key=lambda u: u.id)
            messages.append(await self._dead_letter(last.id, last))
        return messages

    async def _dead_letter(self, version: int, update: Update | None) -> Message:
        groups = await self.hub.shared.get(("dead-letter",), version, queries.dead_letter_groups)
        context = {"groups": groups, "can_operate": self.viewer.can_operate}
        html = fragment(update, "dashboard/partials/dead_letter.html#dead-letter", context, key=self.viewer.can_operate)
        return Message("dead-letter", html, version)

    async def snapshot(self, cursor: int, *, since: int | None = None) -> list[Message]:
        return [*await super().snapshot(cursor, since=since), await self._dead_letter(cursor, None)]


class BatchesStream(DashboardStream):
    """The batches list: each row's live totals."""

    title = "Batches"

    def __init__(self, hub: EventHub, viewer: Viewer, *, ids: set[uuid.UUID]) -> None:
        super().__init__(hub, viewer)
        self.ids = ids

    def wants(self, update: Update) -> bool:
        if update.job is None:
            return super().wants(update)
        return update.job.batch_id in self.ids and update.type not in LIVE_TEXT_EVENTS

    def replay_events(self) -> QuerySet[JobEvent]:
        return JobEvent.objects.filter(job__batch_id__in=self.ids)

    async def render(self, updates: list[Update], *, replaying: bool = False) -> list[Message]:
        messages = []
        latest: dict[uuid.UUID, Update] = {}
        for update in updates:
            if update.job is None:
                messages.extend(self.render_stats(update))
            else:
                latest[update.job.batch_id] = update
        for batch_id, update in latest.items():
            messages.append(await batch_message(self.hub, batch_id, update.id, "batch-row", update))
        return messages

    async def snapshot(self, cursor: int, *, since: int | None = None) -> list[Message]:
        messages = await super().snapshot(cursor, since=since)
        for batch_id in self.ids:
            messages.append(await batch_message(self.hub, batch_id, cursor, "batch-row", None))
        return messages


class BatchStream(DashboardStream):
    """One batch's page: its aggregate progress and its jobs' rows."""

    def __init__(self, hub: EventHub, viewer: Viewer, *, batch_id: uuid.UUID) -> None:
        super().__init__(hub, viewer)
        self.batch_id = batch_id
        self.title = f"Batch {short_id(batch_id)}"

    def wants(self, update: Update) -> bool:
        if update.job is None:
            return super().wants(update)
        return update.job.batch_id == self.batch_id and update.type not in LIVE_TEXT_EVENTS

    def replay_events(self) -> QuerySet[JobEvent]:
        return JobEvent.objects.filter(job__batch_id=self.batch_id)

    async def render(self, updates: list[Update], *, replaying: bool = False) -> list[Message]:
        messages = []
        for update in updates:
            if update.job is None:
                messages.extend(self.render_stats(update))
            else:
                messages.append(shared(update, Message(f"job-{update.job.id}", job_row(update), update.id)))
        jobs = [u for u in updates if u.job is not None]
        if jobs:
            last = jobs[-1]
            messages.append(await batch_message(self.hub, self.batch_id, last.id, "batch-summary", last))
        return messages

    async def snapshot(self, cursor: int, *, since: int | None = None) -> list[Message]:
        messages = await super().snapshot(cursor, since=since)
        messages.append(await batch_message(self.hub, self.batch_id, cursor, "batch-summary", None))
        return messages


def job_row(update: Update) -> str:
    # The same for operators and readers: rows have no buttons.
    return fragment(update, ROW, {"job": update.job})


async def batch_message(
    hub: EventHub, batch_id: uuid.UUID, version: int, partial: str, update: Update | None
) -> Message:
    progress = await hub.shared.get(("batch", batch_id), version, lambda: queries.one_batch_progress(batch_id))
    html = fragment(update, f"dashboard/partials/batch.html#{partial}", {"progress": progress}, key=batch_id)
    name = f"batch-{batch_id}" if partial == "batch-row" else f"batch-summary-{batch_id}"
    return shared(update, Message(name, html, version))


# --- the API -------------------------------------------------------------------


class ApiStream(Stream):
    """JSON events for API clients, optionally for one job or one queue; with
    `owner`, only the events of that owner's jobs (and the queue statistics,
    which are counts that /api/v1/queues shows every key too)."""

    def __init__(
        self,
        hub: EventHub,
        viewer: Viewer,
        *,
        job_id: uuid.UUID | None,
        queue: str | None,
        owner: str | None = None,
    ) -> None:
        super().__init__(hub, viewer)
        self.job_id = job_id
        self.queue = queue
        self.only_job = job_id
        self.owner = owner

    def wants(self, update: Update) -> bool:
        if update.type == STATS_EVENT and update.job is None:
            return self.job_id is None
        if self.job_id is not None and update.event.job_id != self.job_id:
            return False
        if self.owner is not None and (update.job is None or update.job.owner != self.owner):
            return False
        return not self.queue or update.queue == self.queue

    def replay_events(self) -> QuerySet[JobEvent]:
        # Statistics are state, not history: a reconnecting client gets the
        # latest ones from the live stream, not every second it missed.
        events = JobEvent.objects.filter(job__isnull=False)
        if self.owner is not None:
            events = events.filter(job__owner=self.owner)
        if self.job_id is not None:
            events = events.filter(job_id=self.job_id)
        if self.queue:
            events = events.filter(job__queue=self.queue)
        return events

    def start_cursor(self) -> int | None:
        return 0 if self.job_id is not None else None

    async def render_one(self, update: Update, *, replaying: bool) -> list[Message]:
        # Once per update and queue filter, shared (framed bytes and all) by
        # every API stream of the process.
        return update.memo(("api", self.queue), lambda: [self._message(update)])

    def _message(self, update: Update) -> Message:
        return Message(update.type, json.dumps(api_event(update, queue=self.queue)), update.id, mode="append")

    async def snapshot(self, cursor: int, *, since: int | None = None) -> list[Message]:
        latest = self.hub.latest_stats
        if latest is None or self.job_id is not None or (since is not None and latest.id <= since):
            return []
        return [Message(STATS_EVENT, json.dumps(api_event(latest, queue=self.queue)), cursor, mode="append")]


def api_event(update: Update, *, queue: str | None = None) -> dict[str, Any]:
    """The JSON of one event on /api/v1/events."""
    event, job = update.event, update.job
    data = event.data
    if event.type == STATS_EVENT and queue:
        data = {**data, "queues": [q for q in data.get("queues", []) if q["queue"] == queue]}
    body: dict[str, Any] = {
        "id": event.id,
        "type": event.type,
        "job": str(event.job_id) if event.job_id else None,
        "queue": job.queue if job is not None else None,
        "created_at": event.created_at.isoformat() if event.created_at else None,
        "data": data,
    }
    if job is not None:
        body["job_state"] = {
            "state": job.state,
            "attempts": job.attempts,
            "progress_percent": job.progress_percent,
            "progress_message": job.progress_message,
            "url": reverse("dashboard:job", args=[job.id]),
        }
    return body
