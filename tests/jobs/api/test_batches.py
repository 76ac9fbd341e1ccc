"""POST /batches (JSON and CSV), GET /batches, GET /batches/{id}."""

from __future__ import annotations

import json
import uuid

from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_q.models import OrmQ
from django_q.signing import SignedPackage

from jobs.models import Batch, Job, JobEvent
from jobs.worker.runner import run_job
from tests.jobs.api.conftest import BASE, assert_problem, make_dead

SLEEP = {"kind": "demo.sleep", "payload": {"seconds": 1}}


def _upload(api, csv_text: str, **fields):
    data = {"file": SimpleUploadedFile("rows.csv", csv_text.encode(), "text/csv"), "name": "upload", **fields}
    return api.client.post(BASE + "/batches", data, headers=api.headers)


def test_a_json_batch_creates_every_job_its_events_and_broker_rows(api):
    jobs = [SLEEP, {"kind": "demo.noop", "payload": {}, "queue": "other", "priority": 3}] * 50

    response = api.post("/batches", {"name": "hundred", "jobs": jobs})

    assert response.status_code == 202, response.content
    body = response.json()
    assert response["Location"] == f"/api/v1/batches/{body['id']}"
    assert (body["name"], body["total"], body["done"]) == ("hundred", 100, False)
    assert body["counts"]["queued"] == 100 and body["counts"]["dead"] == 0
    assert Job.objects.filter(batch_id=body["id"]).count() == 100
    assert Job.objects.filter(queue="other", priority=3).count() == 50
    assert JobEvent.objects.filter(type="job.created", job__batch_id=body["id"]).count() == 100
    assert OrmQ.objects.filter(key="default").count() == 50
    assert OrmQ.objects.filter(key="other").count() == 50


def test_batch_broker_rows_are_those_a_single_submission_writes(api):
    body = api.post("/batches", {"name": "b", "jobs": [{**SLEEP, "priority": 7}]}).json()
    job = Job.objects.get(batch_id=body["id"])

    with connection.cursor() as cursor:
        cursor.execute("SELECT key, payload, priority, lock <= clock_timestamp() FROM django_q_ormq")
        [(key, payload, priority, visible)] = cursor.fetchall()

    task = SignedPackage.loads(payload)
    assert (key, priority, visible) == ("default", 7, True)
    assert (task["func"], task["args"], task["timeout"]) == (run_job, (str(job.id),), job.timeout + 30)


def test_a_batch_is_written_in_a_constant_number_of_queries(api):
    api.get("/queues")  # the key's first use also records last_used_at
    with CaptureQueriesContext(connection) as small:
        api.post("/batches", {"name": "b", "jobs": [SLEEP] * 2})
    with CaptureQueriesContext(connection) as large:
        api.post("/batches", {"name": "b", "jobs": [SLEEP] * 500})

    assert len(large.captured_queries) == len(small.captured_queries)


def test_a_batch_event_notifies_like_a_single_submission(api):
    with CaptureQueriesContext(connection) as queries:
        api.post("/batches", {"name": "b", "jobs": [SLEEP]})

    assert any("pg_notify('conveyor_events'" in q["sql"] for q in queries.captured_queries)


def test_one_invalid_job_refuses_the_batch_naming_row_and_field(api):
    jobs = [SLEEP, {"kind": "demo.sleep", "payload": {"seconds": -1}}, SLEEP, {"kind": "nope", "payload": {}}]

    body = assert_problem(api.post("/batches", {"name": "bad", "jobs": jobs}), 422, "invalid-batch")

    assert [e["field"] for e in body["errors"]] == ["jobs[1].payload.seconds", "jobs[3].kind"]
    assert (Batch.objects.count(), Job.objects.count(), OrmQ.objects.count()) == (0, 0, 0)


def test_batch_schema_errors_name_the_row(api):
    body = assert_problem(api.post("/batches", {"name": "bad", "jobs": [SLEEP, {"payload": {}}]}), 422)

    assert body["errors"][0]["field"] == "jobs[1].kind"


def test_a_batch_needs_one_to_ten_thousand_jobs(api):
    assert_problem(api.post("/batches", {"name": "empty", "jobs": []}), 422)
    assert_problem(api.post("/batches", {"name": "huge", "jobs": [SLEEP] * 10_001}), 422)


def test_a_batch_body_may_exceed_1_mib_but_not_20(api):
    payload = {"kind": "demo.fail", "payload": {"message": "x" * 1900}}
    jobs = [payload] * 1500  # about 3 MiB: over Django's own 2.5 MiB form limit too

    assert api.post("/batches", {"name": "big", "jobs": jobs}).status_code == 202
    assert_problem(api.post("/batches", b" " * (21 * 1024 * 1024)), 413, "request-too-large")


def test_a_batch_in_another_media_type_is_a_415(api):
    assert_problem(api.post("/batches", "name,kind", content_type="text/csv"), 415)


def test_a_batch_replays_with_the_same_idempotency_key(api):
    batch = {"name": "once", "jobs": [SLEEP] * 3}

    first = api.post("/batches", batch, **{"Idempotency-Key": "b1"})
    again = api.post("/batches", batch, **{"Idempotency-Key": "b1"})
    other = api.post("/batches", {**batch, "name": "twice"}, **{"Idempotency-Key": "b1"})

    assert (first.status_code, again.status_code) == (202, 200)
    assert again["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert_problem(other, 422, "idempotency-key-reused")
    assert_problem(api.post("/batches", batch, **{"Idempotency-Key": "b" * 256}), 400)
    assert Job.objects.count() == 3


def test_a_csv_batch_fills_the_payload_template_from_each_row(api):
    csv_text = "seconds,label\n1,first\n2.5,second\n"
    template = json.dumps({"seconds": "{seconds}", "steps": 2})

    response = _upload(api, csv_text, kind="demo.sleep", payload_template=template, priority="7")

    assert response.status_code == 202, response.content
    assert response.json()["total"] == 2
    payloads = sorted(j.payload["seconds"] for j in Job.objects.all())
    assert payloads == [1.0, 2.5]
    assert set(Job.objects.values_list("priority", flat=True)) == {7}


def test_a_csv_batch_without_template_uses_each_row_as_the_payload(api):
    response = _upload(api, "mode,message\npermanent,hi\n", kind="demo.fail")

    assert response.status_code == 202, response.content
    assert Job.objects.get().payload["message"] == "hi"


def test_a_csv_batch_with_a_bad_row_names_it(api):
    response = _upload(api, "seconds\n1\nlots\n3\n", kind="demo.sleep")

    body = assert_problem(response, 422, "invalid-batch")
    assert [e["field"] for e in body["errors"]] == ["rows[2].payload.seconds"]
    assert Job.objects.count() == 0


def test_a_csv_batch_refuses_unknown_columns_in_the_template_and_bad_files(api):
    template = json.dumps({"seconds": "{secs}"})
    body = assert_problem(_upload(api, "seconds\n1\n", kind="demo.sleep", payload_template=template), 422)
    assert body["errors"][0]["field"] == "rows[1]"
    assert_problem(_upload(api, "", kind="demo.sleep"), 422, "invalid-batch")
    assert_problem(_upload(api, "a\n1\n", kind="demo.sleep", payload_template="[1]"), 422, "invalid-batch")
    no_file = api.client.post(BASE + "/batches", {"name": "n", "kind": "demo.noop"}, headers=api.headers)
    assert assert_problem(no_file, 422)["errors"][0]["field"] == "file"


def test_get_batch_counts_its_jobs_by_state(api):
    batch = api.post("/batches", {"name": "b", "jobs": [SLEEP, SLEEP]}).json()
    for job in Job.objects.all():
        make_dead(job.id)

    body = api.get(f"/batches/{batch['id']}").json()

    assert body["counts"]["dead"] == 2
    assert body["done"] is True
    assert body["finished_at"] is not None or body["done"]
    assert set(body) == {
        "id",
        "name",
        "total",
        "counts",
        "done",
        "callback_url",
        "created_at",
        "finished_at",
        "tokens_used",
        "usage",
        "token_budget",
        "budget_exhausted",
    }


def test_an_unknown_batch_is_a_404(api):
    assert_problem(api.get(f"/batches/{uuid.uuid4()}"), 404, "batch-not-found")


def test_batches_are_listed_newest_first_a_page_at_a_time(api):
    ids = [api.post("/batches", {"name": f"b{i}", "jobs": [SLEEP]}).json()["id"] for i in range(3)]

    first = api.get("/batches", {"limit": 2}).json()
    second = api.get("/batches", {"limit": 2, "cursor": first["next_cursor"]}).json()

    assert [b["id"] for b in first["items"] + second["items"]] == ids[::-1]
    assert first["items"][0]["counts"]["queued"] == 1


def test_jobs_can_be_listed_by_batch(api):
    batch = api.post("/batches", {"name": "b", "jobs": [SLEEP, SLEEP]}).json()
    api.post("/jobs", SLEEP)

    assert len(api.get("/jobs", {"batch": batch["id"]}).json()["items"]) == 2
