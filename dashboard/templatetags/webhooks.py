"""Template filters of the webhook pages."""

from __future__ import annotations

from django import template

from jobs import services
from jobs.models import WebhookAttempt, WebhookDelivery

register = template.Library()


@register.filter
def delivery_status(delivery: WebhookDelivery) -> str:
    """pending, delivered, failed, gone or skipped (see `jobs.webhooks.endpoints.delivery_status`)."""
    return services.delivery_status(delivery)


@register.filter
def last_attempt(delivery: WebhookDelivery) -> WebhookAttempt | None:
    """The latest HTTP attempt (from the prefetched attempts)."""
    attempts = list(delivery.attempts.all())
    return attempts[-1] if attempts else None
