"""Signed webhooks: endpoints, secrets, messages, and the jobs that deliver them.

What is sent. When a job enters `succeeded`, `dead` or `cancelled`, and when
a batch's last job finishes, a message goes to the job's or batch's
`callback_url` and to every enabled endpoint subscribed to that event type.
The body is `{"type", "timestamp", "data"}`, `data` being the job or batch
exactly as the REST API shows it.

How it is signed (Standard Webhooks). Headers `webhook-id` (one per message,
the same on every retry and redelivery), `webhook-timestamp` (the attempt's,
in seconds) and `webhook-signature`: `v1,` + base64 HMAC-SHA256 of
`id.timestamp.body`, keyed by the secret (`whsec_` + base64 of 32 random
bytes). After a rotation the previous secret keeps signing too, space
separated, until its overlap ends. Messages to an endpoint are signed with the
endpoint's secret; messages to a `callback_url` with the signing secret of
whoever submitted the job: each API key has its own (owner "apikey:<id>");
jobs submitted by dashboard users, the admin or the CLI use the project's
default secret (owner "").

Who hears what (the REST API's tenancy). An endpoint hears about the jobs and
batches its owner submitted; an endpoint whose owner is an operator (an API
key with `operate`, a staff user) hears about every owner's. Whether the
owner is an operator is read when the job finishes, so a key that loses
`operate` (or is revoked) stops its endpoints hearing about others at once.

How it is delivered. Each message to each URL is a `WebhookDelivery` row and a
`webhook.deliver` job on the "webhooks" queue (jobs/webhooks/handler.py),
created in the same transaction as the state change that causes it (see
`job_finished`, called by `jobs.engine.states.transition`), so a finished job always
gets its messages and gets each once. Delivery jobs never cause messages.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets as random_secrets
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.db.models import CharField, F, Q, QuerySet, Value, Window
from django.db.models.functions import Cast, Concat, RowNumber
from django.utils import timezone

from jobs.engine import ssrf, states
from jobs.engine.submission import submit_job
from jobs.errors import ConveyorError, InvalidState
from jobs.models import (
    ACTIVE_STATES,
    ApiKey,
    Attempt,
    Batch,
    Job,
    SigningSecret,
    State,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)

BATCH_COMPLETED = "batch.completed"
EVENT_TYPES = ("job.succeeded", "job.dead", "job.cancelled", BATCH_COMPLETED)
# The states whose entry sends a message (`job.<state>`).
EVENT_STATES = frozenset({State.SUCCEEDED, State.DEAD, State.CANCELLED})

DELIVER_KIND = "webhook.deliver"
QUEUE = "webhooks"
SECRET_PREFIX = "whsec_"
DEFAULT_OVERLAP = timedelta(hours=24)
MAX_OVERLAP = timedelta(days=7)
MAX_ENDPOINTS_PER_OWNER = 50
PROJECT_OWNER = ""  # the owner of the project's default signing secret

# How long the per-process answer to "which event types have endpoints?" is trusted.
SUBSCRIPTIONS_TTL = 1.0


class Message(TypedDict):
    type: str
    timestamp: str
    data: dict[str, Any]


class EndpointNotFound(ConveyorError):
    code = "not-found"


class DeliveryNotFound(ConveyorError):
    code = "not-found"


class InvalidEndpoint(ConveyorError):
    """The endpoint is refused; `errors` lists each problem with its field."""

    code = "validation-error"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


@dataclass(frozen=True)
class CreatedEndpoint:
    endpoint: WebhookEndpoint
    secret: str  # shown once


@dataclass(frozen=True)
class RotatedSecret:
    secret: str
    previous_secret_expires_at: datetime | None


# --- signing ---------------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(random_secrets.token_bytes(32)).decode()


def sign(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """One `webhook-signature` entry: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signing_keys(holder: WebhookEndpoint | SigningSecret, *, now: datetime | None = None) -> list[str]:
    """The secrets that sign now: the current one, and the previous one while its overlap lasts."""
    now = now or timezone.now()
    keys = [holder.secret]
    expires = holder.previous_secret_expires_at
    if holder.previous_secret and expires is not None and expires > now:
        keys.append(holder.previous_secret)
    return keys


def signed_headers(delivery: WebhookDelivery, *, now: datetime | None = None) -> dict[str, str]:
    """The headers of one attempt of `delivery`, signed at `now`."""
    now = now or timezone.now()
    holder = delivery.endpoint or signing_secret(delivery.signing_owner)
    timestamp = int(now.timestamp())
    signatures = " ".join(
        sign(key, delivery.message_id, timestamp, delivery.body) for key in signing_keys(holder, now=now)
    )
    return {
        "content-type": "application/json",
        "user-agent": "Conveyor-Webhooks/1",
        "webhook-id": delivery.message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures,
    }


# --- signing secrets of API keys and of the project ------------------------


def secret_owner(owner: str) -> str:
    """Whose signing secret signs the callbacks of what `owner` submits: an API
    key's own, or the project's default for everyone else (users, CLI)."""
    return owner if owner.startswith("apikey:") else PROJECT_OWNER


def signing_secret(owner: str) -> SigningSecret:
    """The signing secret of `owner`'s callbacks, created on first use."""
    secret, _ = SigningSecret.objects.get_or_create(owner=secret_owner(owner), defaults={"secret": new_secret()})
    return secret


def rotate_signing_secret(owner: str, *, overlap: timedelta = DEFAULT_OVERLAP) -> RotatedSecret:
    """A new signing secret for `owner`'s callbacks; the old one keeps signing for `overlap`."""
    signing_secret(owner)
    with transaction.atomic():
        holder = SigningSecret.objects.select_for_update().get(owner=secret_owner(owner))
        return _rotate(holder, overlap)


# --- endpoints -------------------------------------------------------------


def create_endpoint(*, owner: str, url: str, event_types: Sequence[str], description: str = "") -> CreatedEndpoint:
    """Register an endpoint. Raises InvalidEndpoint naming each bad field
    (a URL that is not http(s), or whose host is or resolves to a refused address)."""
    errors = _endpoint_errors(url, event_types, description)
    if WebhookEndpoint.objects.filter(owner=owner).count() >= MAX_ENDPOINTS_PER_OWNER:
        errors.append({"field": "url", "message": f"you have {MAX_ENDPOINTS_PER_OWNER} endpoints, the most allowed"})
    if errors:
        raise InvalidEndpoint(errors)
    secret = new_secret()
    endpoint = WebhookEndpoint.objects.create(
        owner=owner, url=url, event_types=_ordered(event_types), description=description, secret=secret
    )
    forget_subscriptions()
    return CreatedEndpoint(endpoint, secret)


def list_endpoints(*, owner: str | None = None) -> list[WebhookEndpoint]:
    """Newest first; all of them when `owner` is None."""
    query = WebhookEndpoint.objects.all()
    if owner is not None:
        query = query.filter(owner=owner)
    return list(query.order_by("-created_at", "-id"))


def get_endpoint(endpoint_id: uuid.UUID | str, *, owner: str | None = None) -> WebhookEndpoint:
    """Raises EndpointNotFound, also for another owner's endpoint."""
    query = WebhookEndpoint.objects.all() if owner is None else WebhookEndpoint.objects.filter(owner=owner)
    try:
        return query.get(id=endpoint_id)
    except (WebhookEndpoint.DoesNotExist, ValidationError, ValueError, TypeError):
        raise EndpointNotFound(f"no webhook endpoint with id {endpoint_id}") from None


def delete_endpoint(endpoint_id: uuid.UUID | str, *, owner: str | None = None) -> None:
    """Delete the endpoint and its delivery history; its pending deliveries end unsent."""
    get_endpoint(endpoint_id, owner=owner).delete()
    forget_subscriptions()


def rotate_endpoint_secret(
    endpoint_id: uuid.UUID | str, *, owner: str | None = None, overlap: timedelta = DEFAULT_OVERLAP
) -> RotatedSecret:
    """A new secret for the endpoint; the old one keeps signing for `overlap`."""
    get_endpoint(endpoint_id, owner=owner)
    with transaction.atomic():
        return _rotate(WebhookEndpoint.objects.select_for_update().get(id=endpoint_id), overlap)


def disable_endpoint(endpoint_id: uuid.UUID | str, *, owner: str | None = None, reason: str = "") -> WebhookEndpoint:
    """Stop sending to the endpoint (its pending deliveries end unsent)."""
    endpoint = get_endpoint(endpoint_id, owner=owner)
    WebhookEndpoint.objects.filter(id=endpoint.id, disabled_at__isnull=True).update(
        disabled_at=timezone.now(), disabled_reason=reason[:300]
    )
    forget_subscriptions()
    endpoint.refresh_from_db()
    return endpoint


def enable_endpoint(endpoint_id: uuid.UUID | str, *, owner: str | None = None) -> WebhookEndpoint:
    endpoint = get_endpoint(endpoint_id, owner=owner)
    WebhookEndpoint.objects.filter(id=endpoint.id).update(disabled_at=None, disabled_reason="")
    forget_subscriptions()
    endpoint.refresh_from_db()
    return endpoint


def _endpoint_errors(url: Any, event_types: Any, description: Any) -> list[dict[str, str]]:
    errors = []
    if not isinstance(url, str) or not url:
        errors.append({"field": "url", "message": "is required"})
    else:
        try:
            ssrf.check_url(url)
        except ssrf.UnsafeURL as exc:
            errors.append({"field": "url", "message": str(exc)})
    if not isinstance(event_types, (list, tuple)) or not event_types:
        errors.append({"field": "event_types", "message": f"must list some of {', '.join(EVENT_TYPES)}"})
    else:
        for index, name in enumerate(event_types):
            if name not in EVENT_TYPES:
                errors.append(
                    {"field": f"event_types[{index}]", "message": f"unknown event type; use {', '.join(EVENT_TYPES)}"}
                )
    if not isinstance(description, str) or len(description) > 200:
        errors.append({"field": "description", "message": "must be at most 200 characters"})
    return errors


def _ordered(event_types: Iterable[str]) -> list[str]:
    chosen = set(event_types)
    return [name for name in EVENT_TYPES if name in chosen]


def _rotate(holder: WebhookEndpoint | SigningSecret, overlap: timedelta) -> RotatedSecret:
    """Call in a transaction, with the holder's row locked."""
    if not timedelta(0) <= overlap <= MAX_OVERLAP:
        raise ValueError(f"the overlap must be between 0 and {MAX_OVERLAP.days} days")
    now = timezone.now()
    holder.previous_secret = holder.secret
    holder.previous_secret_expires_at = now + overlap
    holder.secret = new_secret()
    holder.rotated_at = now
    holder.save(update_fields=["secret", "previous_secret", "previous_secret_expires_at", "rotated_at"])
    return RotatedSecret(holder.secret, holder.previous_secret_expires_at)


# --- which event types have endpoints (per process) -------------------------

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


# --- the hook: messages of a finished job ---------------------------------


def quiet_condition(target: State) -> states.Sql | None:
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
    return states.Sql(f"kind = %s OR (callback_url = '' AND {batch})", DELIVER_KIND)


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
        _start_delivery(delivery)
        deliveries.append(delivery)
    return deliveries


def _start_delivery(delivery: WebhookDelivery) -> Job:
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
    """The job as GET /api/v1/jobs/{id} shows it."""
    from jobs.api.schemas import JobOut
    from jobs.api.views import job_out

    return _as_api(JobOut, job_out(job))


def _batch_data(batch: Batch) -> dict[str, Any]:
    """The batch as GET /api/v1/batches/{id} shows it."""
    from jobs.api.schemas import BatchOut
    from jobs.api.views import batch_out

    return _as_api(BatchOut, batch_out(batch))


def _as_api(schema: Any, data: dict[str, Any]) -> dict[str, Any]:
    # The API's own path: validate with the response schema, encode with
    # django-ninja's encoder. Decoding again gives plain JSON values.
    from ninja.responses import NinjaJSONEncoder

    return json.loads(json.dumps(schema.model_validate(data).model_dump(), cls=NinjaJSONEncoder))


# --- deliveries --------------------------------------------------------------


def job_deliveries(job_id: uuid.UUID | str, *, viewer: str | None = None) -> list[WebhookDelivery]:
    """The messages about a job, oldest first, with their attempts. With
    `viewer` (a caller limited to its own), only those to the callback_url
    and to `viewer`'s endpoints: an operator's endpoint is not its business."""
    return _deliveries(_to_viewer(WebhookDelivery.objects.filter(job_id=job_id), viewer))


def batch_deliveries(batch_id: uuid.UUID | str, *, viewer: str | None = None) -> list[WebhookDelivery]:
    """The messages about a batch (batch.completed), oldest first, with their
    attempts; `viewer` as for `job_deliveries`."""
    return _deliveries(_to_viewer(WebhookDelivery.objects.filter(batch_id=batch_id), viewer))


def _to_viewer(query: QuerySet, viewer: str | None) -> QuerySet:
    return query if viewer is None else query.filter(Q(endpoint__isnull=True) | Q(endpoint__owner=viewer))


def endpoint_deliveries(
    endpoint_id: uuid.UUID | str, *, limit: int = 50, viewer: str | None = None
) -> list[WebhookDelivery]:
    """An endpoint's latest messages, newest first, with their attempts. With
    `viewer`, only those about `viewer`'s jobs and batches (messages sent
    while its owner was an operator are about others' too)."""
    query = WebhookDelivery.objects.filter(endpoint_id=endpoint_id)
    if viewer is not None:
        query = query.filter(Q(job__owner=viewer) | Q(batch__owner=viewer))
    query = query.order_by("-created_at", "-id")[:limit]
    return list(query.select_related("deliver_job", "endpoint").prefetch_related("attempts"))


def recent_deliveries(
    endpoint_ids: Iterable[uuid.UUID | str], *, per_endpoint: int = 5
) -> dict[uuid.UUID, list[WebhookDelivery]]:
    """The latest `per_endpoint` messages of each endpoint, newest first, with
    their attempts: endpoint id -> deliveries (three queries in all)."""
    ranked = WebhookDelivery.objects.filter(endpoint_id__in=list(endpoint_ids)).annotate(
        rank=Window(RowNumber(), partition_by=F("endpoint_id"), order_by=[F("created_at").desc(), F("id").desc()])
    )
    found: dict[uuid.UUID, list[WebhookDelivery]] = {}
    query = ranked.filter(rank__lte=per_endpoint).order_by("-created_at", "-id")
    for delivery in query.select_related("deliver_job", "endpoint").prefetch_related("attempts"):
        found.setdefault(delivery.endpoint_id, []).append(delivery)
    return found


def _deliveries(query) -> list[WebhookDelivery]:
    return list(
        query.order_by("created_at", "id").select_related("deliver_job", "endpoint").prefetch_related("attempts")
    )


def get_delivery(
    delivery_id: uuid.UUID | str, *, job_id: uuid.UUID | str | None = None, batch_id: uuid.UUID | str | None = None
) -> WebhookDelivery:
    """Raises DeliveryNotFound (also when it is not about `job_id` / `batch_id`)."""
    query = WebhookDelivery.objects.select_related("deliver_job", "endpoint").prefetch_related("attempts")
    if job_id is not None:
        query = query.filter(job_id=job_id)
    if batch_id is not None:
        query = query.filter(batch_id=batch_id)
    try:
        return query.get(id=delivery_id)
    except (WebhookDelivery.DoesNotExist, ValidationError, ValueError, TypeError):
        raise DeliveryNotFound(f"no webhook delivery with id {delivery_id}") from None


def redeliver(
    delivery_id: uuid.UUID | str, *, job_id: uuid.UUID | str | None = None, batch_id: uuid.UUID | str | None = None
) -> WebhookDelivery:
    """Send a message again, with the same `webhook-id` and body (signed anew),
    as a new `webhook.deliver` job. Raises DeliveryNotFound, or InvalidState
    when its endpoint is disabled."""
    delivery = get_delivery(delivery_id, job_id=job_id, batch_id=batch_id)
    if delivery.endpoint is not None and delivery.endpoint.disabled_at is not None:
        raise InvalidState(f"the endpoint {delivery.endpoint.id} is disabled; enable it before redelivering")
    with transaction.atomic():
        _start_delivery(delivery)
    return get_delivery(delivery.id)


def delivery_status(delivery: WebhookDelivery) -> str:
    """pending, delivered, failed (gave up), gone (the receiver answered 410)
    or skipped (its endpoint was disabled before it was sent)."""
    job = delivery.deliver_job
    if job is not None and job.state in ACTIVE_STATES:
        return "pending"
    if delivery.delivered_at is not None:
        return "delivered"
    if job is not None and job.state == State.SUCCEEDED:
        return "gone" if (job.result or {}).get("gone") else "skipped"
    return "failed"


# --- what the delivery handler records --------------------------------------


def record_attempt(
    delivery: WebhookDelivery,
    *,
    deliver_job_id: uuid.UUID,
    number: int,
    started_at: datetime,
    latency: float,
    status_code: int | None = None,
    response_body: bytes = b"",
    error: str = "",
) -> WebhookAttempt:
    """Record one HTTP attempt, keyed by the engine's open attempt row (a rerun writes once)."""
    job_attempt = (
        Attempt.objects.filter(job_id=deliver_job_id, number=number, finished_at__isnull=True).order_by("-id").first()
    )
    values = {
        "delivery": delivery,
        "deliver_job_id": deliver_job_id,
        "number": number,
        "started_at": started_at,
        "latency_ms": round(latency * 1000),
        "status_code": status_code,
        "response_body": response_body[: ssrf.MAX_BODY].decode("utf-8", errors="replace").replace("\x00", "\ufffd"),
        "error": error[:2000],
    }
    if job_attempt is None:
        return WebhookAttempt.objects.create(**values)
    attempt, _ = WebhookAttempt.objects.update_or_create(job_attempt=job_attempt, defaults=values)
    return attempt


def mark_delivered(delivery: WebhookDelivery) -> None:
    WebhookDelivery.objects.filter(id=delivery.id).update(delivered_at=timezone.now())


def endpoint_gone(delivery: WebhookDelivery) -> None:
    """The receiver answered 410 Gone: disable its endpoint."""
    if delivery.endpoint_id is None:
        return
    WebhookEndpoint.objects.filter(id=delivery.endpoint_id, disabled_at__isnull=True).update(
        disabled_at=timezone.now(), disabled_reason=f"the receiver answered 410 Gone to message {delivery.message_id}"
    )
    forget_subscriptions()


def delivery_for_sending(delivery_id: uuid.UUID | str) -> WebhookDelivery | None:
    return WebhookDelivery.objects.select_related("endpoint").filter(id=delivery_id).first()
