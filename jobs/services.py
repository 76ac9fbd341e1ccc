"""The public surface of the engine: every entry point (API, dashboard, admin,
management commands) calls these and nothing deeper."""

from __future__ import annotations

from uuid import UUID

from django.core.exceptions import ValidationError

from jobs.engine.deadletter import cancel_job, discard_job, discard_jobs, retry_job, retry_jobs
from jobs.engine.registry import all_handlers, client_handlers, get_handler, known_kinds, submittable_handler
from jobs.engine.retention import purge_finished
from jobs.engine.stats import oldest_transaction, queue_stats
from jobs.engine.submission import Submitted, submit_job
from jobs.errors import JobNotFound
from jobs.models import Job, JobEvent, State

__all__ = [
    "Submitted",
    "all_handlers",
    "cancel_job",
    "client_handlers",
    "discard_job",
    "discard_jobs",
    "get_handler",
    "get_job",
    "job_events",
    "known_kinds",
    "list_jobs",
    "oldest_transaction",
    "purge_finished",
    "queue_stats",
    "retry_job",
    "retry_jobs",
    "submit_job",
    "submittable_handler",
]


def get_job(job_id: UUID | str, *, owner: str | None = None) -> Job:
    """The job with its attempts; raises JobNotFound (also for a malformed id,
    and for another owner's job when `owner` is given: ids do not leak)."""
    query = Job.objects.prefetch_related("attempt_set")
    if owner is not None:
        query = query.filter(owner=owner)
    try:
        return query.get(id=job_id)
    except (Job.DoesNotExist, ValidationError, ValueError, TypeError):
        raise JobNotFound(f"no job with id {job_id}") from None


def list_jobs(*, state: str | None = None, queue: str | None = None, kind: str | None = None, limit: int = 50):
    """Newest first."""
    query = Job.objects.all()
    if state:
        if state not in State.values:
            raise ValueError(f"unknown state {state!r}; states are {', '.join(State.values)}")
        query = query.filter(state=state)
    if queue:
        query = query.filter(queue=queue)
    if kind:
        query = query.filter(kind=kind)
    return list(query.order_by("-created_at")[:limit])


def job_events(job_id: UUID | str, *, after: int = 0) -> list[JobEvent]:
    """The job's events, oldest first, those with id > `after`."""
    return list(JobEvent.objects.filter(job_id=job_id, id__gt=after).order_by("id"))


# --- REST API: keyset pages, batches, API keys -----------------------------

from datetime import datetime  # noqa: E402

from django.db.models import Q  # noqa: E402

from jobs.engine.apikeys import ApiKeyNotFound, CreatedApiKey, create_api_key, revoke_api_key, verify_api_key  # noqa: E402
from jobs.engine.batches import (  # noqa: E402
    BatchNotFound,
    BatchProgress,
    BatchSubmitted,
    InvalidBatch,
    batch_progress,
    gc_paused,
    get_batch,
    jobs_from_csv,
    page_batches,
    submit_batch,
)

__all__ += [
    "ApiKeyNotFound",
    "BatchNotFound",
    "BatchProgress",
    "BatchSubmitted",
    "CreatedApiKey",
    "InvalidBatch",
    "batch_progress",
    "create_api_key",
    "gc_paused",
    "get_batch",
    "jobs_from_csv",
    "page_batches",
    "page_jobs",
    "revoke_api_key",
    "submit_batch",
    "verify_api_key",
]


def page_jobs(
    *,
    state: str | None = None,
    queue: str | None = None,
    kind: str | None = None,
    batch: UUID | str | None = None,
    error_type: str | None = None,
    owner: str | None = None,
    before: tuple[datetime, UUID] | None = None,
    limit: int = 50,
) -> list[Job]:
    """Newest first (created_at, then id), with their attempts: the jobs after
    position `before`, for keyset pagination (a page costs the same at any depth).
    With `owner`, only the jobs that owner submitted."""
    query = Job.objects.all()
    if owner is not None:
        query = query.filter(owner=owner)
    if state:
        if state not in State.values:
            raise ValueError(f"unknown state {state!r}; states are {', '.join(State.values)}")
        query = query.filter(state=state)
    filters = {"queue": queue, "kind": kind, "batch_id": batch, "error_type": error_type}
    query = query.filter(**{name: value for name, value in filters.items() if value})
    if before is not None:
        created_at, job_id = before
        # The `lte` half is what the created_at index can seek to; the OR
        # only breaks ties between jobs created in the same microsecond.
        query = query.filter(created_at__lte=created_at).filter(Q(created_at__lt=created_at) | Q(id__lt=job_id))
    # The ids first (an index-only scan of a batch's jobs: fetching the rows
    # themselves, the planner walks every job by time to an old batch's), then the rows.
    ids = list(query.order_by("-created_at", "-id").values_list("id", flat=True)[:limit])
    found = Job.objects.prefetch_related("attempt_set").in_bulk(ids)
    return [found[job_id] for job_id in ids if job_id in found]


# --- Webhooks: endpoints, signing secrets, deliveries ------------------------

from jobs.webhooks.endpoints import (  # noqa: E402
    CreatedEndpoint,
    DeliveryNotFound,
    EndpointNotFound,
    InvalidEndpoint,
    batch_deliveries,
    create_endpoint,
    delete_endpoint,
    delivery_status,
    disable_endpoint,
    enable_endpoint,
    endpoint_deliveries,
    get_delivery,
    get_endpoint,
    job_deliveries,
    list_endpoints,
    recent_deliveries,
    redeliver,
    rotate_endpoint_secret,
)
from jobs.webhooks.messages import (  # noqa: E402
    EVENT_TYPES as WEBHOOK_EVENT_TYPES,
)
from jobs.webhooks.signing import RotatedSecret, rotate_signing_secret, signing_secret  # noqa: E402

__all__ += [
    "WEBHOOK_EVENT_TYPES",
    "CreatedEndpoint",
    "DeliveryNotFound",
    "EndpointNotFound",
    "InvalidEndpoint",
    "RotatedSecret",
    "batch_deliveries",
    "create_endpoint",
    "delete_endpoint",
    "delivery_status",
    "disable_endpoint",
    "enable_endpoint",
    "endpoint_deliveries",
    "get_delivery",
    "get_endpoint",
    "job_deliveries",
    "list_endpoints",
    "recent_deliveries",
    "redeliver",
    "rotate_endpoint_secret",
    "rotate_signing_secret",
    "signing_secret",
]


# --- Token accounting and batch budgets --------------------------------------

from jobs.llm.usage import OwnerUsage, Usage, owner_usage, set_batch_budget, waiting_on_budget  # noqa: E402

__all__ += ["OwnerUsage", "Usage", "owner_usage", "set_batch_budget", "waiting_on_budget"]


# --- Observability: the per-minute rollup and what the clusters report ----------

from jobs.engine.rollup import RANGES, KindFigures, Point, kind_table, roll_up, rolled_until, series  # noqa: E402

__all__ += ["RANGES", "KindFigures", "Point", "kind_table", "roll_up", "rolled_until", "series"]
# --- Recurring schedules ---------------------------------------------------------

from jobs.engine.scheduling import (  # noqa: E402
    FORM_FIELDS as SCHEDULE_FIELDS,
)
from jobs.engine.scheduling import (  # noqa: E402
    MAX_INTERVAL,
    InvalidSchedule,
    ScheduleNotFound,
    create_schedule,
    cron_error,
    delete_schedule,
    get_schedule,
    list_schedules,
    run_now,
    set_enabled,
    tick_due,
    upcoming,
    update_schedule,
    zone_error,
)
from jobs.engine.scheduling import (  # noqa: E402
    clean as validate_schedule,
)

__all__ += [
    "MAX_INTERVAL",
    "SCHEDULE_FIELDS",
    "validate_schedule",
    "InvalidSchedule",
    "ScheduleNotFound",
    "create_schedule",
    "cron_error",
    "delete_schedule",
    "get_schedule",
    "list_schedules",
    "run_now",
    "set_enabled",
    "tick_due",
    "upcoming",
    "update_schedule",
    "zone_error",
]
# --- workflows -------------------------------------------------------------------

from jobs.engine.dependencies import Workflow, workflow_of  # noqa: E402

__all__ += ["Workflow", "workflow_of"]
# --- Operator controls: queues, bulk actions ---------------------------------

from jobs.engine.operations import (  # noqa: E402
    Selection,
    cancel_batch,
    cancel_matching,
    count_matching,
    retry_matching,
)
from jobs.engine.operations import run_now as run_job_now  # noqa: E402
from jobs.engine.queues import (  # noqa: E402
    Control,
    QueueError,
    get_control,
    get_controls,
    pause_queue,
    resume_queue,
    set_max_running,
)

__all__ += [
    "Control",
    "QueueError",
    "Selection",
    "cancel_batch",
    "cancel_matching",
    "count_matching",
    "get_control",
    "get_controls",
    "pause_queue",
    "resume_queue",
    "retry_matching",
    "run_job_now",
    "set_max_running",
]
