"""GET /dlq, POST /dlq/retry, POST /dlq/discard."""

from __future__ import annotations

from jobs.models import Job
from tests.jobs.api.conftest import assert_problem, make_dead


def _dead(make_job, **options):
    job = make_job("demo.fail", {}, **options)
    make_dead(job.id)
    return job


def test_the_dlq_lists_dead_jobs_newest_first(api, make_job):
    older, newer = _dead(make_job), _dead(make_job, queue="other")
    make_job()

    page = api.get("/dlq").json()

    assert [j["id"] for j in page["items"]] == [str(newer.id), str(older.id)]
    assert page["items"][0]["error"] == {"type": "DemoPermanentError", "message": "boom"}
    assert [j["id"] for j in api.get("/dlq", {"queue": "other"}).json()["items"]] == [str(newer.id)]
    assert api.get("/dlq", {"error_type": "Other"}).json()["items"] == []


def test_the_dlq_pages_with_a_cursor(api, make_job):
    jobs = [_dead(make_job) for _ in range(3)]

    first = api.get("/dlq", {"limit": 2}).json()
    second = api.get("/dlq", {"limit": 2, "cursor": first["next_cursor"]}).json()

    assert [j["id"] for j in first["items"] + second["items"]] == [str(j.id) for j in reversed(jobs)]
    assert second["next_cursor"] is None


def test_retrying_by_ids_queues_those_jobs(api, make_job):
    one, two, _ = (_dead(make_job) for _ in range(3))

    response = api.post("/dlq/retry", {"ids": [str(one.id), str(two.id)]})

    assert response.json() == {"count": 2}
    assert Job.objects.filter(state="queued").count() == 2


def test_discarding_by_filter_discards_the_matching_jobs(api, make_job):
    _dead(make_job, queue="other")
    _dead(make_job)

    response = api.post("/dlq/discard", {"filter": {"queue": "other"}})

    assert response.json() == {"count": 1}
    assert Job.objects.filter(state="discarded").count() == 1


def test_an_empty_filter_selects_every_dead_job(api, make_job):
    _dead(make_job)
    _dead(make_job)

    assert api.post("/dlq/retry", {"filter": {}}).json() == {"count": 2}


def test_a_selection_needs_ids_or_a_filter_but_not_both(api):
    assert_problem(api.post("/dlq/retry", {}), 422, "validation-error")
    assert_problem(api.post("/dlq/retry", {"ids": [], "filter": {}}), 422, "validation-error")
    body = assert_problem(api.post("/dlq/retry", {"filter": {"state": "dead"}}), 422)
    assert body["errors"][0]["field"] == "filter.state"
    assert_problem(api.post("/dlq/retry", {"ids": ["nope"]}), 422)
