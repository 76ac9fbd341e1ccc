"""Signing per Standard Webhooks, checked against its reference implementation."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from jobs.models import WebhookDelivery, WebhookEndpoint
from jobs.webhooks import signing


def test_a_secret_is_whsec_and_the_base64_of_32_random_bytes():
    secret = signing.new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert signing.new_secret() != secret


def test_a_signature_is_the_reference_implementations():
    secret = signing.new_secret()
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    body = '{"type":"job.succeeded","data":{"id":"x"}}'
    expected = Webhook(secret).sign("msg_1", when, body)
    assert signing.sign(secret, "msg_1", int(when.timestamp()), body) == expected


def _delivery(endpoint: WebhookEndpoint) -> WebhookDelivery:
    return WebhookDelivery(message_id="msg_abc", event_type="job.succeeded", body='{"a":1}', endpoint=endpoint)


def test_signed_headers_verify_with_standardwebhooks():
    endpoint = WebhookEndpoint(secret=signing.new_secret())
    headers = signing.signed_headers(_delivery(endpoint))
    assert headers["webhook-id"] == "msg_abc"
    assert Webhook(endpoint.secret).verify('{"a":1}', headers) == {"a": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify('{"a":1}', headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(endpoint.secret).verify('{"a":2}', headers)


def test_during_a_rotation_both_secrets_sign_and_after_it_only_the_new_one():
    old, new = signing.new_secret(), signing.new_secret()
    now = datetime.now(UTC)
    endpoint = WebhookEndpoint(secret=new, previous_secret=old, previous_secret_expires_at=now + timedelta(hours=1))

    headers = signing.signed_headers(_delivery(endpoint), now=now)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify('{"a":1}', headers)

    later = now + timedelta(hours=1, seconds=1)
    assert signing.signing_keys(endpoint, now=later) == [new]


def test_a_message_signed_long_ago_is_refused_by_receivers():
    """Why every attempt is signed anew: receivers refuse timestamps over 5 minutes old."""
    endpoint = WebhookEndpoint(secret=signing.new_secret())
    headers = signing.signed_headers(_delivery(endpoint), now=datetime.now(UTC) - timedelta(minutes=6))
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(endpoint.secret).verify('{"a":1}', headers)
