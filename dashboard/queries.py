"""Read helpers of the dashboard: what its pages and streams show.

Reads only; every change goes through `jobs.services`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.paginator import Page, Paginator
from django.db import connection
from django.db.models import Count, F, Max, Q, Sum
from django.utils import timezone

# The pages read these here; they live in dashboard.live, which imports nothing of the dashboard.
from dashboard.live.publisher import clusters_online, dead_total, horizon  # noqa: F401
from jobs.models import FINISHED_STATES, LIVE_TEXT_EVENTS, LOG_EVENT, Attempt, Batch, Job, JobEvent, State
from jobs.services import Selection, count_matching

JOBS_PER_PAGE = 50
COUNT_CAP = 10_000  # the jobs list counts this many matches at most
DEAD_JOBS_PER_GROUP = 10  # 20 groups of 20 rows took ~150 ms to render (bench/history.py)
TIMELINE_LIMIT = 200
STATS_HISTORY = timedelta(minutes=15)


# --- events ------------------------------------------------------------------


def latest_event_id() -> int:
    """The cursor of "now": a page rendered now is current up to this event."""
    return JobEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0


def stats_history() -> list[tuple[datetime, dict]]:
    """(time, data) of the `queue.stats` events of the last 15 minutes, oldest first."""
    cutoff = timezone.now() - STATS_HISTORY
    # Newest first along the (job, id) index, then cut by time: no scan of
    # older statistics.
    rows = (
        JobEvent.objects.filter(job__isnull=True, type="queue.stats")
        .order_by("-id")
        .values_list("created_at", "data")[: int(STATS_HISTORY.total_seconds()) + 60]
    )
    return [(at, data) for at, data in reversed(rows) if at >= cutoff]


def job_timeline(job_id: uuid.UUID, *, limit: int = TIMELINE_LIMIT) -> tuple[list[JobEvent], int]:
    """The job's newest `limit` events, oldest first, and how many older ones
    were left out (its streamed text and log lines are not timeline entries)."""
    history = JobEvent.objects.filter(job_id=job_id).exclude(type__in=LIVE_TEXT_EVENTS)
    events = list(history.order_by("-id")[: limit + 1])
    hidden = 0
    if len(events) > limit:
        events = events[:limit]
        hidden = history.filter(id__lt=events[-1].id).count()
    return list(reversed(events)), hidden


def next_log_line(job_id: uuid.UUID, attempt: int) -> int:
    """The number the attempt's next log line will have (its latest `job.log`
    event says how many it sent): where the page's live log continues."""
    data = (
        JobEvent.objects.filter(job_id=job_id, type=LOG_EVENT, data__attempt=attempt)
        .order_by("-id")
        .values_list("data", flat=True)
        .first()
    )
    return data["first"] + len(data["lines"]) if data else 0


def job_attempts(job_id: uuid.UUID) -> list[Attempt]:
    return list(Attempt.objects.filter(job_id=job_id).order_by("number", "id"))


# --- jobs list -----------------------------------------------------------------


@dataclass
class JobFilters:
    state: str = ""
    queue: str = ""
    kind: str = ""
    batch: str = ""
    q: str = ""
    since: str = ""  # "YYYY-MM-DDTHH:MM" (UTC): jobs changed since then (for a dead job: since it died)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def from_query(cls, query) -> JobFilters:
        filters = cls(
            **{name: query.get(name, "").strip()[:255] for name in ("state", "queue", "kind", "batch", "q", "since")}
        )
        if filters.since and filters.since_time is None:
            filters.errors.append(f"{filters.since!r} is not a time (YYYY-MM-DDTHH:MM, UTC)")
            filters.since = ""
        if filters.state and filters.state not in State.values:
            filters.errors.append(f"unknown state {filters.state!r}")
            filters.state = ""
        if filters.batch and as_uuid(filters.batch) is None:
            filters.errors.append(f"{filters.batch!r} is not a batch id")
            filters.batch = ""
        return filters

    @property
    def active(self) -> bool:
        return any((self.state, self.queue, self.kind, self.batch, self.q, self.since))

    @property
    def since_time(self) -> datetime | None:
        try:
            moment = datetime.fromisoformat(self.since)
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class JobPage:
    """One page of the jobs list, by keyset: the jobs, the positions of the
    pages on either side (None: there is none), and how many jobs match,
    counted up to COUNT_CAP + 1 (no exact count over millions)."""

    object_list: list[Job]
    older: str | None
    newer: str | None
    count: int

    @property
    def count_label(self) -> str:
        return f"{self.count:,}" if self.count <= COUNT_CAP else f"more than {COUNT_CAP:,}"


def find_jobs(filters: JobFilters, *, before: str | None = None, after: str | None = None) -> JobPage:
    """The JOBS_PER_PAGE newest jobs that match, older than the position
    `before` or, going back, the ones just newer than `after` (positions from
    a JobPage). A deep page costs what the first does."""
    query = Job.objects.all()
    if filters.state:
        query = query.filter(state=filters.state)
    if filters.queue:
        query = query.filter(queue=filters.queue)
    if filters.kind:
        query = query.filter(kind=filters.kind)
    if filters.batch:
        query = query.filter(batch_id=filters.batch)
    if filters.q:
        query = query.filter(_search(filters.q))
    if filters.since:
        query = query.filter(updated_at__gte=filters.since_time)
    count = query.order_by()[: COUNT_CAP + 1].count()
    newer_than, older_than = decode_position(after), decode_position(before)
    if (after and newer_than is None) or (before and older_than is None):
        filters.errors.append("that page position is not one this list gave; showing the newest jobs")
    if newer_than is not None:
        at, job_id = newer_than
        # "created_at >= at" first: an index range; the tie on the id after it.
        keys = _keys(query.filter(Q(created_at__gte=at), Q(created_at__gt=at) | Q(id__gt=job_id)), "created_at", "id")
        more = len(keys) > JOBS_PER_PAGE
        jobs = _jobs(keys[:JOBS_PER_PAGE][::-1])
        return JobPage(jobs, _position(jobs[-1]) if jobs else None, _position(jobs[0]) if more else None, count)
    if older_than is not None:
        at, job_id = older_than
        query = query.filter(Q(created_at__lte=at), Q(created_at__lt=at) | Q(id__lt=job_id))
    keys = _keys(query, "-created_at", "-id")
    jobs = _jobs(keys[:JOBS_PER_PAGE])
    older = _position(jobs[-1]) if len(keys) > JOBS_PER_PAGE else None
    return JobPage(jobs, older, _position(jobs[0]) if older_than is not None and jobs else None, count)


def _keys(query, *order: str) -> list[uuid.UUID]:
    """The ids of the page (and one more), positions only: an index-only scan
    where an index has the filters and the order (a batch's jobs), which the
    planner would pass over for a walk of all jobs by time were it to fetch
    the rows themselves (it does not know an old batch's jobs are old)."""
    return list(query.order_by(*order).values_list("id", flat=True)[: JOBS_PER_PAGE + 1])


def _jobs(ids: list[uuid.UUID]) -> list[Job]:
    """These jobs, in this order."""
    found = Job.objects.defer("payload", "result", "error_traceback").in_bulk(ids)
    return [found[i] for i in ids if i in found]


def _position(job: Job) -> str:
    return f"{job.created_at.isoformat()}~{job.id}"


def decode_position(value: str | None) -> tuple[datetime, uuid.UUID] | None:
    """(created_at, id) of a position `_position` wrote; None if it is not one."""
    if not value:
        return None
    created, _, job_id = value.rpartition("~")
    try:
        at = datetime.fromisoformat(created)
    except ValueError:
        return None
    full = as_uuid(job_id)
    return (at, full) if full is not None and at.tzinfo is not None else None


def _search(term: str) -> Q:
    """A whole job id, the start of one (as the tables show it), or an idempotency key."""
    match = Q(idempotency_key=term)
    full = as_uuid(term)
    if full is not None:
        return match | Q(id=full)
    hex_part = term.replace("-", "").lower()
    if 4 <= len(hex_part) < 32 and all(c in "0123456789abcdef" for c in hex_part):
        # A prefix is a range of the primary key: an index range scan.
        low = uuid.UUID(hex_part.ljust(32, "0"))
        high = uuid.UUID(hex_part.ljust(32, "f"))
        match |= Q(id__gte=low, id__lte=high)
    return match


def as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None


def known_queues() -> list[str]:
    """Queues that have jobs, for the filter menus (reads the active partial
    index plus the handler defaults, not the whole table)."""
    from jobs.services import all_handlers

    active = set(
        Job.objects.filter(state__in=["queued", "scheduled", "running", "retrying"])
        .values_list("queue", flat=True)
        .distinct()
    )
    return sorted(active | {h.queue for h in all_handlers()} | {"default"})


# --- dead-letter queue ---------------------------------------------------------


@dataclass
class DeadGroup:
    kind: str
    error_type: str
    count: int
    last_died: datetime | None
    jobs: list[Job]

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.error_type}"

    @property
    def more(self) -> int:
        return self.count - len(self.jobs)


_GROUP_JOBS = """
SELECT j.id FROM unnest(%s::text[], %s::text[]) AS g(kind, error_type)
CROSS JOIN LATERAL (
    SELECT id FROM jobs_job
    WHERE state = 'dead' AND kind = g.kind AND error_type = g.error_type
    ORDER BY finished_at DESC, id DESC
    LIMIT %s
) j
"""


def dead_letter_groups(*, per_group: int = DEAD_JOBS_PER_GROUP) -> list[DeadGroup]:
    """Dead jobs grouped by kind and error type, the group that died last first,
    with the newest `per_group` jobs of each: the counts an index-only scan of
    the dead-group index, each group's jobs a short walk down it."""
    counts = list(
        Job.objects.filter(state=State.DEAD)
        .values("kind", "error_type")
        .annotate(count=Count("*"), last_died=Max("finished_at"))
        .order_by(F("last_died").desc(nulls_last=True), "kind", "error_type")
    )
    if not counts:
        return []
    with connection.cursor() as cursor:
        cursor.execute(_GROUP_JOBS, [[c["kind"] for c in counts], [c["error_type"] for c in counts], per_group])
        ids = [row[0] for row in cursor.fetchall()]
    jobs: dict[tuple[str, str], list[Job]] = {}
    for job in Job.objects.filter(id__in=ids).defer("payload", "result", "error_traceback"):
        jobs.setdefault((job.kind, job.error_type), []).append(job)
    for group_jobs in jobs.values():
        group_jobs.sort(key=lambda j: (j.finished_at or j.created_at, j.id), reverse=True)
    return [
        DeadGroup(c["kind"], c["error_type"], c["count"], c["last_died"], jobs.get((c["kind"], c["error_type"]), []))
        for c in counts
    ]


# --- batches -------------------------------------------------------------------


@dataclass
class BatchProgress:
    batch: Batch
    counts: dict[str, int]
    # Sum of progress_percent over unfinished jobs; finished jobs count 100.
    progress_sum: int

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINISHED_STATES)

    @property
    def active(self) -> int:
        return sum(n for s, n in self.counts.items() if s not in FINISHED_STATES)

    @property
    def total(self) -> int:
        return max(self.batch.total, sum(self.counts.values()))

    @property
    def percent(self) -> int:
        if not self.total:
            return 0
        return min(100, (self.finished * 100 + self.progress_sum) // self.total)

    @property
    def failed(self) -> int:
        return self.counts.get(State.DEAD, 0)

    @property
    def ordered_counts(self) -> list[tuple[str, int]]:
        """Every state, in lifecycle order, with its count."""
        return [(state, self.counts.get(state, 0)) for state in State.values]

    @property
    def done(self) -> bool:
        return self.total > 0 and self.finished >= self.total


def batch_progress(batches: list[Batch]) -> list[BatchProgress]:
    """Each batch with its jobs counted by state (an index-only scan of the
    (batch, state) index for all), and the progress of its unfinished ones."""
    counts: dict[Any, dict[str, int]] = {b.id: {} for b in batches}
    sums: dict[Any, int] = dict.fromkeys(counts, 0)
    for row in Job.objects.filter(batch_id__in=list(counts)).values("batch_id", "state").annotate(n=Count("*")):
        counts[row["batch_id"]][row["state"]] = row["n"]
    unfinished = [s for s in State.values if s not in FINISHED_STATES]
    progress = (
        Job.objects.filter(batch_id__in=list(counts), state__in=unfinished)
        .values("batch_id")
        .annotate(progress=Sum("progress_percent"))
    )
    for row in progress:
        sums[row["batch_id"]] = row["progress"] or 0
    return [BatchProgress(b, counts[b.id], sums[b.id]) for b in batches]


def batch_page(*, page: str | int | None = 1, per_page: int = 25) -> tuple[Page, list[BatchProgress]]:
    paginated = Paginator(Batch.objects.order_by("-created_at", "-id"), per_page).get_page(page)
    return paginated, batch_progress(list(paginated.object_list))


def one_batch_progress(batch_id: uuid.UUID) -> BatchProgress | None:
    batch = Batch.objects.filter(id=batch_id).first()
    return batch_progress([batch])[0] if batch else None


# --- workers -------------------------------------------------------------------


# --- bulk actions of the jobs list (dashboard/operations.py) ---------------------------


def selection_of(filters: JobFilters) -> Selection | None:
    """The jobs list's filters as a bulk selection; None when they cannot be
    one (a search, or a filter in error)."""
    if filters.q or filters.errors:
        return None
    return Selection(
        state=filters.state or None,
        queue=filters.queue or None,
        kind=filters.kind or None,
        batch=as_uuid(filters.batch) if filters.batch else None,
        since=filters.since_time if filters.since else None,
    )


CANCELLABLE = frozenset({State.QUEUED, State.SCHEDULED, State.RETRYING, State.RUNNING})


def bulk_counts(filters: JobFilters) -> dict[str, int] | None:
    """What "cancel all matching (N)" and "retry all matching (N)" would move."""
    selection = selection_of(filters)
    if selection is None:
        return None
    return {
        "cancel": count_matching(selection, states_in=CANCELLABLE),
        "retry": count_matching(selection, states_in=frozenset({State.DEAD})),
    }
