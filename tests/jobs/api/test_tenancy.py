"""Tenancy: an API key reads only what it submitted, unless it has the
`operate` scope; dashboard sessions read everything. Another key's job or
batch is "not found", exactly like one that does not exist."""

from __future__ import annotations

import json
import uuid

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User

from jobs.engine.apikeys import create_api_key
from jobs.models import Page
from tests.conftest import wait_until_async
from tests.jobs.api.conftest import ApiClient, assert_problem, make_dead

NOOP = {"kind": "demo.noop", "payload": {}}


@pytest.fixture
def ops(db) -> ApiClient:
    return ApiClient(create_api_key("ops", scopes=["read", "operate"]).key)


def _submit(client: ApiClient) -> tuple[str, str]:
    """A job and a batch with one generated page, "intro"."""
    job = client.post("/jobs", NOOP).json()["id"]
    batch = client.post("/batches", {"name": "mine", "jobs": [NOOP]}).json()["id"]
    Page.objects.create(batch_id=batch, slug="intro", title="Intro", body_markdown="# private text")
    return job, batch


def test_a_key_sees_its_own_jobs_and_batches(alice):
    job, batch = _submit(alice)
    assert alice.get(f"/jobs/{job}").status_code == 200
    assert alice.get(f"/jobs/{job}/events").status_code == 200
    assert alice.get(f"/jobs/{job}/deliveries").status_code == 200
    assert alice.get(f"/batches/{batch}").status_code == 200
    assert alice.get(f"/batches/{batch}/deliveries").status_code == 200
    assert alice.get(f"/batches/{batch}/pages/intro").json()["markdown"] == "# private text"
    assert [p["slug"] for p in json.loads(alice.get(f"/batches/{batch}/pages").getvalue())] == ["intro"]
    assert job in {j["id"] for j in alice.get("/jobs").json()["items"]}
    assert [b["id"] for b in alice.get("/batches").json()["items"]] == [batch]


def test_another_keys_jobs_and_batches_are_not_found(alice, bob):
    job, batch = _submit(alice)
    never = str(uuid.uuid4())
    for path, code in [
        (f"/jobs/{job}", "job-not-found"),
        (f"/jobs/{job}/events", "job-not-found"),
        (f"/jobs/{job}/deliveries", "job-not-found"),
        (f"/batches/{batch}", "batch-not-found"),
        (f"/batches/{batch}/deliveries", "batch-not-found"),
        (f"/batches/{batch}/pages", "batch-not-found"),
        (f"/batches/{batch}/pages?format=csv", "batch-not-found"),
        (f"/batches/{batch}/pages/intro", "batch-not-found"),
    ]:
        assert bob.get(path).status_code == 404, path
        hidden = assert_problem(bob.get(path), 404, code)
        missing = assert_problem(bob.get(path.replace(job, never).replace(batch, never)), 404, code)
        # Nothing tells a hidden id from one that does not exist.
        assert hidden["title"] == missing["title"]
        assert hidden["detail"].replace(job, "ID").replace(batch, "ID") == missing["detail"].replace(never, "ID")
    assert bob.get("/jobs").json()["items"] == []
    assert bob.get("/jobs", {"batch": batch}).json()["items"] == []
    assert bob.get("/batches").json()["items"] == []


def test_another_keys_dead_jobs_are_not_in_its_dead_letter_queue(alice, bob, ops):
    job, _ = _submit(alice)
    make_dead(job)
    assert bob.get("/dlq").json()["items"] == []
    assert [j["id"] for j in alice.get("/dlq").json()["items"]] == [job]
    assert [j["id"] for j in ops.get("/dlq").json()["items"]] == [job]


def test_a_key_with_operate_and_a_dashboard_user_see_everything(alice, bob, ops, client):
    alices, _ = _submit(alice)
    bobs, batch = _submit(bob)
    assert {j["id"] for j in ops.get("/jobs").json()["items"]} >= {alices, bobs}
    assert ops.get(f"/batches/{batch}").status_code == 200
    assert ops.get(f"/batches/{batch}/pages/intro").status_code == 200
    assert ops.get(f"/batches/{batch}/pages").status_code == 200
    assert ops.post(f"/jobs/{alices}/cancel").status_code == 202
    client.force_login(User.objects.create_user("rick", password="pw"))
    session = ApiClient(client=client)
    assert {j["id"] for j in session.get("/jobs").json()["items"]} >= {alices, bobs}
    assert session.get(f"/jobs/{bobs}").status_code == 200


def test_webhook_endpoints_belong_to_the_key_that_registered_them(alice, bob, settings):
    settings.CONVEYOR_WEBHOOKS = {**settings.CONVEYOR_WEBHOOKS, "ALLOW_PRIVATE": True}
    created = alice.post("/webhooks", {"url": "http://127.0.0.1:9/hook", "event_types": ["job.dead"]})
    assert created.status_code == 201, created.content
    endpoint = created.json()["id"]
    assert_problem(bob.get(f"/webhooks/{endpoint}"), 404)
    assert_problem(bob.get(f"/webhooks/{endpoint}/deliveries"), 404)
    assert bob.get("/webhooks").json() == []
    assert [e["id"] for e in alice.get("/webhooks").json()] == [endpoint]


# --- the SSE stream ---------------------------------------------------------------


def _key_and_owner(name: str, scopes: list[str]) -> tuple[str, str]:
    created = create_api_key(name, scopes=scopes)
    return created.key, created.api_key.owner


def _submit_as(owner: str) -> str:
    from jobs.services import submit_job

    return str(submit_job("demo.noop", {}, owner=owner).job.id)


@pytest.mark.anyio
@pytest.mark.django_db(transaction=True)
async def test_the_event_stream_of_a_key_carries_only_its_own_jobs():
    from tests.dashboard.conftest import SSEClient, running_hub

    alice_key, alice_owner = await sync_to_async(_key_and_owner)("alice", ["read"])
    bob_key, bob_owner = await sync_to_async(_key_and_owner)("bob", ["read"])
    ops_key, _ = await sync_to_async(_key_and_owner)("ops", ["read", "operate"])
    bobs_old = await sync_to_async(_submit_as)(bob_owner)

    def stream(path: str, key: str) -> SSEClient:
        return SSEClient(path, headers=[(b"authorization", f"Bearer {key}".encode())])

    async with running_hub() as hub:
        hidden = await stream(f"/api/v1/events?job={bobs_old}", alice_key).open()
        assert hidden.status == 404
        await hidden.body()
        await hidden.close()
        alices = await stream("/api/v1/events", alice_key).open()
        everyone = await stream("/api/v1/events", ops_key).open()
        try:
            assert alices.status == everyone.status == 200
            # Headers come after subscribing (dashboard/consumers.py); asserted, not assumed.
            await wait_until_async(lambda: len(hub.subscriptions) == 2, timeout=10, message="both streams to subscribe")
            bobs = await sync_to_async(_submit_as)(bob_owner)
            mine = await sync_to_async(_submit_as)(alice_owner)
            seen_by_ops = await everyone.events(2, names={"job.created"})
            assert [json.loads(e["data"])["job"] for e in seen_by_ops] == [bobs, mine]
            (seen_by_alice,) = await alices.events(1, names={"job.created"})
            assert json.loads(seen_by_alice["data"])["job"] == mine
        finally:
            await alices.close()
            await everyone.close()


@pytest.fixture
def anyio_backend():
    return "asyncio"
