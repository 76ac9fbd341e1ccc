"""Webhooks in the admin: listed and switched through `jobs.services`; no
secret is ever shown nor editable."""

from __future__ import annotations

import ipaddress

import pytest
from django.contrib.auth.models import Permission, User

from jobs import services
from jobs.engine import ssrf
from jobs.models import Job, SigningSecret, State, WebhookDelivery, WebhookEndpoint
from jobs.webhooks import endpoints
from tests.jobs.webhooks.conftest import deliveries_of, finish, operator_owner

URL = "https://hooks.example.com/in"


@pytest.fixture(autouse=True)
def _public_dns(monkeypatch):
    monkeypatch.setattr(ssrf, "resolve", lambda host, port: [ipaddress.ip_address("93.184.215.14")])


@pytest.fixture
def superuser_client(client, db):
    client.force_login(User.objects.create_superuser("ada", password="pw"))
    return client


def _endpoint(**overrides) -> WebhookEndpoint:
    options = {"owner": operator_owner(), "url": URL, "event_types": ["job.succeeded"]} | overrides
    return services.create_endpoint(**options).endpoint


def _delivered(make_job) -> WebhookDelivery:
    (delivery,) = deliveries_of(finish(make_job()))
    endpoints.record_attempt(
        delivery,
        deliver_job_id=delivery.deliver_job_id,
        number=1,
        started_at=delivery.created_at,
        latency=0.05,
        status_code=502,
        response_body=b"bad gateway",
    )
    finish(Job.objects.get(id=delivery.deliver_job_id), State.DEAD)
    return WebhookDelivery.objects.get(id=delivery.id)


def test_no_admin_page_shows_a_secret(superuser_client, make_job):
    endpoint = _endpoint(description="orders")
    services.rotate_endpoint_secret(endpoint.id)  # a previous secret too
    delivery = _delivered(make_job)
    services.signing_secret("")  # the project's default signing secret
    endpoint.refresh_from_db()
    secrets = [endpoint.secret, endpoint.previous_secret, *SigningSecret.objects.values_list("secret", flat=True)]
    assert all(s.startswith("whsec_") for s in secrets) and len(secrets) == 3

    pages = [
        "/admin/",
        "/admin/jobs/",
        "/admin/jobs/webhookendpoint/",
        f"/admin/jobs/webhookendpoint/?q={endpoint.secret[6:20]}",
        f"/admin/jobs/webhookendpoint/{endpoint.id}/change/",
        f"/admin/jobs/webhookendpoint/{endpoint.id}/delete/",
        f"/admin/jobs/webhookendpoint/{endpoint.id}/history/",
        "/admin/jobs/webhookdelivery/",
        f"/admin/jobs/webhookdelivery/{delivery.id}/change/",
    ]
    for page in pages:
        response = superuser_client.get(page)
        assert response.status_code == 200, page
        html = response.content.decode()
        assert "whsec_" not in html, page
        assert not any(secret[6:] in html for secret in secrets), page
    assert superuser_client.get("/admin/jobs/signingsecret/").status_code == 404  # not registered at all

    detail = superuser_client.get(f"/admin/jobs/webhookendpoint/{endpoint.id}/change/").content.decode()
    assert URL in detail and "orders" in detail and "job.succeeded" in detail
    assert 'name="secret"' not in detail and 'name="previous_secret"' not in detail
    # Nor can a POST set one.
    superuser_client.post(f"/admin/jobs/webhookendpoint/{endpoint.id}/change/", {"secret": "whsec_AAAA"})
    assert WebhookEndpoint.objects.get(id=endpoint.id).secret == endpoint.secret


def test_the_endpoint_list_shows_url_owner_event_types_and_state(superuser_client, db):
    _endpoint(owner="apikey:1", event_types=["job.dead", "batch.completed"])
    services.disable_endpoint(_endpoint(url="https://other.example.com/x", owner="user:7").id)

    html = superuser_client.get("/admin/jobs/webhookendpoint/").content.decode()

    assert URL in html and "apikey:1" in html and "job.dead, batch.completed" in html
    assert "https://other.example.com/x" in html and "user:7" in html
    assert 'alt="True"' in html and 'alt="False"' in html  # enabled / disabled


def test_the_endpoint_actions_go_through_the_services(superuser_client, db):
    endpoint = _endpoint()
    old_secret = endpoint.secret
    selected = {"_selected_action": [str(endpoint.id)]}

    superuser_client.post("/admin/jobs/webhookendpoint/", {"action": "disable_endpoints", **selected})
    endpoint.refresh_from_db()
    assert endpoint.disabled_at is not None and endpoint.disabled_reason == "disabled by ada (admin)"

    superuser_client.post("/admin/jobs/webhookendpoint/", {"action": "enable_endpoints", **selected})
    assert WebhookEndpoint.objects.get(id=endpoint.id).disabled_at is None

    response = superuser_client.post(
        "/admin/jobs/webhookendpoint/", {"action": "rotate_secrets", **selected}, follow=True
    )
    endpoint.refresh_from_db()
    assert endpoint.secret != old_secret and endpoint.previous_secret == old_secret
    html = response.content.decode()
    assert "1 secret(s) rotated" in html and endpoint.secret not in html and "whsec_" not in html

    superuser_client.post(f"/admin/jobs/webhookendpoint/{endpoint.id}/delete/", {"post": "yes"})
    assert not WebhookEndpoint.objects.exists()


def test_staff_without_the_operate_permission_get_no_actions(client, db):
    viewer = User.objects.create_user("vic", password="pw", is_staff=True)
    viewer.user_permissions.add(
        *Permission.objects.filter(
            codename__in=["view_webhookendpoint", "view_webhookdelivery"], content_type__app_label="jobs"
        )
    )
    client.force_login(viewer)
    endpoint = _endpoint()

    html = client.get("/admin/jobs/webhookendpoint/").content.decode()
    assert URL in html and "rotate_secrets" not in html
    client.post("/admin/jobs/webhookendpoint/", {"action": "rotate_secrets", "_selected_action": [str(endpoint.id)]})
    assert WebhookEndpoint.objects.get(id=endpoint.id).secret == endpoint.secret
    assert "redeliver" not in client.get("/admin/jobs/webhookdelivery/").content.decode()


def test_a_delivery_is_read_only_with_its_attempts_and_redelivered_with_the_same_id(superuser_client, make_job):
    _endpoint()
    delivery = _delivered(make_job)

    html = superuser_client.get(f"/admin/jobs/webhookdelivery/{delivery.id}/change/").content.decode()
    assert delivery.message_id in html and "502" in html and "bad gateway" in html and "failed" in html
    assert 'name="body"' not in html  # read-only
    listing = superuser_client.get("/admin/jobs/webhookdelivery/").content.decode()
    assert delivery.message_id in listing and f"job {str(delivery.job_id)[:8]}" in listing

    response = superuser_client.post(
        "/admin/jobs/webhookdelivery/",
        {"action": "redeliver", "_selected_action": [str(delivery.id)]},
        follow=True,
    )

    assert "1 message(s) sent again." in response.content.decode()
    again = WebhookDelivery.objects.select_related("deliver_job").get(id=delivery.id)
    assert again.message_id == delivery.message_id
    assert again.deliver_job_id != delivery.deliver_job_id and again.deliver_job.state == State.QUEUED
    assert superuser_client.get(f"/admin/jobs/webhookdelivery/{delivery.id}/delete/").status_code == 403


def test_redelivering_to_a_disabled_endpoint_says_why(superuser_client, make_job):
    endpoint = _endpoint()
    delivery = _delivered(make_job)
    services.disable_endpoint(endpoint.id)

    response = superuser_client.post(
        "/admin/jobs/webhookdelivery/",
        {"action": "redeliver", "_selected_action": [str(delivery.id)]},
        follow=True,
    )

    html = response.content.decode()
    assert "0 message(s) sent again." in html and "is disabled" in html
    assert WebhookDelivery.objects.get(id=delivery.id).deliver_job_id == delivery.deliver_job_id
