"""Token usage and batch budgets as the API, the dashboard and the admin show them."""

from __future__ import annotations

import json
from datetime import date

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from jobs.engine.apikeys import create_api_key
from jobs.models import Batch, Job, State, TokenUsage
from jobs.services import submit_batch
from tests.jobs.api.conftest import ApiClient, assert_problem

pytestmark = pytest.mark.django_db

ITEM = {"kind": "llm.generate", "payload": {"prompt": "Write"}}


def api(*scopes: str) -> tuple[ApiClient, str]:
    created = create_api_key("usage", scopes=scopes or ("read", "submit", "operate"))
    return ApiClient(created.key), created.api_key.owner


def patch(client: ApiClient, path: str, body) -> object:
    return client.client.patch(
        "/api/v1" + path, json.dumps(body), content_type="application/json", headers=client.headers
    )


def spend(batch: Batch, prompt: int, completion: int) -> None:
    """What the workers' releases would have counted."""
    Batch.objects.filter(id=batch.id).update(prompt_tokens=prompt, completion_tokens=completion)


def park(job: Job) -> None:
    """Move a job to waiting on its batch's budget as a worker would."""
    from jobs.engine.states import transition

    transition(job.id, target=State.RUNNING)
    transition(
        job.id,
        target=State.RETRYING,
        event_data={"delay": 3600, "error_type": "TokenBudgetExhausted"},
        error_type="TokenBudgetExhausted",
        error_message="token budget exhausted",
    )
    Job.objects.filter(id=job.id).update(run_after="2999-01-01T00:00:00Z")


def test_a_batch_is_submitted_with_a_token_budget_and_shows_its_usage():
    client, _ = api()
    response = client.post("/batches", {"name": "b", "jobs": [ITEM], "token_budget": 1000})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["token_budget"] == 1000 and body["tokens_used"] == 0 and body["budget_exhausted"] is False
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}

    batch = Batch.objects.get(id=body["id"])
    spend(batch, 700, 300)
    body = client.get(f"/batches/{batch.id}").json()
    assert body["tokens_used"] == 1000 and body["budget_exhausted"] is True
    assert body["usage"] == {"prompt_tokens": 700, "completion_tokens": 300, "total_tokens": 1000}


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True, 10**16])
def test_a_bad_token_budget_is_a_422_naming_the_field(bad):
    client, _ = api()
    body = assert_problem(client.post("/batches", {"name": "b", "jobs": [ITEM], "token_budget": bad}), 422)
    assert body["errors"][0]["field"] == "token_budget"
    assert not Batch.objects.exists()


def test_a_jobs_usage_is_in_its_representation():
    client, _ = api()
    job_id = client.post("/jobs", ITEM).json()["id"]
    Job.objects.filter(id=job_id).update(prompt_tokens=12, completion_tokens=30)
    assert client.get(f"/jobs/{job_id}").json()["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "total_tokens": 42,
    }


def test_patch_raises_the_budget_and_wakes_the_waiting_jobs():
    client, _ = api()
    batch = submit_batch("b", [ITEM, ITEM], token_budget=100).batch
    spend(batch, 60, 40)
    waiting, other = batch.jobs.all()
    park(waiting)

    response = patch(client, f"/batches/{batch.id}", {"token_budget": 5000})

    assert response.status_code == 200, response.content
    assert response.json()["token_budget"] == 5000 and response.json()["budget_exhausted"] is False
    waiting.refresh_from_db()
    assert waiting.state == "retrying" and waiting.run_after.year < 2999
    assert waiting.events.filter(type="job.resumed", data__reason__icontains="raised to 5000").exists()


def test_patch_can_remove_the_budget():
    client, _ = api()
    batch = submit_batch("b", [ITEM], token_budget=100).batch
    assert patch(client, f"/batches/{batch.id}", {"token_budget": None}).json()["token_budget"] is None


def test_patch_needs_the_operate_scope_and_a_valid_budget():
    reader, _ = api("read", "submit")
    operator, _ = api()
    batch = submit_batch("b", [ITEM]).batch
    assert_problem(patch(reader, f"/batches/{batch.id}", {"token_budget": 10}), 403, "forbidden")
    assert_problem(patch(operator, f"/batches/{batch.id}", {"token_budget": -3}), 422, "validation-error")
    assert_problem(patch(operator, f"/batches/{batch.id}", {"budget": 3}), 422, "validation-error")
    assert_problem(patch(operator, "/batches/00000000-0000-0000-0000-000000000000", {"token_budget": 3}), 404)
    assert Batch.objects.get(id=batch.id).token_budget is None


def test_usage_reports_the_callers_tokens_per_day():
    client, owner = api()
    TokenUsage.objects.create(owner=owner, day=date(2026, 1, 1), requests=1, prompt_tokens=5, completion_tokens=7)
    TokenUsage.objects.create(owner=owner, day=date.today(), requests=3, prompt_tokens=10, completion_tokens=20)
    TokenUsage.objects.create(
        owner="apikey:other", day=date.today(), requests=9, prompt_tokens=99, completion_tokens=99
    )

    body = client.get("/usage").json()

    assert body["owner"] == owner
    assert (body["requests"], body["prompt_tokens"], body["completion_tokens"], body["total_tokens"]) == (4, 15, 27, 42)
    assert body["days"] == [
        {
            "day": date.today().isoformat(),
            "requests": 3,
            "prompt_tokens": 10,
            "completion_tokens": 20,
            "total_tokens": 30,
        }
    ]


# --- dashboard and admin ------------------------------------------------------


@pytest.fixture
def operator_client() -> Client:
    user = User.objects.create_user("ops", password="pw", is_staff=True, is_superuser=True)
    user.user_permissions.add(Permission.objects.get(codename="operate_job", content_type__app_label="jobs"))
    client = Client()
    client.force_login(user)
    return client


def test_the_batch_page_shows_tokens_budget_and_waiting_jobs(operator_client):
    batch = submit_batch("b", [ITEM, ITEM], token_budget=100).batch
    spend(batch, 60, 40)
    park(batch.jobs.first())

    html = operator_client.get(f"/batches/{batch.id}/").content.decode()

    assert f'id="batch-usage-{batch.id}"' in html
    assert "60 prompt, 40 completion" in html and "exhausted" in html
    assert "1 job waits: token budget exhausted" in html
    assert f'action="/batches/{batch.id}/budget"' in html


def test_the_budget_form_raises_the_budget(operator_client):
    batch = submit_batch("b", [ITEM], token_budget=100).batch
    spend(batch, 60, 40)
    job = batch.jobs.get()
    park(job)

    response = operator_client.post(f"/batches/{batch.id}/budget", {"token_budget": "400"}, follow=True)

    assert response.status_code == 200
    assert "The token budget is 400 tokens (100 used)." in response.content.decode()
    assert Batch.objects.get(id=batch.id).token_budget == 400
    job.refresh_from_db()
    assert job.run_after.year < 2999


@pytest.mark.parametrize(("value", "message"), [("lots", "whole number"), ("0", "from 1 to")])
def test_the_budget_form_refuses_a_bad_value(operator_client, value, message):
    batch = submit_batch("b", [ITEM], token_budget=100).batch
    response = operator_client.post(f"/batches/{batch.id}/budget", {"token_budget": value}, follow=True)
    assert message in response.content.decode()
    assert Batch.objects.get(id=batch.id).token_budget == 100


def test_a_reader_cannot_set_a_budget(client):
    user = User.objects.create_user("rick", password="pw")
    client.force_login(user)
    batch = submit_batch("b", [ITEM]).batch
    assert client.post(f"/batches/{batch.id}/budget", {"token_budget": "5"}).status_code == 403
    assert "budget-form" not in client.get(f"/batches/{batch.id}/").content.decode()


def test_the_job_page_shows_its_tokens_and_why_it_waits(operator_client):
    batch = submit_batch("b", [ITEM], token_budget=1).batch
    job = batch.jobs.get()
    Job.objects.filter(id=job.id).update(prompt_tokens=11, completion_tokens=22)
    park(job)

    html = operator_client.get(f"/jobs/{job.id}/").content.decode()

    assert f'id="job-usage-{job.id}"' in html
    assert "<b>33</b>" in html
    assert "Waiting: token budget exhausted." in html


def test_the_admin_lists_token_usage_read_only(operator_client):
    TokenUsage.objects.create(owner="apikey:1", day=date.today(), requests=2, prompt_tokens=3, completion_tokens=4)
    response = operator_client.get("/admin/jobs/tokenusage/")
    assert response.status_code == 200 and "apikey:1" in response.content.decode()
    assert operator_client.get("/admin/jobs/tokenusage/add/").status_code == 403
