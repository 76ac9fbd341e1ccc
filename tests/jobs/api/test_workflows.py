"""Workflows through the REST API: `depends_on` and `on_dependency_failure` on
POST /jobs, `then` on POST /batches; refusals are 422 problems naming
`depends_on[i]`; a key may name only jobs it can see."""

from __future__ import annotations

import uuid

from jobs.models import Batch, Job, JobDependency
from tests.jobs.api.conftest import assert_problem, make_dead

NOOP = {"kind": "demo.noop", "payload": {}}


def test_a_job_submitted_with_depends_on_is_waiting_and_says_so(alice):
    first = alice.post("/jobs", NOOP).json()["id"]

    response = alice.post("/jobs", {**NOOP, "depends_on": [first], "on_dependency_failure": "run"})

    assert response.status_code == 202, response.content
    body = response.json()
    assert body["state"] == "waiting"
    job = Job.objects.get(id=body["id"])
    assert (job.on_dependency_failure, job.pending_dependencies) == ("run", 1)
    assert alice.get("/jobs", {"state": "waiting"}).json()["items"][0]["id"] == body["id"]


def test_unknown_and_malformed_ids_are_a_422_problem_naming_each(alice):
    first = alice.post("/jobs", NOOP).json()["id"]
    never = str(uuid.uuid4())

    unknown = assert_problem(alice.post("/jobs", {**NOOP, "depends_on": [first, never]}), 422)
    malformed = assert_problem(alice.post("/jobs", {**NOOP, "depends_on": ["x", first, first]}), 422)

    assert unknown["errors"] == [{"field": "depends_on[1]", "message": f"no job with id {never}"}]
    assert [e["field"] for e in malformed["errors"]] == ["depends_on[0]", "depends_on[2]"]
    assert Job.objects.count() == 1 and not JobDependency.objects.exists()


def test_another_keys_job_is_an_unknown_dependency(alice, bob):
    theirs = alice.post("/jobs", NOOP).json()["id"]

    body = assert_problem(bob.post("/jobs", {**NOOP, "depends_on": [theirs]}), 422)

    assert body["errors"] == [{"field": "depends_on[0]", "message": f"no job with id {theirs}"}]
    assert Job.objects.count() == 1


def test_a_bad_policy_is_a_422(alice):
    body = assert_problem(alice.post("/jobs", {**NOOP, "on_dependency_failure": "ignore"}), 422)
    assert [e["field"] for e in body["errors"]] == ["on_dependency_failure"]


def test_a_failed_dependency_shows_as_the_reason_of_the_cancelled_job(alice):
    first = alice.post("/jobs", {"kind": "demo.fail", "payload": {"mode": "permanent"}}).json()["id"]
    second = alice.post("/jobs", {**NOOP, "depends_on": [first]}).json()["id"]

    make_dead(first)

    body = alice.get(f"/jobs/{second}").json()
    assert body["state"] == "cancelled"
    assert body["error"]["message"] == f"dependency {first} ended dead"


def test_a_batch_with_a_then_job(alice):
    response = alice.post(
        "/batches", {"name": "b", "jobs": [NOOP, NOOP], "then": {"kind": "demo.collect", "payload": {}}}
    )

    assert response.status_code == 202, response.content
    batch = Batch.objects.get(id=response.json()["id"])
    assert (batch.then_job.state, batch.then_job.pending_dependencies, batch.then_job.owner) == (
        "waiting",
        2,
        batch.owner,
    )


def test_a_batch_with_a_bad_then_job_is_refused_naming_it(alice):
    response = alice.post("/batches", {"name": "b", "jobs": [NOOP], "then": {"kind": "demo.sleep", "payload": {}}})

    body = assert_problem(response, 422)
    assert [e["field"] for e in body["errors"]] == ["then.payload.seconds"]
    assert not Batch.objects.exists()
