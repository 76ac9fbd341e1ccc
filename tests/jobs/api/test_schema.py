"""Schemathesis against /api/v1/openapi.json: no 5xx, every answer as documented."""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jobs.engine.apikeys import create_api_key

# In-process through Django's WSGI handler: same thread, same connection, so
# requests see the key this test's transaction created. Loading the document
# touches no database.
schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", get_wsgi_application())

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def bearer(db):
    """A key, and Django's WSGI handler kept from closing the test's connection
    at the end of each request (as the test Client does), which would end the
    test's transaction."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield {"Authorization": f"Bearer {create_api_key('schemathesis').key}"}
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_api_keeps_its_openapi_contract(case, bearer):
    case.call_and_validate(headers=bearer, checks=CHECKS)


def test_real_answers_match_the_schema(bearer, make_job):
    """Schemathesis rarely guesses an existing id or a registered kind: walk the
    successful answers too (jobs with attempts, dead jobs, batches, replays)."""
    from werkzeug.test import Client as WsgiClient

    from tests.jobs.api.conftest import make_dead

    http = WsgiClient(get_wsgi_application())
    dead = make_job("demo.fail", {})
    make_dead(dead.id)
    cancellable = make_job()
    job = {"kind": "demo.sleep", "payload": {"seconds": 1}}
    answers = {
        ("POST", "/api/v1/jobs"): [
            http.post("/api/v1/jobs", json=job, headers={**bearer, "Idempotency-Key": "k"}),
            http.post("/api/v1/jobs", json=job, headers={**bearer, "Idempotency-Key": "k"}),
        ],
        ("POST", "/api/v1/batches"): [http.post("/api/v1/batches", json={"name": "b", "jobs": [job]}, headers=bearer)],
        ("GET", "/api/v1/jobs"): [http.get("/api/v1/jobs?limit=1", headers=bearer)],
        ("GET", "/api/v1/jobs/{job_id}"): [http.get(f"/api/v1/jobs/{dead.id}", headers=bearer)],
        ("GET", "/api/v1/jobs/{job_id}/events"): [http.get(f"/api/v1/jobs/{dead.id}/events", headers=bearer)],
        ("POST", "/api/v1/jobs/{job_id}/cancel"): [http.post(f"/api/v1/jobs/{cancellable.id}/cancel", headers=bearer)],
        ("POST", "/api/v1/jobs/{job_id}/retry"): [http.post(f"/api/v1/jobs/{cancellable.id}/retry", headers=bearer)],
        ("GET", "/api/v1/dlq"): [http.get("/api/v1/dlq", headers=bearer)],
        ("POST", "/api/v1/dlq/discard"): [
            http.post("/api/v1/dlq/discard", json={"ids": [str(dead.id)]}, headers=bearer)
        ],
        ("GET", "/api/v1/queues"): [http.get("/api/v1/queues", headers=bearer)],
        ("GET", "/api/v1/batches"): [http.get("/api/v1/batches", headers=bearer)],
        ("GET", "/api/v1/problems/{code}"): [http.get("/api/v1/problems/invalid-state")],
    }
    batch_id = answers[("POST", "/api/v1/batches")][0].json["id"]
    answers[("GET", "/api/v1/batches/{batch_id}")] = [http.get(f"/api/v1/batches/{batch_id}", headers=bearer)]

    for (method, path), responses in answers.items():
        for response in responses:
            assert response.status_code < 300, (method, path, response.get_data(as_text=True))
            schema[path][method].validate_response(response)
    assert [r.status_code for r in answers[("POST", "/api/v1/jobs")]] == [202, 200]
