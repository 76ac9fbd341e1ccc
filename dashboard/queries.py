"""Read helpers of the dashboard: what its pages and streams show.

Reads only; every change goes through `jobs.services`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.paginator import Page, Paginator
from django.db.models import Count, F, Max, Q, Sum, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

# The pages read these here; they live in dashboard.live, which imports nothing of the dashboard.
from dashboard.live.publisher import clusters_online, dead_total, horizon  # noqa: F401
from jobs.models import FINISHED_STATES, LIVE_TEXT_EVENTS, LOG_EVENT, Attempt, Batch, Job, JobEvent, State
from jobs.services import Selection, count_matching

JOBS_PER_PAGE = 50
DEAD_JOBS_PER_GROUP = 20
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


def find_jobs(filters: JobFilters, *, page: str | int | None = 1) -> Page:
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
    query = query.order_by("-created_at", "-id").defer("payload", "result", "error_traceback")
    return Paginator(query, JOBS_PER_PAGE).get_page(page)


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


def dead_letter_groups(*, per_group: int = DEAD_JOBS_PER_GROUP) -> list[DeadGroup]:
    """Dead jobs grouped by kind and error type, the group that died last first,
    with the newest `per_group` jobs of each (two queries on the dead-job index)."""
    counts = list(
        Job.objects.filter(state=State.DEAD)
        .values("kind", "error_type")
        .annotate(count=Count("id"), last_died=Max("finished_at"))
        .order_by(F("last_died").desc(nulls_last=True), "kind", "error_type")
    )
    if not counts:
        return []
    ranked = (
        Job.objects.filter(state=State.DEAD)
        .annotate(
            rank=Window(
                RowNumber(),
                partition_by=[F("kind"), F("error_type")],
                order_by=[F("finished_at").desc(nulls_last=True), F("id").desc()],
            )
        )
        .filter(rank__lte=per_group)
        .defer("payload", "result", "error_traceback")
    )
    jobs: dict[tuple[str, str], list[Job]] = {}
    for job in ranked:
        jobs.setdefault((job.kind, job.error_type), []).append(job)
    for group_jobs in jobs.values():
        group_jobs.sort(key=lambda j: j.finished_at or j.created_at, reverse=True)
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
    """Each batch with its jobs counted by state (one grouped query for all)."""
    counts: dict[Any, dict[str, int]] = {b.id: {} for b in batches}
    sums: dict[Any, int] = dict.fromkeys(counts, 0)
    rows = (
        Job.objects.filter(batch_id__in=list(counts))
        .values("batch_id", "state")
        .annotate(n=Count("id"), progress=Sum("progress_percent"))
    )
    for row in rows:
        counts[row["batch_id"]][row["state"]] = row["n"]
        if row["state"] not in FINISHED_STATES:
            sums[row["batch_id"]] += row["progress"] or 0
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
