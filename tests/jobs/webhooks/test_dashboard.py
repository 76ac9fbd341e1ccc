"""The dashboard's webhook pages and the deliveries on job and batch pages,
through Django's test client: everyone signed in reads, operators change."""

from __future__ import annotations

import ipaddress
import re

import pytest
from django.test import Client
from django.utils import timezone

from jobs import services
from jobs.engine import ssrf
from jobs.models import Job, State, WebhookDelivery, WebhookEndpoint
from jobs.webhooks import endpoints
from tests.jobs.webhooks.conftest import deliveries_of, finish, operator_owner

URL = "https://hooks.example.com/in"
HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture(autouse=True)
def _public_dns(monkeypatch):
    """Names resolve to a public address (no DNS in tests)."""
    monkeypatch.setattr(ssrf, "resolve", lambda host, port: [ipaddress.ip_address("93.184.215.14")])


def _endpoint(*event_types: str, url: str = URL) -> WebhookEndpoint:
    return services.create_endpoint(
        owner=operator_owner(), url=url, event_types=list(event_types or ["job.succeeded"])
    ).endpoint


def _answered(delivery: WebhookDelivery, status_code: int = 503, body: bytes = b"try later") -> WebhookDelivery:
    """Record one HTTP attempt of the delivery and end its job, as the handler would after giving up."""
    endpoints.record_attempt(
        delivery,
        deliver_job_id=delivery.deliver_job_id,
        number=1,
        started_at=timezone.now(),
        latency=0.123,
        status_code=status_code,
        response_body=body,
    )
    finish(Job.objects.get(id=delivery.deliver_job_id), State.DEAD, error_type="DeliveryFailed")
    return WebhookDelivery.objects.get(id=delivery.id)


def _secrets(endpoint: WebhookEndpoint) -> list[str]:
    endpoint.refresh_from_db()
    return [s for s in (endpoint.secret, endpoint.previous_secret) if s]


# --- the endpoints page --------------------------------------------------------------


def test_it_lists_endpoints_with_their_recent_deliveries(reader_client, make_job):
    endpoint = _endpoint("job.succeeded", "job.dead")
    (delivery,) = deliveries_of(finish(make_job()))
    _answered(delivery)
    services.disable_endpoint(_endpoint(url="https://other.example.com/x").id, reason="too noisy")

    response = reader_client.get("/webhooks/")

    assert response.status_code == 200
    page = response.content.decode()
    assert URL in page and "job.succeeded" in page and "job.dead" in page
    assert delivery.message_id in page
    assert ">503<" in page and "123 ms" in page and ">failed<" in page
    assert ">disabled<" in page and "too noisy" in page and ">enabled<" in page
    assert f'href="/webhooks/{endpoint.id}/"' in page
    assert not any(secret in page for secret in _secrets(endpoint))


def test_readers_see_no_controls_and_may_change_nothing(reader_client, make_job):
    endpoint = _endpoint()
    (delivery,) = deliveries_of(finish(make_job()))
    _answered(delivery)
    before = WebhookEndpoint.objects.get(id=endpoint.id)

    page = reader_client.get("/webhooks/").content.decode()
    assert "Create endpoint" not in page and "Rotate secret" not in page and "Delete" not in page
    assert "Redeliver" not in reader_client.get(f"/jobs/{delivery.job_id}/").content.decode()

    for path in ("rotate", "disable", "enable", "delete"):
        assert reader_client.post(f"/webhooks/{endpoint.id}/{path}").status_code == 403, path
    assert reader_client.post("/webhooks/", {"url": URL, "event_types": ["job.dead"]}).status_code == 403
    assert reader_client.post(f"/webhooks/deliveries/{delivery.id}/redeliver").status_code == 403
    after = WebhookEndpoint.objects.get(id=endpoint.id)
    assert (after.secret, after.disabled_at) == (before.secret, before.disabled_at)
    assert WebhookEndpoint.objects.count() == 1
    assert WebhookDelivery.objects.get(id=delivery.id).deliver_job_id == delivery.deliver_job_id


def test_staff_without_the_operate_permission_may_not_change_anything(client, db, django_user_model):
    client.force_login(django_user_model.objects.create_user("sam", is_staff=True))
    endpoint = _endpoint()
    assert client.post(f"/webhooks/{endpoint.id}/delete").status_code == 403
    assert WebhookEndpoint.objects.filter(id=endpoint.id).exists()


def test_anonymous_visitors_are_sent_to_sign_in(client, db):
    endpoint = _endpoint()
    for path in ("/webhooks/", f"/webhooks/{endpoint.id}/"):
        response = client.get(path)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), path
    assert client.post(f"/webhooks/{endpoint.id}/delete").status_code == 302
    assert WebhookEndpoint.objects.filter(id=endpoint.id).exists()


def test_actions_refuse_get(operator_client, db):
    endpoint = _endpoint()
    for path in ("rotate", "disable", "enable", "delete"):
        assert operator_client.get(f"/webhooks/{endpoint.id}/{path}").status_code == 405, path


# --- create ------------------------------------------------------------------------


def test_an_operator_creates_an_endpoint_and_sees_its_secret_once(operator_client, operator):
    response = operator_client.post(
        "/webhooks/", {"url": URL, "event_types": ["job.dead", "batch.completed"], "description": "pager"}
    )

    assert response.status_code == 201
    assert "no-store" in response["Cache-Control"]
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.url == URL and endpoint.event_types == ["job.dead", "batch.completed"]
    assert endpoint.description == "pager" and endpoint.owner == f"user:{operator.pk}"
    shown = re.search(r"whsec_[A-Za-z0-9+/=]+", response.content.decode())
    assert shown and shown.group() == endpoint.secret
    assert "shown only this once" in response.content.decode()

    for path in ("/webhooks/", f"/webhooks/{endpoint.id}/"):
        page = operator_client.get(path).content.decode()
        assert endpoint.secret not in page and "whsec_" not in page, path


@pytest.mark.parametrize(
    ("data", "field_error"),
    [
        ({"url": "ftp://hooks.example.com/x", "event_types": ["job.dead"]}, "http or https"),
        ({"url": "http://127.0.0.1:8000/hook", "event_types": ["job.dead"]}, "loopback"),
        ({"url": URL}, "This field is required"),
        ({"url": URL, "event_types": ["job.started"]}, "not one of the available choices"),
        ({"url": URL, "event_types": ["job.dead"], "description": "x" * 201}, "at most 200 characters"),
    ],
)
def test_a_bad_endpoint_is_refused_with_the_reason_next_to_its_field(operator_client, data, field_error):
    response = operator_client.post("/webhooks/", data)
    assert response.status_code == 422
    page = response.content.decode()
    assert 'class="field-error"' in page and field_error in page
    assert "whsec_" not in page
    assert not WebhookEndpoint.objects.exists()


def test_posts_need_the_csrf_token(operator, db):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    endpoint = _endpoint()

    assert client.post("/webhooks/", {"url": URL, "event_types": ["job.dead"]}).status_code == 403
    assert client.post(f"/webhooks/{endpoint.id}/delete").status_code == 403
    assert WebhookEndpoint.objects.count() == 1

    page = client.get("/webhooks/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    response = client.post(f"/webhooks/{endpoint.id}/disable", {"csrfmiddlewaretoken": token})
    assert response.status_code == 302
    response = client.post(f"/webhooks/{endpoint.id}/enable", HTTP_X_CSRFTOKEN=token, **HTMX)  # as htmx sends it
    assert response.status_code == 200
    assert WebhookEndpoint.objects.get(id=endpoint.id).disabled_at is None


# --- rotate, enable, disable, delete ---------------------------------------------------


def test_rotating_shows_the_new_secret_once_and_the_old_one_keeps_signing(operator_client, db):
    endpoint = _endpoint()
    old = endpoint.secret

    response = operator_client.post(f"/webhooks/{endpoint.id}/rotate", {"on": "detail"})

    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    endpoint.refresh_from_db()
    assert endpoint.secret != old and endpoint.previous_secret == old
    page = response.content.decode()
    assert endpoint.secret in page and old not in page
    assert "signs too until" in page
    assert endpoint.secret not in operator_client.get(f"/webhooks/{endpoint.id}/").content.decode()


def test_rotating_with_htmx_puts_the_secret_above_the_list(operator_client, db):
    endpoint = _endpoint()

    response = operator_client.post(f"/webhooks/{endpoint.id}/rotate", **HTMX)

    endpoint.refresh_from_db()
    page = response.content.decode()
    assert '<div id="endpoint-secret" hx-swap-oob="true">' in page and endpoint.secret in page
    assert f'id="endpoint-{endpoint.id}"' in page  # the card, in place
    assert endpoint.previous_secret not in page


def test_an_operator_disables_and_enables_an_endpoint(operator_client, operator, db):
    endpoint = _endpoint()

    response = operator_client.post(f"/webhooks/{endpoint.id}/disable")
    assert response.status_code == 302 and response["Location"] == "/webhooks/"
    endpoint.refresh_from_db()
    assert endpoint.disabled_at is not None and endpoint.disabled_reason == f"disabled by {operator.username}"

    response = operator_client.post(f"/webhooks/{endpoint.id}/enable", {"on": "detail"}, **HTMX)
    page = response.content.decode()
    assert response.status_code == 200
    assert page.startswith(f'<section id="endpoint-{endpoint.id}"') and ">enabled<" in page
    assert 'id="notice"' in page and "Enabled" in page
    assert WebhookEndpoint.objects.get(id=endpoint.id).disabled_at is None


def test_an_operator_deletes_an_endpoint(operator_client, make_job):
    endpoint = _endpoint()
    finish(make_job())

    response = operator_client.post(f"/webhooks/{endpoint.id}/delete", **HTMX)

    assert response.status_code == 200 and response["HX-Redirect"] == "/webhooks/"
    assert not WebhookEndpoint.objects.exists() and not WebhookDelivery.objects.exists()
    assert operator_client.get(f"/webhooks/{endpoint.id}/").status_code == 404
    assert operator_client.post(f"/webhooks/{endpoint.id}/delete").status_code == 404


# --- deliveries on the endpoint, job and batch pages ------------------------------------


def test_an_endpoints_page_lists_its_deliveries(reader_client, make_job):
    endpoint = _endpoint()
    job = finish(make_job())
    (delivery,) = deliveries_of(job)
    _answered(delivery, 500, b"<html>oops</html>")

    response = reader_client.get(f"/webhooks/{endpoint.id}/")

    page = response.content.decode()
    assert response.status_code == 200
    assert "Webhook deliveries" in page and delivery.message_id in page
    assert f'href="/jobs/{job.id}/"' in page
    assert ">500<" in page and "&lt;html&gt;oops&lt;/html&gt;" in page and "123 ms" in page
    assert endpoint.secret not in page


def test_a_job_page_lists_its_deliveries(operator_client, make_job):
    _endpoint()
    job = finish(make_job(callback_url="https://client.example.com/cb"))
    callback, to_endpoint = sorted(deliveries_of(job), key=lambda d: d.endpoint_id is not None)
    _answered(callback, 200, b"ok")

    page = operator_client.get(f"/jobs/{job.id}/").content.decode()

    assert "Webhook deliveries" in page
    for delivery in (callback, to_endpoint):
        assert f'id="delivery-{delivery.id}"' in page and delivery.message_id in page
    assert "https://client.example.com/cb" in page and URL in page
    assert ">200<" in page and "ok</code>" in page
    # A pending delivery polls its row and offers no Redeliver until it settles.
    assert f'hx-get="/webhooks/deliveries/{to_endpoint.id}/"' in page
    assert page.count(">Redeliver</button>") == 1


def test_a_job_without_messages_has_no_deliveries_section(reader_client, make_job):
    job = finish(make_job())
    assert "Webhook deliveries" not in reader_client.get(f"/jobs/{job.id}/").content.decode()


def test_a_batch_page_lists_its_batch_completed_delivery(operator_client, db):
    batch = services.submit_batch(
        "b", [{"kind": "demo.noop", "payload": {}}], callback_url="https://client.example.com/batch"
    ).batch
    finish(batch.jobs.get())
    (delivery,) = WebhookDelivery.objects.filter(batch=batch)

    page = operator_client.get(f"/batches/{batch.id}/").content.decode()

    assert "Webhook deliveries" in page and "batch.completed" in page and delivery.message_id in page


def test_redeliver_sends_the_same_webhook_id_as_a_new_job_in_place(operator_client, make_job):
    _endpoint()
    job = finish(make_job())
    (delivery,) = deliveries_of(job)
    delivery = _answered(delivery)
    first_job = delivery.deliver_job_id

    response = operator_client.post(f"/webhooks/deliveries/{delivery.id}/redeliver", **HTMX)

    assert response.status_code == 200
    again = WebhookDelivery.objects.select_related("deliver_job").get(id=delivery.id)
    assert again.message_id == delivery.message_id and again.body == delivery.body
    assert again.deliver_job_id != first_job
    assert again.deliver_job.kind == "webhook.deliver" and again.deliver_job.queue == "webhooks"
    assert again.deliver_job.state == State.QUEUED
    assert again.deliver_job.payload == {"delivery": str(delivery.id)}
    page = response.content.decode()
    assert page.startswith(f'<tr id="delivery-{delivery.id}"') and delivery.message_id in page
    assert ">pending<" in page and "Redelivering" in page
    assert ">503<" in page  # the earlier attempt stays listed


def test_redeliver_without_javascript_goes_back_to_the_page_it_was_on(operator_client, make_job):
    endpoint = _endpoint()
    job = finish(make_job())
    (delivery,) = deliveries_of(job)
    _answered(delivery)

    response = operator_client.post(f"/webhooks/deliveries/{delivery.id}/redeliver")
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.id}/"
    response = operator_client.post(f"/webhooks/deliveries/{delivery.id}/redeliver", {"on": "detail"})
    assert response["Location"] == f"/webhooks/{endpoint.id}/"
    assert Job.objects.filter(kind="webhook.deliver").count() == 3


def test_redeliver_to_a_disabled_endpoint_says_why_and_sends_nothing(operator_client, make_job):
    endpoint = _endpoint()
    (delivery,) = deliveries_of(finish(make_job()))
    delivery = _answered(delivery)
    services.disable_endpoint(endpoint.id)

    response = operator_client.post(f"/webhooks/deliveries/{delivery.id}/redeliver", **HTMX)

    assert response.status_code == 200
    assert 'class="notice error"' in response.content.decode() and "is disabled" in response.content.decode()
    assert WebhookDelivery.objects.get(id=delivery.id).deliver_job_id == delivery.deliver_job_id


def test_an_unknown_delivery_is_not_found(operator_client, db):
    missing = "00000000-0000-0000-0000-000000000000"
    assert operator_client.post(f"/webhooks/deliveries/{missing}/redeliver").status_code == 404
    assert operator_client.get(f"/webhooks/deliveries/{missing}/").status_code == 404


def test_a_pending_row_polls_until_it_settles(reader_client, make_job):
    _endpoint()
    (delivery,) = deliveries_of(finish(make_job()))
    assert "hx-trigger" in reader_client.get(f"/webhooks/deliveries/{delivery.id}/", **HTMX).content.decode()
    _answered(delivery)
    row = reader_client.get(f"/webhooks/deliveries/{delivery.id}/", **HTMX).content.decode()
    assert "hx-trigger" not in row and ">failed<" in row
