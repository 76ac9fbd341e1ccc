"""/api/v1/schedules: CRUD, validation (422 problems naming each field),
scopes, tenancy (another key's schedules are not found) and run now."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from jobs.engine.apikeys import create_api_key
from jobs.models import Job, Schedule
from tests.jobs.api.conftest import ApiClient, assert_problem

NIGHTLY = {"name": "nightly", "kind": "demo.sleep", "payload": {"seconds": 1}, "cron": "0 3 * * *"}


class Api(ApiClient):
    def patch(self, path: str, body):
        return self.client.patch(
            "/api/v1" + path, json.dumps(body), content_type="application/json", headers=self.headers
        )

    def delete(self, path: str):
        return self.client.delete("/api/v1" + path, headers=self.headers)


@pytest.fixture
def alice(db) -> Api:
    return Api(create_api_key("alice", scopes=["read", "operate"]).key)


@pytest.fixture
def bob(db) -> Api:
    return Api(create_api_key("bob", scopes=["read", "operate"]).key)


def test_create_read_update_delete(alice):
    created = alice.post("/schedules", {**NIGHTLY, "timezone": "Europe/Berlin", "priority": 2})
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["name"] == "nightly"
    assert body["cron"] == "0 3 * * *" and body["interval_seconds"] is None
    assert body["timezone"] == "Europe/Berlin"
    assert body["payload"]["seconds"] == 1
    assert (body["enabled"], body["overlap"], body["source"], body["skipped"]) == (True, "skip", "runtime", 0)
    assert body["next_run_at"] is not None
    assert body["last_job_id"] is None and body["last_job_state"] is None
    schedule = Schedule.objects.get()
    assert schedule.owner.startswith("apikey:")

    assert alice.get("/schedules").json()[0]["name"] == "nightly"
    assert alice.get("/schedules/nightly").json()["priority"] == 2

    # Switching to an interval drops the cron expression.
    patched = alice.patch("/schedules/nightly", {"interval_seconds": 30, "overlap": "allow"})
    assert patched.status_code == 200, patched.content
    assert (patched.json()["cron"], patched.json()["interval_seconds"], patched.json()["overlap"]) == (
        None,
        30,
        "allow",
    )
    disabled = alice.patch("/schedules/nightly", {"enabled": False}).json()
    assert (disabled["enabled"], disabled["next_run_at"]) == (False, None)

    assert alice.delete("/schedules/nightly").status_code == 204
    assert_problem(alice.get("/schedules/nightly"), 404, "schedule-not-found")
    assert not Schedule.objects.exists()


def test_run_now_answers_202_with_the_job_of_the_schedules_owner(alice):
    alice.post("/schedules", NIGHTLY)
    response = alice.post("/schedules/nightly/run")
    assert response.status_code == 202, response.content
    job = Job.objects.get(id=response.json()["id"])
    assert (job.kind, job.owner) == ("demo.sleep", Schedule.objects.get().owner)
    shown = alice.get("/schedules/nightly").json()
    assert (shown["last_job_id"], shown["last_job_state"]) == (str(job.id), "queued")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cron": "0 25 * * *"}, "cron"),
        ({"cron": "every day"}, "cron"),
        ({"cron": None, "interval_seconds": None}, "cron"),
        ({"interval_seconds": 10}, "cron"),  # both
        ({"timezone": "Europe/Atlantis"}, "timezone"),
        ({"kind": "no.such"}, "kind"),
        ({"kind": "webhook.deliver"}, "kind"),  # internal kinds are not for clients
        ({"payload": {"seconds": "soon"}}, "payload.seconds"),
        ({"name": "with/slash"}, "name"),
        ({"max_attempts": 99}, "max_attempts"),
    ],
)
def test_invalid_fields_are_refused_with_field_level_errors(alice, body, field):
    response = alice.post("/schedules", {**NIGHTLY, **body})
    problem = assert_problem(response, 422)
    assert field in [e["field"] for e in problem["errors"]], problem
    assert not Schedule.objects.exists()


def test_unknown_fields_and_wrong_types_are_422(alice):
    problem = assert_problem(alice.post("/schedules", {**NIGHTLY, "colour": "red"}), 422)
    assert [e["field"] for e in problem["errors"]] == ["colour"]
    problem = assert_problem(alice.post("/schedules", {**NIGHTLY, "overlap": "queue"}), 422)
    assert [e["field"] for e in problem["errors"]] == ["overlap"]
    assert not Schedule.objects.exists()


def test_an_invalid_patch_changes_nothing(alice):
    alice.post("/schedules", NIGHTLY)
    problem = assert_problem(alice.patch("/schedules/nightly", {"cron": "nope", "timezone": "Nowhere/Else"}), 422)
    assert {e["field"] for e in problem["errors"]} == {"cron", "timezone"}
    assert Schedule.objects.get().cron == "0 3 * * *"


def test_a_taken_name_is_refused(alice, bob):
    alice.post("/schedules", NIGHTLY)
    problem = assert_problem(bob.post("/schedules", NIGHTLY), 422, "invalid-schedule")
    assert problem["errors"] == [{"field": "name", "message": "is already taken"}]


def test_a_second_tenant_can_neither_see_nor_change_anothers_schedules(alice, bob):
    alice.post("/schedules", NIGHTLY)
    assert bob.get("/schedules").json() == []
    assert_problem(bob.get("/schedules/nightly"), 404, "schedule-not-found")
    assert_problem(bob.patch("/schedules/nightly", {"enabled": False}), 404, "schedule-not-found")
    assert_problem(bob.post("/schedules/nightly/run"), 404, "schedule-not-found")
    assert_problem(bob.delete("/schedules/nightly"), 404, "schedule-not-found")
    assert Schedule.objects.get().enabled
    assert not Job.objects.exists()


@pytest.mark.django_db
def test_reading_needs_read_and_changing_needs_operate():
    reader = Api(create_api_key("reader", scopes=["read"]).key)
    submitter = Api(create_api_key("submitter", scopes=["submit", "read"]).key)
    for client in (reader, submitter):
        assert client.get("/schedules").status_code == 200
        assert_problem(client.post("/schedules", NIGHTLY), 403, "forbidden")
    operator_only = Api(create_api_key("ops", scopes=["operate"]).key)
    assert operator_only.post("/schedules", NIGHTLY).status_code == 201
    assert_problem(operator_only.get("/schedules"), 403, "forbidden")
    assert_problem(Api().get("/schedules"), 401, "not-authenticated")


@pytest.mark.django_db
def test_a_dashboard_session_sees_and_changes_every_owners_schedules():
    Schedule.objects.all().delete()
    key_client = Api(create_api_key("tenant", scopes=["read", "operate"]).key)
    key_client.post("/schedules", NIGHTLY)
    user = User.objects.create_user("olga", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate_job", content_type__app_label="jobs"))
    client = Client()
    client.force_login(user)
    session = Api(client=client)
    assert [s["name"] for s in session.get("/schedules").json()] == ["nightly"]
    client.get("/accounts/login/")
    session.headers = {"X-CSRFToken": client.cookies["csrftoken"].value}
    assert session.patch("/schedules/nightly", {"enabled": False}).json()["enabled"] is False
