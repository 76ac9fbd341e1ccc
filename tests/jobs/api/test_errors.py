"""Every 4xx/5xx under /api/ is application/problem+json."""

from __future__ import annotations

import pytest
from django.db import OperationalError

from jobs import services
from jobs.models import Job
from tests.jobs.api.conftest import assert_problem

NOOP = {"kind": "demo.noop", "payload": {}}


def test_malformed_json_is_a_400(api):
    body = assert_problem(api.post("/jobs", b'{"kind": "demo.noop",'), 400, "malformed-json")
    assert "not valid JSON" in body["detail"]


@pytest.mark.parametrize("text", [b'{"kind": "demo.noop", "payload": {"x": NaN}}', b'{"payload": {"x": 1e999}}'])
def test_json_without_a_json_number_is_a_400(api, text):
    assert_problem(api.post("/jobs", text), 400, "malformed-json")


def test_invalid_utf8_is_a_400(api):
    assert_problem(api.post("/jobs", b'{"kind": "\xff"}'), 400, "malformed-json")


def test_text_postgres_cannot_store_is_a_422_naming_the_field(api):
    response = api.post("/jobs", {"kind": "demo.fail", "payload": {"message": "a\u0000b"}})

    body = assert_problem(response, 422, "validation-error")
    assert body["errors"][0]["field"] == "payload.message"
    assert_problem(api.get("/jobs", {"queue": "a\x00"}), 422)


def test_a_wrong_content_type_is_a_415(api):
    assert_problem(api.post("/jobs", "kind=demo.noop", content_type="application/x-www-form-urlencoded"), 415)
    assert_problem(api.post("/jobs", b"{}", content_type="text/plain"), 415, "unsupported-media-type")


def test_a_json_suffix_media_type_is_json(api):
    assert api.post("/jobs", NOOP, content_type="application/vnd.conveyor+json").status_code == 202


def test_a_body_over_1_mib_is_a_413(api):
    big = {"kind": "demo.fail", "payload": {"message": "x" * (1024 * 1024)}}

    assert_problem(api.post("/jobs", big), 413, "request-too-large")
    assert Job.objects.count() == 0


def test_a_body_over_djangos_form_limit_is_a_413_too(api):
    assert_problem(api.post("/jobs", b" " * (3 * 1024 * 1024)), 413, "request-too-large")


def test_a_body_that_is_not_an_object_is_a_422(api):
    body = assert_problem(api.post("/jobs", [1, 2]), 422, "validation-error")
    assert body["errors"][0]["field"] == "body"


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/jobs/x/y/z", "/api/nope", "/api/v2/jobs", "/api/"])
def test_unknown_routes_under_api_are_problem_404s(api, path):
    assert_problem(api.client.get(path, headers=api.headers), 404, "not-found")
    assert_problem(api.client.post(path, "{}", content_type="application/json"), 404, "not-found")


def test_a_wrong_method_is_a_problem_405_with_allow(api):
    response = api.client.delete("/api/v1/jobs", headers=api.headers)

    assert_problem(response, 405, "method-not-allowed")
    assert set(response["Allow"].split(", ")) == {"GET", "POST"}


def test_an_unexpected_exception_is_a_500_problem_without_traceback(api, monkeypatch):
    def explode(**kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(services, "queue_stats", explode)

    body = assert_problem(api.get("/queues"), 500, "internal-error")
    assert "secret internals" not in body["detail"]


def test_an_unavailable_database_is_a_503_to_retry(api, monkeypatch):
    def unreachable(**kwargs):
        raise OperationalError("sorry, too many clients already")

    monkeypatch.setattr(services, "queue_stats", unreachable)

    response = api.get("/queues")

    assert_problem(response, 503, "unavailable")
    assert response["Retry-After"] == "1"


def test_problem_types_are_documented(api):
    body = api.client.get("/api/v1/problems/idempotency-key-reused").json()

    assert body["status"] == 422
    assert body["type"] == "/api/v1/problems/idempotency-key-reused"
    assert_problem(api.client.get("/api/v1/problems/nope"), 404)


def test_the_openapi_document_and_the_docs_are_served(client):
    schema = client.get("/api/v1/openapi.json").json()

    assert schema["openapi"].startswith("3.")
    assert {"/api/v1/jobs", "/api/v1/batches", "/api/v1/dlq/retry", "/api/v1/queues"} <= set(schema["paths"])
    assert client.get("/api/v1/docs").status_code == 200


def test_the_docs_load_swagger_from_this_server_not_a_cdn(client):
    from django.contrib.staticfiles import finders

    html = client.get("/api/v1/docs").content.decode()

    assert "cdn." not in html and "https://" not in html
    assert "/static/ninja/swagger-ui-bundle.js" in html
    assert finders.find("ninja/swagger-ui-bundle.js") is not None
