"""Signing webhook messages (Standard Webhooks), and the secrets that sign them.

Headers `webhook-id` (one per message, the same on every retry and
redelivery), `webhook-timestamp` (the attempt's, in seconds) and
`webhook-signature`: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`, keyed
by the secret (`whsec_` + base64 of 32 random bytes). After a rotation the
previous secret keeps signing too, space separated, until its overlap ends.
Messages to an endpoint are signed with the endpoint's secret; messages to a
`callback_url` with the signing secret of whoever submitted the job: each API
key has its own (owner "apikey:<id>"); jobs submitted by dashboard users, the
admin or the CLI use the project's default secret (owner "").
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets as random_secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from jobs.models import SigningSecret, WebhookDelivery, WebhookEndpoint

SECRET_PREFIX = "whsec_"
DEFAULT_OVERLAP = timedelta(hours=24)
MAX_OVERLAP = timedelta(days=7)
PROJECT_OWNER = ""  # the owner of the project's default signing secret


@dataclass(frozen=True)
class RotatedSecret:
    secret: str
    previous_secret_expires_at: datetime | None


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


# --- signing secrets of API keys and of the project ----------------------


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
        return rotate(holder, overlap)


def rotate(holder: WebhookEndpoint | SigningSecret, overlap: timedelta) -> RotatedSecret:
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
