"""The routes config/asgi.py mounts ahead of Django (the SSE streams, the
simulated provider) keep Django's protections: a Host outside ALLOWED_HOSTS
gets Django's 400, and every answer carries the headers Django's
SecurityMiddleware, XFrameOptionsMiddleware and our RequestIdMiddleware add."""

from __future__ import annotations

import httpx
import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.django_db(transaction=True)]

EDGE_ROUTES = [
    ("GET", "/events/overview"),
    ("GET", "/api/v1/events"),
    ("GET", "/simulated/v1/models"),
    ("POST", "/simulated/v1/chat/completions"),
]
# What Django's middleware adds to an answer (the request id varies).
SECURITY_HEADERS = ["x-frame-options", "x-content-type-options", "referrer-policy", "cross-origin-opener-policy"]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def _close_connections():
    """Django's request threads keep their database connections; close them,
    or the test database could not be dropped."""
    yield
    from config import asgi

    asgi.django_asgi_app.close()


async def call(method: str, path: str, *, base: str = "http://testserver", headers: dict | None = None):
    from config.asgi import application

    transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url=base) as client:
        body = b'{"model": "simulated", "messages": [{"role": "user", "content": "hi"}]}' if method == "POST" else None
        return await client.request(method, path, content=body, headers=headers or {}, timeout=10)


@pytest.mark.parametrize(("method", "path"), EDGE_ROUTES)
async def test_a_host_outside_allowed_hosts_gets_djangos_400(method, path):
    django = await call("GET", "/healthz", base="http://evil.example")
    edge = await call(method, path, base="http://evil.example")
    assert django.status_code == 400
    assert (edge.status_code, edge.headers["content-type"], edge.content) == (
        django.status_code,
        django.headers["content-type"],
        django.content,
    )


@pytest.mark.parametrize(("method", "path"), EDGE_ROUTES)
@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_edge_answers_carry_djangos_security_headers_and_a_request_id(method, path, scheme):
    django = await call("GET", "/healthz", base=f"{scheme}://testserver")
    # Anonymous SSE callers get 401: an answer all the same.
    edge = await call(method, path, base=f"{scheme}://testserver", headers={"X-Request-ID": "edge-1"})
    added = {name: value for name, value in django.headers.items() if name in SECURITY_HEADERS}
    assert set(added) == set(SECURITY_HEADERS), django.headers
    assert {name: edge.headers.get(name) for name in added} == added
    assert edge.headers["x-request-id"] == "edge-1"
