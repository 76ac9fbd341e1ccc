"""/api/v1/webhooks and the deliveries of jobs and batches."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from standardwebhooks import Webhook

from jobs import services
from jobs.engine import ssrf
from jobs.models import Job, State, WebhookDelivery, WebhookEndpoint
from jobs.webhooks import endpoints, signing
from tests.jobs.api.conftest import BASE, ApiClient, assert_problem
from tests.jobs.webhooks.conftest import deliveries_of, finish

URL = "https://hooks.example.com/in"


@pytest.fixture(autouse=True)
def public_dns(monkeypatch):
    """Names resolve to a public address (no DNS in tests)."""
    monkeypatch.setattr(ssrf, "resolve", lambda host, port: [ipaddress.ip_address("93.184.215.14")])


def _create(api: ApiClient, **overrides):
    return api.post("/webhooks", {"url": URL, "event_types": ["job.succeeded", "job.dead"], **overrides})


def test_an_endpoint_is_registered_and_its_secret_is_shown_once(api):
    response = _create(api, description="orders")
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["secret"].startswith("whsec_")
    assert created["url"] == URL
    assert created["event_types"] == ["job.succeeded", "job.dead"]
    assert created["disabled_at"] is None

    listed = api.get("/webhooks").json()
    assert [e["id"] for e in listed] == [created["id"]]
    assert "secret" not in listed[0]
    assert "secret" not in api.get(f"/webhooks/{created['id']}").json()
    assert WebhookEndpoint.objects.get(id=created["id"]).secret == created["secret"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event_types": ["job.started"]}, "event_types[0]"),
        ({"event_types": []}, "event_types"),
        ({"url": "ftp://x.example.com/"}, "url"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_a_bad_endpoint_is_refused_naming_the_field(api, body, field):
    problem = assert_problem(_create(api, **body), 422, "validation-error")
    assert field in [e["field"] for e in problem["errors"]]
    assert not WebhookEndpoint.objects.exists()


def test_registering_needs_the_submit_scope(make_key):
    assert_problem(_create(ApiClient(make_key(scopes=("read",)))), 403, "forbidden")


def test_each_key_sees_and_changes_only_its_own_endpoints(api, make_key):
    mine = _create(api).json()["id"]
    other = ApiClient(make_key(scopes=("submit", "read"), name="other"))
    assert other.get("/webhooks").json() == []
    assert_problem(other.get(f"/webhooks/{mine}"), 404, "not-found")
    assert_problem(other.post(f"/webhooks/{mine}/rotate"), 404, "not-found")
    response = other.client.delete(f"{BASE}/webhooks/{mine}", headers=other.headers)
    assert_problem(response, 404, "not-found")
    assert WebhookEndpoint.objects.filter(id=mine).exists()


def test_deleting_an_endpoint_stops_its_messages(api, make_job):
    endpoint = _create(api).json()["id"]
    response = api.client.delete(f"{BASE}/webhooks/{endpoint}", headers=api.headers)
    assert response.status_code == 204
    assert not WebhookEndpoint.objects.exists()
    assert deliveries_of(finish(make_job())) == []


def test_rotating_keeps_the_old_secret_signing_for_the_overlap(api):
    created = _create(api).json()
    response = api.post(f"/webhooks/{created['id']}/rotate?overlap_seconds=3600")
    assert response.status_code == 200, response.content
    rotated = response.json()
    assert rotated["secret"] != created["secret"]
    expires = parse_datetime(rotated["previous_secret_expires_at"])
    assert timedelta(minutes=59) < expires - timezone.now() <= timedelta(hours=1)

    endpoint = WebhookEndpoint.objects.get(id=created["id"])
    delivery = WebhookDelivery(message_id="msg_x", body="{}", endpoint=endpoint)
    headers = signing.signed_headers(delivery)
    Webhook(created["secret"]).verify("{}", headers)
    Webhook(rotated["secret"]).verify("{}", headers)
    assert api.get(f"/webhooks/{created['id']}").json()["rotated_at"] is not None


def test_an_overlap_over_a_week_is_refused(api):
    created = _create(api).json()
    assert_problem(api.post(f"/webhooks/{created['id']}/rotate?overlap_seconds=700000"), 422, "validation-error")


def test_an_endpoint_can_be_disabled_and_enabled(api, make_job):
    endpoint = _create(api).json()["id"]
    disabled = api.post(f"/webhooks/{endpoint}/disable").json()
    assert disabled["disabled_at"] is not None and disabled["disabled_reason"] == "disabled by its owner"
    assert deliveries_of(finish(make_job())) == []
    assert api.post(f"/webhooks/{endpoint}/enable").json()["disabled_at"] is None
    assert len(deliveries_of(finish(make_job()))) == 1


def test_a_key_reads_and_rotates_its_own_signing_secret(api, make_key):
    secret = api.get("/webhooks/default/secret").json()["secret"]
    assert secret.startswith("whsec_")
    assert api.get("/webhooks/default/secret").json() == {"secret": secret}
    other = ApiClient(make_key(name="other")).get("/webhooks/default/secret").json()["secret"]
    assert other != secret

    rotated = api.post("/webhooks/default/rotate").json()
    assert rotated["secret"] != secret
    assert api.get("/webhooks/default/secret").json() == {"secret": rotated["secret"]}


def test_dashboard_users_share_the_projects_default_secret(db):
    user = User.objects.create_superuser("ops", password="pw-for-tests-only")
    client = Client()
    client.force_login(user)
    secret = client.get(f"{BASE}/webhooks/default/secret").json()["secret"]
    assert secret == services.signing_secret("").secret == services.signing_secret(f"user:{user.pk}").secret
    assert secret != services.signing_secret("apikey:1").secret


# --- deliveries --------------------------------------------------------------


def _finished_job_with_a_callback(api: ApiClient) -> Job:
    job = api.post("/jobs", {"kind": "demo.noop", "payload": {}, "callback_url": URL}).json()
    return finish(Job.objects.get(id=job["id"]))


def test_a_jobs_deliveries_are_listed_with_their_attempts(api):
    job = _finished_job_with_a_callback(api)
    (delivery,) = deliveries_of(job)
    endpoints.record_attempt(
        delivery,
        deliver_job_id=delivery.deliver_job_id,
        number=1,
        started_at=timezone.now(),
        latency=0.0123,
        status_code=500,
        response_body=b"oops",
    )
    (listed,) = api.get(f"/jobs/{job.id}/deliveries").json()
    assert listed["message_id"] == delivery.message_id
    assert listed["event_type"] == "job.succeeded"
    assert listed["status"] == "pending"
    assert listed["endpoint"] is None
    assert listed["attempts"] == [
        {
            "number": 1,
            "started_at": listed["attempts"][0]["started_at"],
            "status_code": 500,
            "latency_ms": 12,
            "response_body": "oops",
            "error": None,
        }
    ]


def test_redelivering_sends_the_same_message_again_as_a_new_job(api):
    job = _finished_job_with_a_callback(api)
    (delivery,) = deliveries_of(job)
    first_job = delivery.deliver_job_id
    response = api.post(f"/jobs/{job.id}/deliveries/{delivery.id}/redeliver")
    assert response.status_code == 202, response.content
    again = response.json()
    assert again["id"] == str(delivery.id)
    assert again["message_id"] == delivery.message_id
    assert again["deliver_job"] != str(first_job)
    assert again["status"] == "pending"
    new_job = Job.objects.get(id=again["deliver_job"])
    assert (new_job.kind, new_job.state, new_job.payload) == (
        "webhook.deliver",
        State.QUEUED,
        {"delivery": str(delivery.id)},
    )
    assert WebhookDelivery.objects.count() == 1


def test_redelivering_needs_the_operate_scope(api, make_key):
    job = _finished_job_with_a_callback(api)
    (delivery,) = deliveries_of(job)
    reader = ApiClient(make_key(scopes=("read", "submit")))
    assert_problem(reader.post(f"/jobs/{job.id}/deliveries/{delivery.id}/redeliver"), 403, "forbidden")


def test_redelivering_to_a_disabled_endpoint_is_a_conflict(api, make_job):
    endpoint = _create(api).json()["id"]
    job = finish(make_job())
    (delivery,) = deliveries_of(job)
    api.post(f"/webhooks/{endpoint}/disable")
    assert_problem(api.post(f"/jobs/{job.id}/deliveries/{delivery.id}/redeliver"), 409, "invalid-state")


def test_an_unknown_delivery_or_one_of_another_job_is_not_found(api, make_job):
    job = _finished_job_with_a_callback(api)
    (delivery,) = deliveries_of(job)
    other = finish(make_job())
    assert_problem(api.post(f"/jobs/{other.id}/deliveries/{delivery.id}/redeliver"), 404, "not-found")
    assert_problem(api.post(f"/jobs/{job.id}/deliveries/{other.id}/redeliver"), 404, "not-found")
    assert_problem(api.get(f"/jobs/{other.id}1/deliveries"), 422)
    assert_problem(api.get("/jobs/00000000-0000-0000-0000-000000000000/deliveries"), 404, "job-not-found")


def test_a_batchs_deliveries_are_listed_and_redelivered(api):
    batch = api.post("/batches", {"name": "b", "callback_url": URL, "jobs": [{"kind": "demo.noop", "payload": {}}]})
    batch_id = batch.json()["id"]
    finish(Job.objects.get(batch_id=batch_id))
    (listed,) = api.get(f"/batches/{batch_id}/deliveries").json()
    assert listed["event_type"] == "batch.completed"
    again = api.post(f"/batches/{batch_id}/deliveries/{listed['id']}/redeliver").json()
    assert again["message_id"] == listed["message_id"]


def test_an_endpoints_deliveries_are_listed(api, make_job):
    endpoint = _create(api).json()["id"]
    finish(make_job())
    finish(make_job())
    listed = api.get(f"/webhooks/{endpoint}/deliveries").json()
    assert len(listed) == 2 and all(d["endpoint"] == endpoint for d in listed)
