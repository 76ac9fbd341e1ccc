"""`GET /api/v1/jobs/{id}`: the latest attempt's `output`, and each attempt's
own `output` and `logs` (the partial text of a failed or lost attempt too)."""

from __future__ import annotations

import pytest

from jobs.engine.apikeys import create_api_key
from jobs.models import Job
from jobs.worker import claims, finish
from jobs.worker.heartbeat import Progress, record_progress
from tests.jobs.api.conftest import ApiClient, assert_problem

pytestmark = pytest.mark.django_db(transaction=True)


class Flaky(Exception):
    pass


def _stream(job_id, worker: str, attempt: int, text: str, lines: tuple[str, ...] = ()) -> None:
    report = Progress(10, "streaming", worker, text, attempt=attempt, delta=text, logs="\n".join(lines) or None)
    assert record_progress({job_id: report._replace(lines=lines)}) == {job_id: False}


def _submit(client: ApiClient) -> str:
    response = client.post("/jobs", {"kind": "demo.noop", "payload": {}})
    assert response.status_code == 202, response.content
    return response.json()["id"]


def test_a_job_shows_its_latest_output_and_each_attempt_s_output_and_logs():
    alice = ApiClient(create_api_key("alice", scopes=["submit", "read"]).key)
    job_id = _submit(alice)
    job = Job.objects.get(id=job_id)
    Job.objects.filter(id=job_id).update(max_attempts=3, backoff_base=0, backoff_max=0)
    assert claims.claim(job_id, "w1")
    _stream(job.id, "w1", 1, "Once upon a", ("12:00:00 INFO demo: calling the model",))
    finish.finish_failed(Job.objects.get(id=job_id), "w1", Flaky("connection reset"), output="Once upon a time")
    assert claims.claim(job_id, "w2")
    _stream(job.id, "w2", 2, "Once")

    body = alice.get(f"/jobs/{job_id}").json()

    assert body["output"] == "Once"  # the running attempt's text so far
    first, second = body["attempt_history"]
    assert (first["outcome"], first["output"], first["logs"]) == (
        "failed",
        "Once upon a time",
        ["12:00:00 INFO demo: calling the model"],
    )
    assert (second["outcome"], second["output"], second["logs"]) == ("running", "Once", [])


def test_a_job_not_yet_attempted_has_no_output():
    alice = ApiClient(create_api_key("alice", scopes=["submit", "read"]).key)
    body = alice.get(f"/jobs/{_submit(alice)}").json()
    assert (body["output"], body["attempt_history"]) == ("", [])


def test_another_tenant_cannot_read_a_job_s_output():
    alice = ApiClient(create_api_key("alice", scopes=["submit", "read"]).key)
    bob = ApiClient(create_api_key("bob", scopes=["submit", "read"]).key)
    job_id = _submit(alice)
    assert claims.claim(job_id, "w1")
    _stream(Job.objects.get(id=job_id).id, "w1", 1, "alice's secret text", ("a line of alice's",))

    body = assert_problem(bob.get(f"/jobs/{job_id}"), 404)

    assert "secret" not in str(body) and "alice" not in str(body)
    assert alice.get(f"/jobs/{job_id}").json()["output"] == "alice's secret text"
