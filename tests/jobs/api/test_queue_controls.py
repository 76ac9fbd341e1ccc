"""The operator-control endpoints: permissions, tenancy, validation as problem+json."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import services
from jobs.models import Job, QueueControl, State
from tests.jobs.api.conftest import ApiClient, assert_problem, make_dead

pytestmark = pytest.mark.django_db


def patch(api: ApiClient, path: str, body):
    import json

    return api.client.patch("/api/v1" + path, json.dumps(body), content_type="application/json", headers=api.headers)


def test_pause_and_resume_show_in_the_queue_list(api):
    response = api.post("/queues/llm/pause")
    assert response.status_code == 200
    assert response.json()["paused"] is True
    listed = {q["queue"]: q for q in api.get("/queues").json()}
    assert listed["llm"]["paused"] is True and listed["llm"]["max_running"] is None
    assert api.post("/queues/llm/resume").json()["paused"] is False
    assert QueueControl.objects.get(name="llm").paused is False


def test_max_running_is_set_cleared_and_validated(api):
    assert patch(api, "/queues/default", {"max_running": 4}).json()["max_running"] == 4
    assert {q["queue"]: q for q in api.get("/queues").json()}["default"]["max_running"] == 4
    assert patch(api, "/queues/default", {"max_running": None}).json()["max_running"] is None
    for bad in (0, -3, 1.5, "2", True):
        body = assert_problem(patch(api, "/queues/default", {"max_running": bad}), 422, "validation-error")
        assert body["errors"][0]["field"].endswith("max_running"), body
    assert_problem(patch(api, "/queues/default", {}), 422, "validation-error")
    assert_problem(patch(api, "/queues/default", {"max_running": 2, "other": 1}), 422, "validation-error")
    assert QueueControl.objects.get(name="default").max_running is None


def test_a_key_without_operate_cannot_control_queues(make_key):
    reader = ApiClient(make_key(scopes=("read", "submit")))
    assert_problem(reader.post("/queues/default/pause"), 403, "forbidden")
    assert_problem(patch(reader, "/queues/default", {"max_running": 1}), 403, "forbidden")
    assert_problem(reader.post("/jobs/cancel", {"filter": {}}), 403, "forbidden")
    assert not QueueControl.objects.exists()


def test_run_now_answers_409_outside_scheduled_and_retrying(api, make_job):
    later = make_job("demo.noop", run_after=timezone.now() + timedelta(hours=1))
    response = api.post(f"/jobs/{later.id}/run-now")
    assert response.status_code == 202
    assert response.json()["id"] == str(later.id)
    queued = make_job("demo.noop")
    assert_problem(api.post(f"/jobs/{queued.id}/run-now"), 409, "invalid-state")


def test_bulk_cancel_and_retry_touch_only_the_key_s_own_jobs(make_key):
    mine_key, theirs_key = make_key(name="mine"), make_key(name="theirs")
    mine, theirs = ApiClient(mine_key), ApiClient(theirs_key)
    my_ids = [mine.post("/jobs", {"kind": "demo.noop", "payload": {}}).json()["id"] for _ in range(3)]
    their_ids = [theirs.post("/jobs", {"kind": "demo.noop", "payload": {}}).json()["id"] for _ in range(2)]

    # Their ids named by id: not mine, untouched.
    assert mine.post("/jobs/cancel", {"ids": their_ids}).json() == {"count": 0}
    assert mine.post("/jobs/cancel", {"filter": {"kind": "demo.noop", "state": "queued"}}).json() == {"count": 3}
    assert set(Job.objects.filter(id__in=my_ids).values_list("state", flat=True)) == {State.CANCELLED}
    assert set(Job.objects.filter(id__in=their_ids).values_list("state", flat=True)) == {State.QUEUED}

    for job_id in their_ids:
        make_dead(job_id)
    dead_mine = services.submit_job("demo.noop", {}, owner=Job.objects.get(id=my_ids[0]).owner).job
    make_dead(dead_mine.id)
    assert mine.post("/jobs/retry", {"filter": {"kind": "demo.noop"}}).json() == {"count": 1}
    assert Job.objects.get(id=dead_mine.id).state == State.QUEUED
    assert set(Job.objects.filter(id__in=their_ids).values_list("state", flat=True)) == {State.DEAD}


def test_bulk_selection_errors_are_problems(api):
    assert_problem(api.post("/jobs/cancel", {}), 422, "validation-error")
    assert_problem(api.post("/jobs/cancel", {"ids": [], "filter": {}}), 422, "validation-error")
    body = assert_problem(api.post("/jobs/cancel", {"filter": {"state": "sleeping"}}), 422, "validation-error")
    assert "state" in body["errors"][0]["field"]
    assert_problem(api.post("/jobs/retry", {"filter": {"since": "yesterday"}}), 422, "validation-error")
    assert_problem(api.post("/jobs/cancel", {"ids": ["not-a-uuid"]}), 422, "validation-error")


def test_cancel_a_batch_answers_the_count_and_hides_another_tenant_s(make_key):
    mine, theirs = ApiClient(make_key(name="mine")), ApiClient(make_key(name="theirs"))
    batch = mine.post("/batches", {"name": "b", "jobs": [{"kind": "demo.noop", "payload": {}}] * 3}).json()
    assert_problem(theirs.post(f"/batches/{batch['id']}/cancel"), 404, "batch-not-found")
    assert mine.post(f"/batches/{batch['id']}/cancel").json() == {"count": 3}
    assert mine.post(f"/batches/{batch['id']}/cancel").json() == {"count": 0}
