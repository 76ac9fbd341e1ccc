"""API test helpers: keys, an authenticated client, jobs in any state."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from jobs.engine.apikeys import SCOPES, create_api_key

BASE = "/api/v1"


class ApiClient:
    """Django's test Client speaking JSON to /api/v1 with a bearer key."""

    def __init__(self, key: str | None = None, client: Client | None = None) -> None:
        self.client = client or Client()
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path: str, params: dict[str, Any] | None = None, **headers: str):
        return self.client.get(BASE + path, params or {}, headers={**self.headers, **headers})

    def post(self, path: str, body: Any = None, *, content_type: str = "application/json", **headers: str):
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        if data is None:
            return self.client.post(BASE + path, headers={**self.headers, **headers})
        return self.client.post(BASE + path, data, content_type=content_type, headers={**self.headers, **headers})


@pytest.fixture
def make_key(db):
    """`make_key(scopes=("read",))` -> the clear key."""

    def make(scopes=SCOPES, name: str = "tests") -> str:
        return create_api_key(name, scopes=scopes).key

    return make


@pytest.fixture
def api(make_key) -> ApiClient:
    """A client with an all-scopes key."""
    return ApiClient(make_key())


# Two tenants: keys that see only what they submitted (tests/jobs/api/test_tenancy.py).


@pytest.fixture
def alice(db) -> ApiClient:
    return ApiClient(create_api_key("alice", scopes=["submit", "read"]).key)


@pytest.fixture
def bob(db) -> ApiClient:
    return ApiClient(create_api_key("bob", scopes=["submit", "read"]).key)


def assert_problem(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert set(body) >= {"type", "title", "status", "detail", "errors"}
    if code:
        assert body["type"].endswith(code), body
    assert "Traceback" not in response.content.decode()
    return body


def make_dead(job_id) -> None:
    """Move a queued job to dead the way a worker would (claim, then fail)."""
    from jobs.engine.states import transition
    from jobs.models import State

    transition(job_id, target=State.RUNNING)
    transition(job_id, target=State.DEAD, error_type="DemoPermanentError", error_message="boom")
