"""`webhook.deliver`: send one webhook message (a `WebhookDelivery`) once.

Each attempt signs the stored body anew (a fresh `webhook-timestamp`, the same
`webhook-id`), POSTs it through `jobs.engine.ssrf`, and records the answer, latency
and first KiB of the response. Then:

- 2xx: delivered; the job succeeds.
- 410 Gone: the receiver wants no more. A registered endpoint is disabled;
  the job *succeeds* with `{"gone": true}` in its result (the message was
  answered, so it does not belong in the dead-letter queue; the delivery's
  status reads "gone").
- any other answer, a timeout or a failed connection: RetryableError, after
  the next delay of SCHEDULE, Standard Webhooks' example schedule (5 s, 5 min,
  30 min, 2 h, 5 h, 10 h, 10 h: eight attempts over about 28 hours), ±10 %
  so that messages that failed together do not return together. Once they
  are spent the job is dead: the dead-letter queue's retry sends it again.
- 429 or 503 with a `Retry-After` header (seconds or an HTTP date): the
  next attempt comes when the receiver asked, at most the schedule's longest
  delay later (a receiver cannot park a message for a week). The attempt
  still counts: a receiver that always throttles ends in the dead-letter
  queue like one that always fails.
- a URL that may not be reached (see jobs.engine.ssrf): PermanentError, dead at once.
"""

from __future__ import annotations

import random
import time
import uuid

import httpx
from django.conf import settings
from django.utils import timezone

from jobs.engine import ssrf
from jobs.engine.http import parse_retry_after
from jobs.engine.registry import Payload, handler
from jobs.errors import PermanentError, RetryableError
from jobs.webhooks import endpoints, messages
from jobs.webhooks.signing import signed_headers

SCHEDULE = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600)
# The answers whose Retry-After header sets the next attempt.
THROTTLED = frozenset({429, 503})


class DeliverPayload(Payload):
    delivery: uuid.UUID


class DeliveryFailed(RetryableError):
    pass


class DeliveryRefused(PermanentError):
    pass


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    base = SCHEDULE[min(attempt, len(SCHEDULE)) - 1]
    return base * settings.CONVEYOR_WEBHOOKS["BACKOFF_SCALE"] * random.uniform(0.9, 1.1)


def next_delay(attempt: int, response: ssrf.Response) -> float:
    """Seconds to wait after `response` failed attempt number `attempt`: what
    its Retry-After asks on a 429 or 503 (at most the schedule's longest
    delay), else the schedule's."""
    if response.status_code in THROTTLED:
        asked = parse_retry_after(response.headers)
        if asked is not None:
            return min(asked, max(SCHEDULE) * settings.CONVEYOR_WEBHOOKS["BACKOFF_SCALE"])
    return retry_delay(attempt)


@handler(
    messages.DELIVER_KIND,
    schema=DeliverPayload,
    queue=messages.QUEUE,
    max_attempts=len(SCHEDULE) + 1,
    timeout=60,
    internal=True,
)
def deliver(ctx, payload: DeliverPayload) -> dict:
    """Sends one signed webhook message (Standard Webhooks)."""
    delivery = endpoints.delivery_for_sending(payload.delivery)
    if delivery is None:
        return {"skipped": "the delivery no longer exists (its endpoint was deleted)"}
    if delivery.endpoint is not None and delivery.endpoint.disabled_at is not None:
        return {"skipped": "the endpoint is disabled"}

    started_at = timezone.now()
    started = time.monotonic()

    def record(**answer) -> None:
        endpoints.record_attempt(
            delivery,
            deliver_job_id=ctx.job_id,
            number=ctx.attempt,
            started_at=started_at,
            latency=time.monotonic() - started,
            **answer,
        )

    try:
        response = ssrf.post(delivery.url, content=delivery.body.encode(), headers=signed_headers(delivery))
    except ssrf.UnsafeURL as exc:
        record(error=f"refused: {exc}")
        raise DeliveryRefused(f"refused: {exc}") from None
    except httpx.TimeoutException as exc:
        record(error=f"timed out: {exc or type(exc).__name__}")
        raise DeliveryFailed(f"timed out: {exc or type(exc).__name__}", retry_after=retry_delay(ctx.attempt)) from None
    except httpx.HTTPError as exc:
        record(error=f"{type(exc).__name__}: {exc}")
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}", retry_after=retry_delay(ctx.attempt)) from None

    record(status_code=response.status_code, response_body=response.body)
    result = {"delivery": str(delivery.id), "message_id": delivery.message_id, "status_code": response.status_code}
    if 200 <= response.status_code < 300:
        endpoints.mark_delivered(delivery)
        return result
    if response.status_code == 410:
        endpoints.endpoint_gone(delivery)
        return {**result, "gone": True, "endpoint_disabled": delivery.endpoint_id is not None}
    raise DeliveryFailed(f"the receiver answered {response.status_code}", retry_after=next_delay(ctx.attempt, response))
