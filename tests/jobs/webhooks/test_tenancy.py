"""Webhook tenancy: an endpoint follows the REST API's tenancy. One owned by a
key without `operate` (or by a non-staff user) hears only about the jobs and
batches its owner submitted; one owned by an operator (a key with `operate`, a
staff user) hears about all. Deliveries listed through the API follow the
same rule."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from jobs import services
from jobs.engine.apikeys import create_api_key, revoke_api_key
from jobs.models import Batch, Job, State, WebhookDelivery
from jobs.webhooks import messages
from tests.jobs.api.conftest import ApiClient
from tests.jobs.webhooks.conftest import finish, run_delivery

EVERY_TYPE = ["job.succeeded", "job.dead", "job.cancelled", "batch.completed"]
NOOP = {"kind": "demo.noop", "payload": {}}


@pytest.fixture
def ops(db) -> ApiClient:
    """An operator's key that registers endpoints too."""
    return ApiClient(create_api_key("ops", scopes=["submit", "read", "operate"]).key)


def _register(client: ApiClient, receiver, path: str) -> str:
    created = client.post("/webhooks", {"url": receiver.url(path), "event_types": EVERY_TYPE})
    assert created.status_code == 201, created.content
    receiver.expect(path, created.json()["secret"])
    return created.json()["id"]


def _finished_job_and_batch(client: ApiClient) -> tuple[Job, Batch]:
    """A job that succeeds and a batch whose only job dies, submitted by `client`."""
    job = client.post("/jobs", NOOP, **{"Idempotency-Key": "secret-order-42"}).json()["id"]
    batch = client.post("/batches", {"name": "b", "jobs": [NOOP]}).json()["id"]
    finish(Job.objects.get(id=job), result={"private": "result"})
    finish(Job.objects.get(batch_id=batch), State.DEAD, error_type="Boom", error_message="private error")
    return Job.objects.get(id=job), Batch.objects.get(id=batch)


def _about(endpoint_id: str) -> set[tuple[str, str]]:
    """(event type, job or batch id) of each message queued for the endpoint."""
    return {
        (d.event_type, str(d.job_id or d.batch_id)) for d in WebhookDelivery.objects.filter(endpoint_id=endpoint_id)
    }


def _mine(job: Job, batch: Batch) -> set[tuple[str, str]]:
    (batch_job,) = batch.jobs.all()
    return {("job.succeeded", str(job.id)), ("job.dead", str(batch_job.id)), ("batch.completed", str(batch.id))}


def test_a_keys_endpoint_hears_only_about_what_that_key_submitted(alice, bob, receiver, allow_private):
    endpoint = _register(alice, receiver, "/alice")
    alices = _finished_job_and_batch(alice)
    _finished_job_and_batch(bob)

    assert _about(endpoint) == _mine(*alices)
    # What reaches the receiver, signed: only alice's jobs and batch.
    for delivery in WebhookDelivery.objects.filter(endpoint_id=endpoint):
        run_delivery(delivery)
    received = receiver.received("/alice")
    assert len(received) == 3 and all(r.verified and all(r.verified.values()) for r in received)
    assert {(r.json["type"], r.json["data"]["id"]) for r in received} == _mine(*alices)


def test_endpoints_of_an_operate_key_and_of_a_staff_user_hear_about_every_tenant(
    alice, bob, ops, receiver, allow_private
):
    staff = User.objects.create_user("sam", password="pw", is_staff=True)
    staff_endpoint = services.create_endpoint(
        owner=f"user:{staff.pk}", url=receiver.url("/staff"), event_types=EVERY_TYPE
    ).endpoint
    ops_endpoint = services.create_endpoint(
        owner=_owner_of(ops), url=receiver.url("/ops"), event_types=EVERY_TYPE
    ).endpoint
    alices = _finished_job_and_batch(alice)
    bobs = _finished_job_and_batch(bob)
    everything = _mine(*alices) | _mine(*bobs)
    assert _about(str(ops_endpoint.id)) == everything
    assert _about(str(staff_endpoint.id)) == everything


def test_a_non_staff_users_endpoint_hears_only_about_what_that_user_submitted(alice, receiver, allow_private):
    user = User.objects.create_user("una", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="add_job", content_type__app_label="jobs"))
    session = Client()
    session.force_login(user)
    client = ApiClient(client=session)
    endpoint = _register(client, receiver, "/una")
    _finished_job_and_batch(alice)
    job = client.post("/jobs", NOOP).json()["id"]
    finish(Job.objects.get(id=job))
    assert _about(endpoint) == {("job.succeeded", job)}


def test_an_endpoint_stops_hearing_about_others_when_its_key_loses_operate(alice, ops, receiver, allow_private):
    endpoint = services.create_endpoint(
        owner=_owner_of(ops), url=receiver.url("/ops"), event_types=["job.succeeded"]
    ).endpoint
    revoke_api_key(ops.headers["Authorization"].removeprefix("Bearer "))
    job = alice.post("/jobs", NOOP).json()["id"]
    finish(Job.objects.get(id=job))
    assert _about(str(endpoint.id)) == set()


def test_a_keys_endpoint_deliveries_list_only_its_own_jobs(alice, bob, receiver, allow_private):
    """Also messages queued before the rule held (or while its key had `operate`)."""
    endpoint = _register(alice, receiver, "/alice")
    alices = _finished_job_and_batch(alice)
    bobs_job, bobs_batch = _finished_job_and_batch(bob)
    # As if sent before the rule held: a message about bob's job and one about his batch.
    for event_type, data, about in [
        ("job.succeeded", messages._job_data(bobs_job), {"job": bobs_job}),
        ("batch.completed", messages._batch_data(bobs_batch), {"batch": bobs_batch}),
    ]:
        endpoints = [services.get_endpoint(endpoint)]
        messages._enqueue(event_type, data, callback_url="", owner=bobs_job.owner, endpoints=endpoints, **about)
    listed = alice.get(f"/webhooks/{endpoint}/deliveries").json()
    assert _listed_about(listed) == _mine(*alices)


def test_a_jobs_deliveries_hide_an_operators_endpoint_from_its_submitter(alice, ops, receiver, allow_private):
    alices_endpoint = _register(alice, receiver, "/alice")
    ops_endpoint = _register(ops, receiver, "/ops")
    job, batch = _finished_job_and_batch(alice)
    for path in (f"/jobs/{job.id}/deliveries", f"/batches/{batch.id}/deliveries"):
        assert {d["endpoint"] for d in alice.get(path).json()} == {alices_endpoint}, path
        assert {d["endpoint"] for d in ops.get(path).json()} == {alices_endpoint, ops_endpoint}, path


def test_an_operate_key_reads_another_keys_endpoint(alice, ops, receiver, allow_private):
    endpoint = _register(alice, receiver, "/alice")
    _finished_job_and_batch(alice)
    assert ops.get(f"/webhooks/{endpoint}").json()["id"] == endpoint
    assert len(ops.get(f"/webhooks/{endpoint}/deliveries").json()) == 3


def _listed_about(listed: list[dict]) -> set[tuple[str, str]]:
    deliveries = WebhookDelivery.objects.filter(id__in=[d["id"] for d in listed])
    return {(d.event_type, str(d.job_id or d.batch_id)) for d in deliveries}


def _owner_of(client: ApiClient) -> str:
    from jobs.engine.apikeys import verify_api_key

    return verify_api_key(client.headers["Authorization"].removeprefix("Bearer ")).owner


def test_the_dashboard_records_its_user_as_user_pk_everywhere(db, receiver, allow_private):
    """Jobs, content batches and endpoints created on the dashboard are owned by
    `user:<pk>`, as through the API with the same session: so the user's own
    endpoint hears about them, and an idempotency key means one job either way."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    user = User.objects.create_user("una", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="add_job", content_type__app_label="jobs"))
    session = Client()
    session.force_login(user)
    owner = f"user:{user.pk}"
    endpoint = _register(ApiClient(client=session), receiver, "/una")

    response = session.post("/submit/?kind=demo.noop", {"kind": "demo.noop", "options-idempotency_key": "k-1"})
    assert response.status_code == 302, response.content
    job = Job.objects.get(kind="demo.noop")
    assert job.owner == owner
    again = ApiClient(client=session).post("/jobs", NOOP, **{"Idempotency-Key": "k-1"})
    assert again.json()["id"] == str(job.id)

    response = session.post(
        "/batches/content/",
        {
            "name": "widgets",
            "template": "Write about {keyword}.",
            "provider": "",
            "model": "",
            "callback_url": "",
            "file": SimpleUploadedFile("pages.csv", b"keyword\nblue widgets\n", "text/csv"),
        },
    )
    assert response.status_code == 302, response.content
    batch = Batch.objects.get(name="widgets")
    assert batch.owner == owner
    assert {j.owner for j in batch.jobs.all()} == {owner}

    finish(job)
    assert _about(endpoint) == {("job.succeeded", str(job.id))}
    operator = User.objects.create_user("olga", password="pw", is_staff=True)
    operator.user_permissions.add(Permission.objects.get(codename="operate_job", content_type__app_label="jobs"))
    session.force_login(operator)
    created = session.post("/webhooks/", {"url": receiver.url("/olga"), "event_types": ["job.dead"]})
    assert created.status_code == 201
    assert services.list_endpoints(owner=f"user:{operator.pk}")[0].url == receiver.url("/olga")
