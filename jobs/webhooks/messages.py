"""What a finished job or batch sends: the webhook messages, and the hook
through which the engine tells of finished jobs.

What is sent. When a job enters `succeeded`, `dead` or `cancelled`, and when
a batch's last job finishes, a message goes to the job's or batch's
`callback_url` and to every enabled endpoint subscribed to that event type.
The body is `{"type", "timestamp", "data"}`, `data` being the job or batch
exactly as the REST API shows it (jobs.engine.representation). How it is
signed: jobs/webhooks/signing.py.

Who hears what (the REST API's tenancy). An endpoint hears about the jobs and
batches its owner submitted; an endpoint whose owner is an operator (an API
key with `operate`, a staff user) hears about every owner's. Whether the
owner is an operator is read when the job finishes, so a key that loses
`operate` (or is revoked) stops its endpoints hearing about others at once.

How it is delivered. Each message to each URL is a `WebhookDelivery` row and a
`webhook.deliver` job on the "webhooks" queue (jobs/webhooks/handler.py),
created in the same transaction as the state change that causes it (see
`job_finished`, which `jobs.engine.states.transition` calls through
jobs.engine.hooks: `FINISH_HOOK` is registered by `JobsConfig.ready()`), so a
finished job always gets its messages and gets each once. Delivery jobs never
cause messages.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, TypedDict

from django.contrib.auth import get_user_model
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection
from django.db.models import CharField, Q, QuerySet, Value
from django.db.models.functions import Cast, Concat
from django.utils import timezone

from jobs.db.sql import Sql
from jobs.engine.representation import BatchOut, JobOut, batch_out, job_out
from jobs.engine.submission import submit_job
from jobs.models import ApiKey, Batch, Job, State, WebhookDelivery, WebhookEndpoint
from jobs.webhooks.signing import secret_owner

BATCH_COMPLETED = "batch.completed"
EVENT_TYPES = ("job.succeeded", "job.dead", "job.cancelled", BATCH_COMPLETED)
# The states whose entry sends a message (`job.<state>`).
EVENT_STATES = frozenset({State.SUCCEEDED, State.DEAD, State.CANCELLED})

DELIVER_KIND = "webhook.deliver"
QUEUE = "webhooks"

# How long the per-process answer to "which event types have endpoints?" is trusted.
SUBSCRIPTIONS_TTL = 1.0


class Message(TypedDict):
    type: str
    timestamp: str
    data: dict[str, Any]


# --- which event types have endpoints (per process) ----------------------

_subscriptions: tuple[float, frozenset[str]] = (float("-inf"), frozenset())
_batches: dict[uuid.UUID, str] = {}  # batch id -> its callback_url (never changes)
_MAX_BATCHES = 10_000
_lock = threading.Lock()


def subscribed_event_types() -> frozenset[str]:
    """The event types some enabled endpoint subscribes to, read at most once
    per SUBSCRIPTIONS_TTL: an endpoint registered in another process gets the
    messages of jobs finishing about a second later, not the very next one."""
    global _subscriptions
    fetched_at, types = _subscriptions
    if time.monotonic() - fetched_at < SUBSCRIPTIONS_TTL:
        return types
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT DISTINCT jsonb_array_elements_text(event_types) FROM jobs_webhookendpoint WHERE disabled_at IS NULL"
        )
        types = frozenset(row[0] for row in cursor.fetchall())
    _subscriptions = (time.monotonic(), types)
    return types


def forget_subscriptions() -> None:
    """Read the subscriptions again at the next finished job (this process)."""
    global _subscriptions
    _subscriptions = (float("-inf"), frozenset())


def _batch_callback_url(batch_id: uuid.UUID) -> str:
    url = _batches.get(batch_id)
    if url is None:
        url = Batch.objects.filter(id=batch_id).values_list("callback_url", flat=True).first() or ""
        with _lock:
            if len(_batches) >= _MAX_BATCHES:
                _batches.clear()
            _batches[batch_id] = url
    return url


# --- the hook: messages of a finished job --------------------------------


def quiet_condition(target: State) -> Sql | None:
    """SQL that holds for a job row needing no message when it enters `target`,
    or None when any row may (an endpoint subscribes to `job.<target>`).

    `jobs.engine.states.transition` moves a job on this condition in one statement,
    outside any transaction; a row it does not hold for is moved again inside
    one, with `job_finished`. It reads the batch's callback_url in the same
    statement (a primary-key lookup, only for jobs of a batch).
    """
    subscribed = subscribed_event_types()
    if f"job.{State(target).value}" in subscribed:
        return None
    if BATCH_COMPLETED in subscribed:
        batch = "jobs_job.batch_id IS NULL"
    else:
        batch = (
            "(jobs_job.batch_id IS NULL OR NOT EXISTS (SELECT 1 FROM jobs_batch b"
            " WHERE b.id = jobs_job.batch_id AND b.callback_url <> ''))"
        )
    return Sql(f"kind = %s OR (callback_url = '' AND {batch})", DELIVER_KIND)


def job_finished(job: Job) -> None:
    """Create the messages `job` entering its state causes: `job.<state>` to its
    callback_url and subscribed endpoints, and `batch.completed` when it was
    its batch's last active job. Called by `jobs.engine.states.transition` with the
    updated row, inside the transaction of the change.

    Costs no query when nothing is to be sent (the subscriptions and batch
    callback URLs are cached per process).
    """
    if job.kind == DELIVER_KIND or job.state not in EVENT_STATES:
        return
    event_type = f"job.{State(job.state).value}"
    subscribed = subscribed_event_types()
    if job.callback_url or event_type in subscribed:
        endpoints = _subscribers(event_type, job.owner) if event_type in subscribed else []
        if job.callback_url or endpoints:
            _enqueue(
                event_type,
                _job_data(job),
                callback_url=job.callback_url,
                owner=job.owner,
                endpoints=endpoints,
                job=job,
            )
    if job.batch_id is not None and (BATCH_COMPLETED in subscribed or _batch_callback_url(job.batch_id)):
        _batch_completed(job.batch_id)


class Messages:
    """The webhooks' `jobs.engine.hooks.FinishHook`."""

    event_states = EVENT_STATES
    quiet_condition = staticmethod(quiet_condition)
    job_finished = staticmethod(job_finished)


FINISH_HOOK = Messages()


def _batch_completed(batch_id: uuid.UUID) -> None:
    """Send `batch.completed` if no job of the batch is active any more.

    The batch row is locked first: two of its last jobs finishing at once
    then check one after the other, and the second sees the first's commit
    (a READ COMMITTED statement sees what committed before it started), so
    exactly one of them sends the message.
    """
    batch = Batch.objects.select_for_update().filter(id=batch_id).first()
    if batch is None:
        return
    with connection.cursor() as cursor:
        # States written out so that the planner can use job_active_by_batch.
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM jobs_job WHERE batch_id = %s"
            " AND state IN ('queued', 'scheduled', 'running', 'retrying'))",
            [str(batch_id)],
        )
        if cursor.fetchone()[0]:
            return
    endpoints = _subscribers(BATCH_COMPLETED, batch.owner) if BATCH_COMPLETED in subscribed_event_types() else []
    if batch.callback_url or endpoints:
        _enqueue(
            BATCH_COMPLETED,
            _batch_data(batch),
            callback_url=batch.callback_url,
            owner=batch.owner,
            endpoints=endpoints,
            batch=batch,
        )


def _subscribers(event_type: str, owner: str) -> list[WebhookEndpoint]:
    """The enabled endpoints subscribed to `event_type` that may hear about
    what `owner` submitted: `owner`'s own and the operators'."""
    subscribed = WebhookEndpoint.objects.filter(disabled_at__isnull=True, event_types__contains=[event_type])
    return list(subscribed.filter(Q(owner=owner) | _operator_owned()))


def _operator_owned() -> Q:
    """Endpoints whose owner is, now, an operator: an API key with `operate`
    that is not revoked, or an active staff user. One query with the caller's."""
    keys = ApiKey.objects.filter(revoked_at__isnull=True, scopes__contains=["operate"])
    staff = get_user_model().objects.filter(is_staff=True, is_active=True)
    return Q(owner__in=_owner_strings(keys, "apikey:")) | Q(owner__in=_owner_strings(staff, "user:"))


def _owner_strings(query: QuerySet, prefix: str) -> QuerySet:
    """The owner strings ("apikey:<id>", "user:<pk>") of the rows of `query`, as a subquery."""
    return query.annotate(owner_string=Concat(Value(prefix), Cast("pk", CharField()))).values("owner_string")


def _enqueue(
    event_type: str,
    data: dict[str, Any],
    *,
    callback_url: str,
    owner: str,
    endpoints: Sequence[WebhookEndpoint],
    job: Job | None = None,
    batch: Batch | None = None,
) -> list[WebhookDelivery]:
    """One delivery (row and job) per target; call inside the transaction of the cause."""
    message: Message = {"type": event_type, "timestamp": _now_text(), "data": data}
    body = json.dumps(message, cls=DjangoJSONEncoder, separators=(",", ":"))
    targets: list[tuple[str, WebhookEndpoint | None]] = [(callback_url, None)] if callback_url else []
    targets += [(endpoint.url, endpoint) for endpoint in endpoints]
    deliveries = []
    for url, endpoint in targets:
        delivery = WebhookDelivery.objects.create(
            message_id=new_message_id(),
            event_type=event_type,
            body=body,
            url=url,
            endpoint=endpoint,
            signing_owner="" if endpoint else secret_owner(owner),
            job=job,
            batch=batch,
        )
        start_delivery(delivery)
        deliveries.append(delivery)
    return deliveries


def start_delivery(delivery: WebhookDelivery) -> Job:
    deliver_job = submit_job(
        DELIVER_KIND,
        {"delivery": str(delivery.id)},
        queue=QUEUE,
        # A delivery's own schedule is in its handler; these bound the retry
        # of an attempt whose worker died.
        backoff_base=5.0,
        backoff_max=36_000.0,
        owner="webhooks",
        internal=True,
    ).job
    WebhookDelivery.objects.filter(id=delivery.id).update(deliver_job=deliver_job)
    delivery.deliver_job = deliver_job
    return deliver_job


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


def _now_text() -> str:
    return DjangoJSONEncoder().default(timezone.now())


def _job_data(job: Job) -> dict[str, Any]:
    """The job as GET /api/v1/jobs lists it (without the attempts' text and logs that GET /api/v1/jobs/{id} adds)."""
    return _as_api(JobOut, job_out(job))


def _batch_data(batch: Batch) -> dict[str, Any]:
    """The batch as GET /api/v1/batches/{id} shows it."""
    return _as_api(BatchOut, batch_out(batch))


def _as_api(schema: Any, data: dict[str, Any]) -> dict[str, Any]:
    # The API's own path: validate with the response schema, encode with
    # django-ninja's encoder. Decoding again gives plain JSON values.
    from ninja.responses import NinjaJSONEncoder

    return json.loads(json.dumps(schema.model_validate(data).model_dump(), cls=NinjaJSONEncoder))
