"""POST/GET /jobs, GET /jobs/{id}, events, cancel, retry."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.utils import timezone
from django_q.models import OrmQ

from jobs.models import Attempt, Job, JobEvent
from tests.jobs.api.conftest import assert_problem, make_dead

JOB_FIELDS = {
    "id",
    "kind",
    "queue",
    "state",
    "priority",
    "payload",
    "attempts",
    "max_attempts",
    "progress",
    "result",
    "error",
    "idempotency_key",
    "callback_url",
    "batch",
    "run_after",
    "created_at",
    "started_at",
    "finished_at",
    "attempt_history",
    "usage",
}


def test_submitting_answers_202_with_the_job_and_its_location(api):
    response = api.post("/jobs", {"kind": "demo.sleep", "payload": {"seconds": 1}, "priority": 5})

    assert response.status_code == 202
    job = response.json()
    assert set(job) == JOB_FIELDS | {"output"}  # as GET /jobs/{id} shows it
    assert job["output"] == ""
    assert response["Location"] == f"/api/v1/jobs/{job['id']}"
    assert job["state"] == "queued"
    assert job["payload"] == {"seconds": 1.0, "steps": 10}
    assert job["priority"] == 5
    assert job["created_at"].endswith("Z")
    stored = Job.objects.get(id=job["id"])
    assert stored.owner.startswith("apikey:")
    assert list(JobEvent.objects.filter(job=stored).values_list("type", flat=True)) == ["job.created"]
    assert OrmQ.objects.count() == 1


def test_a_job_with_run_after_in_the_future_is_scheduled(api):
    when = (timezone.now() + timedelta(hours=1)).isoformat()

    job = api.post("/jobs", {"kind": "demo.noop", "payload": {}, "run_after": when}).json()

    assert job["state"] == "scheduled"
    assert job["run_after"].endswith("Z")


def test_an_invalid_payload_is_a_422_naming_the_field(api):
    response = api.post("/jobs", {"kind": "demo.sleep", "payload": {"seconds": -1}})

    body = assert_problem(response, 422, "invalid-job")
    assert [e["field"] for e in body["errors"]] == ["payload.seconds"]
    assert Job.objects.count() == 0


def test_an_unknown_kind_is_a_422(api):
    body = assert_problem(api.post("/jobs", {"kind": "nope", "payload": {}}), 422, "unknown-kind")
    assert body["errors"][0]["field"] == "kind"


def test_schema_errors_name_each_field_as_sent(api):
    response = api.post("/jobs", {"kind": "demo.noop", "payload": {}, "priority": "high", "max_attempt": 3})

    body = assert_problem(response, 422, "validation-error")
    assert {e["field"] for e in body["errors"]} == {"priority", "max_attempt"}


def test_engine_rules_the_schema_cannot_say_are_422s_too(api):
    response = api.post("/jobs", {"kind": "demo.noop", "payload": {}, "backoff_base": 10, "backoff_max": 5})

    body = assert_problem(response, 422, "invalid-job")
    assert body["errors"][0]["field"] == "backoff_max"


def test_a_payload_over_256_kib_is_refused(api):
    response = api.post("/jobs", {"kind": "demo.fail", "payload": {"message": "x" * 300_000}})

    assert_problem(response, 422, "payload-too-large")


def test_get_job_shows_the_job_with_its_attempt_history(api, make_job):
    job = make_job("demo.fail", {})
    Attempt.objects.create(
        job=job, number=1, started_at=timezone.now(), finished_at=timezone.now(), outcome="failed", error_type="E"
    )

    body = api.get(f"/jobs/{job.id}").json()

    assert set(body) == JOB_FIELDS | {"output"}
    assert body["id"] == str(job.id)
    assert body["progress"] == {"percent": 0, "message": ""}
    assert body["attempt_history"] == [
        {
            "number": 1,
            "outcome": "failed",
            "started_at": body["attempt_history"][0]["started_at"],
            "finished_at": body["attempt_history"][0]["finished_at"],
            "error": {"type": "E", "message": ""},
            "output": "",
            "logs": [],
        }
    ]


def test_an_unknown_job_is_a_404(api):
    assert_problem(api.get(f"/jobs/{uuid.uuid4()}"), 404, "job-not-found")


def test_a_malformed_job_id_is_a_422_never_a_500(api):
    body = assert_problem(api.get("/jobs/not-a-uuid"), 422, "validation-error")
    assert body["errors"][0]["field"] == "path.job_id"


def test_listing_pages_newest_first_with_an_opaque_cursor(api, make_job):
    ids = [str(make_job().id) for _ in range(5)]

    first = api.get("/jobs", {"limit": 2}).json()
    second = api.get("/jobs", {"limit": 2, "cursor": first["next_cursor"]}).json()
    third = api.get("/jobs", {"limit": 2, "cursor": second["next_cursor"]}).json()

    seen = [j["id"] for page in (first, second, third) for j in page["items"]]
    assert seen == ids[::-1]
    assert third["next_cursor"] is None


def test_listing_pages_jobs_created_in_the_same_instant_without_loss(api, make_job):
    jobs = [make_job() for _ in range(4)]
    Job.objects.update(created_at=timezone.now())

    seen, cursor = [], None
    while True:
        page = api.get("/jobs", {"limit": 1, **({"cursor": cursor} if cursor else {})}).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert sorted(seen) == sorted(str(j.id) for j in jobs)
    assert len(seen) == 4


def test_listing_filters_by_state_queue_and_kind(api, make_job):
    dead = make_job("demo.fail", {})
    make_dead(dead.id)
    make_job("demo.noop", {}, queue="other")
    make_job("demo.noop", {})

    assert [j["id"] for j in api.get("/jobs", {"state": "dead"}).json()["items"]] == [str(dead.id)]
    assert len(api.get("/jobs", {"queue": "other"}).json()["items"]) == 1
    assert len(api.get("/jobs", {"kind": "demo.noop"}).json()["items"]) == 2


def test_listing_refuses_bad_limits_states_and_cursors(api):
    assert_problem(api.get("/jobs", {"limit": 0}), 422)
    assert_problem(api.get("/jobs", {"limit": 501}), 422)
    assert_problem(api.get("/jobs", {"state": "sleeping"}), 422)
    body = assert_problem(api.get("/jobs", {"cursor": "garbage!"}), 422)
    assert body["errors"][0]["field"] == "query.cursor"


def test_listing_accepts_the_largest_limit(api, make_job):
    make_job()
    assert api.get("/jobs", {"limit": 500}).status_code == 200


def test_events_are_listed_oldest_first_after_an_id(api, make_job):
    job = make_job("demo.fail", {})
    make_dead(job.id)

    events = api.get(f"/jobs/{job.id}/events").json()
    later = api.get(f"/jobs/{job.id}/events", {"after": events[0]["id"]}).json()

    assert [e["type"] for e in events] == ["job.created", "job.running", "job.dead"]
    assert set(events[0]) == {"id", "type", "data", "created_at"}
    assert [e["type"] for e in later] == ["job.running", "job.dead"]


def test_events_of_an_unknown_job_are_a_404(api):
    assert_problem(api.get(f"/jobs/{uuid.uuid4()}/events"), 404, "job-not-found")


def test_cancelling_a_queued_job_answers_202_with_the_cancelled_job(api, make_job):
    job = make_job()

    response = api.post(f"/jobs/{job.id}/cancel")

    assert response.status_code == 202
    assert response.json()["state"] == "cancelled"
    assert JobEvent.objects.filter(job=job, type="job.cancelled").get().data["actor"] == "apikey:tests"


def test_cancelling_a_finished_job_is_a_409(api, make_job):
    job = make_job("demo.fail", {})
    make_dead(job.id)

    assert_problem(api.post(f"/jobs/{job.id}/cancel"), 409, "invalid-state")


def test_cancelling_an_unknown_job_is_a_404(api):
    assert_problem(api.post(f"/jobs/{uuid.uuid4()}/cancel"), 404, "job-not-found")


def test_retrying_a_dead_job_queues_it_again(api, make_job):
    job = make_job("demo.fail", {})
    make_dead(job.id)

    response = api.post(f"/jobs/{job.id}/retry")

    assert response.status_code == 202
    assert response.json()["state"] == "queued"
    assert response.json()["error"] is None


def test_retrying_a_queued_job_is_a_409(api, make_job):
    assert_problem(api.post(f"/jobs/{make_job().id}/retry"), 409, "invalid-state")


def test_queues_lists_counts_per_queue(api, make_job):
    first = make_job()
    make_job(depends_on=[first.id])

    body = api.get("/queues").json()

    default = next(q for q in body if q["queue"] == "default")
    assert (default["queued"], default["waiting"]) == (1, 1)
    assert set(default) == {
        "queue",
        "waiting",
        "queued",
        "scheduled",
        "running",
        "retrying",
        "dead",
        "oldest_queued_age_seconds",
        "succeeded_last_minute",
        "failed_last_minute",
        "paused",
        "max_running",
    }
    assert (default["paused"], default["max_running"]) == (False, None)


def test_an_internal_kind_is_a_422_naming_the_kind(api):
    delivery = {"kind": "webhook.deliver", "payload": {"delivery": str(uuid.uuid4())}}

    for path, body in (("/jobs", delivery), ("/batches", {"name": "b", "jobs": [delivery]})):
        problem = assert_problem(api.post(path, body), 422)
        assert [e["field"] for e in problem["errors"]] in (["kind"], ["jobs[0].kind"]), problem
        assert "is internal: only the engine submits it" in problem["errors"][0]["message"]
    assert (Job.objects.count(), OrmQ.objects.count()) == (0, 0)
