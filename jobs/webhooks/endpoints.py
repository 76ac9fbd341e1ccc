"""Webhook endpoints (register, list, change, delete) and the history of
the messages sent to them. What is sent and when: jobs/webhooks/messages.py;
how it is signed: jobs/webhooks/signing.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q, QuerySet, Window
from django.db.models.functions import RowNumber
from django.utils import timezone

from jobs.engine import ssrf
from jobs.errors import ConveyorError, InvalidState
from jobs.models import ACTIVE_STATES, Attempt, State, WebhookAttempt, WebhookDelivery, WebhookEndpoint
from jobs.webhooks.messages import (
    EVENT_TYPES,
    forget_subscriptions,
    start_delivery,
)
from jobs.webhooks.signing import DEFAULT_OVERLAP, RotatedSecret, new_secret, rotate

MAX_ENDPOINTS_PER_OWNER = 50


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


# --- endpoints -----------------------------------------------------------


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
        return rotate(WebhookEndpoint.objects.select_for_update().get(id=endpoint_id), overlap)


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


# --- deliveries ----------------------------------------------------------


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
        start_delivery(delivery)
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


# --- what the delivery handler records -----------------------------------


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
