"""Hostile input the other API tests do not cover: deeply nested JSON, huge
`limit`s, malformed ids everywhere an id goes, CSV uploads in the wrong
encoding or with 100,000 rows. Each is a clear 4xx problem, and nothing is
half-written."""

from __future__ import annotations

import json
import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django_q.models import OrmQ

from jobs.models import Batch, Job, JobEvent
from tests.jobs.api.conftest import BASE, assert_problem


def _nothing_written() -> None:
    assert (Job.objects.count(), Batch.objects.count(), JobEvent.objects.count(), OrmQ.objects.count()) == (0, 0, 0, 0)


def _nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


@pytest.mark.parametrize("depth", [65, 500, 900, 990, 1000, 5000, 100_000])
def test_deeply_nested_json_is_a_4xx(api, depth):
    body = '{"kind": "demo.noop", "payload": ' + _nested(depth) + "}"
    response = api.post("/jobs", body)
    assert 400 <= response.status_code < 500, (depth, response.status_code)
    assert_problem(response, response.status_code)
    batch = '{"name": "deep", "jobs": [{"kind": "demo.noop", "payload": ' + _nested(depth) + "}]}"
    response = api.post("/batches", batch)
    assert 400 <= response.status_code < 500, (depth, response.status_code)
    _nothing_written()


def test_a_too_deeply_nested_payload_is_refused_naming_the_limit(api):
    response = api.post("/jobs", '{"kind": "demo.noop", "payload": ' + _nested(70) + "}")
    body = assert_problem(response, 422)
    assert any("64" in e["message"] for e in body["errors"]), body


@pytest.mark.parametrize(
    "limit", ["0", "-1", "501", "1e3", "1.5", "99999999999999999999999999999", "-9223372036854775809", "", "x", "nan"]
)
@pytest.mark.parametrize("path", ["/jobs", "/dlq", "/batches"])
def test_a_bad_or_huge_limit_is_a_422(api, limit, path):
    assert_problem(api.get(path, {"limit": limit}), 422)


BAD_IDS = ["not-a-uuid", "0", "00000000-0000-0000-0000-00000000000g", "%00", "' OR 1=1 --", "a" * 300]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_a_malformed_id_is_a_4xx_wherever_an_id_goes(api, bad):
    from urllib.parse import quote

    job_id = quote(bad, safe="")
    for method, path in [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/deliveries"),
        ("POST", f"/jobs/{job_id}/cancel"),
        ("POST", f"/jobs/{job_id}/retry"),
        ("GET", f"/batches/{job_id}"),
        ("GET", f"/batches/{job_id}/deliveries"),
        ("GET", f"/webhooks/{job_id}"),
        ("POST", f"/jobs/{uuid.uuid4()}/deliveries/{job_id}/redeliver"),
    ]:
        response = api.get(path) if method == "GET" else api.post(path)
        assert response.status_code in (404, 405, 422), (path, response.status_code)
        assert_problem(response, response.status_code)
    for params in ({"batch": bad}, {"cursor": bad}, {"state": bad}):
        assert_problem(api.get("/jobs", params), 422)
    response = api.post("/dlq/retry", {"ids": [bad]})
    assert_problem(response, 422)


def _upload(api, content: bytes, **fields):
    data = {"file": SimpleUploadedFile("rows.csv", content, "text/csv"), "name": "upload", "kind": "demo.noop"}
    return api.client.post(BASE + "/batches", {**data, **fields}, headers=api.headers)


@pytest.mark.parametrize(
    "content",
    [
        "name\nJosé\n".encode("latin-1"),
        "\ufeffname\nx\n".encode("utf-16"),
        b"name\n\xff\xfe\xfd\n",
        b"name\nab\x00cd\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    ],
    ids=["latin-1", "utf-16", "invalid-bytes", "nul", "binary"],
)
def test_a_csv_that_is_not_utf8_text_is_a_422(api, content):
    body = assert_problem(_upload(api, content, kind="demo.sleep"), 422, "invalid-batch")
    assert body["errors"][0]["field"] == "file"
    _nothing_written()


def test_a_csv_of_100000_rows_is_refused_whole(api):
    content = ("seconds\n" + "1\n" * 100_000).encode()
    body = assert_problem(_upload(api, content, kind="demo.sleep"), 422, "invalid-batch")
    assert "10000" in json.dumps(body).replace(",", ""), body
    _nothing_written()


def test_a_csv_of_10000_rows_with_one_bad_row_writes_nothing(api):
    content = ("seconds\n" + "1\n" * 9_998 + "lots\n1\n").encode()
    body = assert_problem(_upload(api, content, kind="demo.sleep"), 422, "invalid-batch")
    assert [e["field"] for e in body["errors"]] == ["rows[9999].payload.seconds"]
    _nothing_written()


def test_a_csv_upload_over_20_mib_is_a_413(api):
    content = b"note\n" + (b"x" * 1023 + b"\n") * (21 * 1024)
    assert_problem(_upload(api, content), 413)
    _nothing_written()


def test_a_csv_with_unbalanced_quotes_or_ragged_rows_is_a_422(api):
    for content in (b'seconds\n"1\n2\n', b"seconds,steps\n1\n1,2,3\n"):
        response = _upload(api, content, kind="demo.sleep")
        assert_problem(response, 422)
    _nothing_written()


@pytest.mark.parametrize(
    "text",
    ["\u202e", "😀" * 1000, "e\u0301" * 100, "\u2028\u2029", "\ufeff", "\U0010ffff"],
    ids=["rtl", "astral", "combining", "separators", "bom", "last-code-point"],
)
def test_unicode_edge_cases_are_stored_as_sent(api, text):
    response = api.post("/jobs", {"kind": "demo.fail", "payload": {"message": text}})
    assert response.status_code == 202, response.content
    assert Job.objects.get(id=response.json()["id"]).payload["message"] == text
