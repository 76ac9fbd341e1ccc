"""/api/v1/webhooks: endpoints an API key registers, its signing secret, and
the deliveries of jobs and batches. Thin: parse, call `jobs.services`, render.

Endpoints belong to whoever registered them (an API key, or a dashboard
user): each caller lists and changes only its own; an operator (a key with
`operate`, a session) reads any, as it reads any job. An endpoint hears about
its owner's jobs and batches only, or about all when its owner is an operator
(jobs/webhooks/messages.py), and deliveries are listed by the same rule.

Reading needs the `read` scope; registering, deleting, rotating and the signing secret need `submit`;
redelivering needs `operate`, as the other operator actions do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema, Status
from pydantic import BaseModel, ConfigDict

from jobs import services
from jobs.api.auth import require
from jobs.api.problems import Problem
from jobs.api.views import _doc
from jobs.models import WebhookDelivery, WebhookEndpoint

router = Router(tags=["webhooks"])

READ, SUBMIT, OPERATE = require("read"), require("submit"), require("operate")
EventType = Literal["job.succeeded", "job.dead", "job.cancelled", "batch.completed"]


# --- schemas ---------------------------------------------------------------


class EndpointIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"url": "https://example.com/hooks/conveyor", "event_types": ["job.succeeded", "job.dead"]}]
        },
    )

    url: str = Field(min_length=1, max_length=2000, description="http(s); must resolve to a public address.")
    event_types: list[EventType] = Field(min_length=1, max_length=4)
    description: str = Field("", max_length=200)


class EndpointOut(Schema):
    id: UUID
    url: str
    description: str
    event_types: list[str]
    created_at: datetime
    rotated_at: datetime | None
    previous_secret_expires_at: datetime | None = Field(description="Until then, messages carry two signatures.")
    disabled_at: datetime | None = Field(description="Set when the receiver answered 410 Gone, or by its owner.")
    disabled_reason: str


class CreatedEndpointOut(EndpointOut):
    secret: str = Field(description="`whsec_…`: shown only now. Verify messages with it (Standard Webhooks).")


class SecretOut(Schema):
    secret: str = Field(description="`whsec_…`: signs the messages to your jobs' and batches' callback_url.")


class RotatedOut(Schema):
    secret: str = Field(description="The new `whsec_…` secret.")
    previous_secret_expires_at: datetime | None = Field(description="The old secret signs too until then.")


class Overlap(Schema):
    overlap_seconds: int = Field(
        86400, ge=0, le=7 * 86400, description="How long the old secret keeps signing (default a day)."
    )


class DeliveryAttemptOut(Schema):
    number: int
    started_at: datetime
    status_code: int | None
    latency_ms: int | None
    response_body: str = Field(description="The first 1 KiB of the answer.")
    error: str | None = Field(description="Timeout, refused address, failed connection.")


class DeliveryOut(Schema):
    id: UUID
    message_id: str = Field(description="The `webhook-id` header: the same on every retry and redelivery.")
    event_type: str
    url: str
    endpoint: UUID | None = Field(description="The registered endpoint; null for a callback_url.")
    status: str = Field(description="pending, delivered, failed, gone (410) or skipped (endpoint disabled).")
    created_at: datetime
    delivered_at: datetime | None
    deliver_job: UUID | None = Field(description="The latest `webhook.deliver` job carrying it.")
    attempts: list[DeliveryAttemptOut]


# --- the caller's signing secret -------------------------------------------


@router.get("/webhooks/default/secret", auth=SUBMIT, response=SecretOut, openapi_extra=_doc())
def signing_secret(request: HttpRequest):
    """The secret that signs messages to the callback_url of what you submit
    (dashboard users share the project's default secret)."""
    return {"secret": services.signing_secret(request.auth.owner).secret}


@router.post("/webhooks/default/rotate", auth=SUBMIT, response=RotatedOut, openapi_extra=_doc())
def rotate_signing_secret(request: HttpRequest, query: Query[Overlap]):
    """A new signing secret; the old one keeps signing, beside it, for `overlap_seconds`."""
    rotated = services.rotate_signing_secret(request.auth.owner, overlap=timedelta(seconds=query.overlap_seconds))
    return {"secret": rotated.secret, "previous_secret_expires_at": rotated.previous_secret_expires_at}


# --- endpoints -------------------------------------------------------------


@router.post("/webhooks", auth=SUBMIT, response={201: CreatedEndpointOut}, openapi_extra=_doc(400, 413, 415))
def create_endpoint(request: HttpRequest, body: EndpointIn):
    """Register an endpoint for some event types. Its secret is in this answer only."""
    with _problems():
        created = services.create_endpoint(
            owner=request.auth.owner, url=body.url, event_types=body.event_types, description=body.description
        )
    return Status(201, {**endpoint_out(created.endpoint), "secret": created.secret})


@router.get("/webhooks", auth=READ, response=list[EndpointOut], openapi_extra=_doc())
def list_endpoints(request: HttpRequest):
    """Your endpoints, newest first (50 at most)."""
    return [endpoint_out(e) for e in services.list_endpoints(owner=request.auth.owner)]


@router.get("/webhooks/{uuid:endpoint_id}", auth=READ, response=EndpointOut, openapi_extra=_doc(404))
def get_endpoint(request: HttpRequest, endpoint_id: UUID):
    """One of your endpoints (an operator reads any)."""
    with _problems():
        return endpoint_out(services.get_endpoint(endpoint_id, owner=request.auth.visible_owner))


@router.delete("/webhooks/{uuid:endpoint_id}", auth=SUBMIT, response={204: None}, openapi_extra=_doc(404))
def delete_endpoint(request: HttpRequest, endpoint_id: UUID):
    """Delete an endpoint and its delivery history; what was pending is not sent."""
    with _problems():
        services.delete_endpoint(endpoint_id, owner=request.auth.owner)
    return Status(204, None)


@router.post("/webhooks/{uuid:endpoint_id}/rotate", auth=SUBMIT, response=RotatedOut, openapi_extra=_doc(404))
def rotate_endpoint_secret(request: HttpRequest, endpoint_id: UUID, query: Query[Overlap]):
    """A new secret; the old one keeps signing, beside it, for `overlap_seconds`."""
    with _problems():
        rotated = services.rotate_endpoint_secret(
            endpoint_id, owner=request.auth.owner, overlap=timedelta(seconds=query.overlap_seconds)
        )
    return {"secret": rotated.secret, "previous_secret_expires_at": rotated.previous_secret_expires_at}


@router.post("/webhooks/{uuid:endpoint_id}/disable", auth=SUBMIT, response=EndpointOut, openapi_extra=_doc(404))
def disable_endpoint(request: HttpRequest, endpoint_id: UUID):
    """Stop sending to an endpoint (what is pending is not sent)."""
    with _problems():
        endpoint = services.disable_endpoint(endpoint_id, owner=request.auth.owner, reason="disabled by its owner")
    return endpoint_out(endpoint)


@router.post("/webhooks/{uuid:endpoint_id}/enable", auth=SUBMIT, response=EndpointOut, openapi_extra=_doc(404))
def enable_endpoint(request: HttpRequest, endpoint_id: UUID):
    """Send to an endpoint again (after a 410 Gone, say)."""
    with _problems():
        return endpoint_out(services.enable_endpoint(endpoint_id, owner=request.auth.owner))


@router.get("/webhooks/{uuid:endpoint_id}/deliveries", auth=READ, response=list[DeliveryOut], openapi_extra=_doc(404))
def endpoint_deliveries(request: HttpRequest, endpoint_id: UUID):
    """The endpoint's latest 50 messages about what you submitted, newest first
    (an operator reads any endpoint's, about everything)."""
    viewer = request.auth.visible_owner
    with _problems():
        endpoint = services.get_endpoint(endpoint_id, owner=viewer)
    return [delivery_out(d) for d in services.endpoint_deliveries(endpoint.id, viewer=viewer)]


# --- deliveries of a job or batch -------------------------------------------


@router.get("/jobs/{job_id}/deliveries", auth=READ, response=list[DeliveryOut], openapi_extra=_doc(404))
def job_deliveries(request: HttpRequest, job_id: UUID):
    """The webhook messages about a job, oldest first, with every attempt
    (to its callback_url and your endpoints; an operator sees all)."""
    viewer = request.auth.visible_owner
    job = services.get_job(job_id, owner=viewer)
    return [delivery_out(d) for d in services.job_deliveries(job.id, viewer=viewer)]


@router.post(
    "/jobs/{job_id}/deliveries/{delivery_id}/redeliver",
    auth=OPERATE,
    response={202: DeliveryOut},
    openapi_extra=_doc(404, 409),
)
def redeliver_job_message(request: HttpRequest, job_id: UUID, delivery_id: UUID):
    """Send a message again, with the same `webhook-id` (409 if its endpoint is disabled)."""
    with _problems():
        return Status(202, delivery_out(services.redeliver(delivery_id, job_id=job_id)))


@router.get("/batches/{batch_id}/deliveries", auth=READ, response=list[DeliveryOut], openapi_extra=_doc(404))
def batch_deliveries(request: HttpRequest, batch_id: UUID):
    """The `batch.completed` messages of a batch, oldest first, with every
    attempt (to its callback_url and your endpoints; an operator sees all)."""
    viewer = request.auth.visible_owner
    batch = services.get_batch(batch_id, owner=viewer)
    return [delivery_out(d) for d in services.batch_deliveries(batch.id, viewer=viewer)]


@router.post(
    "/batches/{batch_id}/deliveries/{delivery_id}/redeliver",
    auth=OPERATE,
    response={202: DeliveryOut},
    openapi_extra=_doc(404, 409),
)
def redeliver_batch_message(request: HttpRequest, batch_id: UUID, delivery_id: UUID):
    """Send a message again, with the same `webhook-id` (409 if its endpoint is disabled)."""
    with _problems():
        return Status(202, delivery_out(services.redeliver(delivery_id, batch_id=batch_id)))


# --- rendering -------------------------------------------------------------


def endpoint_out(endpoint: WebhookEndpoint) -> dict[str, Any]:
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "event_types": endpoint.event_types,
        "created_at": endpoint.created_at,
        "rotated_at": endpoint.rotated_at,
        "previous_secret_expires_at": endpoint.previous_secret_expires_at,
        "disabled_at": endpoint.disabled_at,
        "disabled_reason": endpoint.disabled_reason,
    }


def delivery_out(delivery: WebhookDelivery) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "message_id": delivery.message_id,
        "event_type": delivery.event_type,
        "url": delivery.url,
        "endpoint": delivery.endpoint_id,
        "status": services.delivery_status(delivery),
        "created_at": delivery.created_at,
        "delivered_at": delivery.delivered_at,
        "deliver_job": delivery.deliver_job_id,
        "attempts": [
            {
                "number": a.number,
                "started_at": a.started_at,
                "status_code": a.status_code,
                "latency_ms": a.latency_ms,
                "response_body": a.response_body,
                "error": a.error or None,
            }
            for a in delivery.attempts.all()
        ],
    }


@contextmanager
def _problems() -> Iterator[None]:
    """The webhook errors of the engine, as problems."""
    try:
        yield
    except (services.EndpointNotFound, services.DeliveryNotFound) as exc:
        raise Problem("not-found", exc.message) from None
    except services.InvalidEndpoint as exc:
        raise Problem("validation-error", "The endpoint is refused.", errors=exc.errors) from None
