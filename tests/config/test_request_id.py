"""Every request has an id: taken from X-Request-ID or made, echoed, and logged."""

from __future__ import annotations

import logging
import re

import pytest

from config.logs import ContextFilter

pytestmark = pytest.mark.django_db


class Lines(logging.Handler):
    """Collects the records of one logger, through the context filter."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(ContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def request_log():
    handler = Lines()
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def test_a_request_without_an_id_gets_a_new_one(client):
    first = client.get("/healthz")["X-Request-ID"]
    second = client.get("/healthz")["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert first != second


def test_a_request_id_from_the_proxy_is_kept(client):
    response = client.get("/healthz", headers={"X-Request-ID": "edge-7f3a.42:1"})
    assert response["X-Request-ID"] == "edge-7f3a.42:1"


@pytest.mark.parametrize("given", ["two words", "x" * 129, "bad\nline", 'quote"d'])
def test_a_request_id_that_is_not_an_id_is_replaced(client, given):
    response = client.get("/healthz", headers={"X-Request-ID": given})
    assert re.fullmatch(r"[0-9a-f]{32}", response["X-Request-ID"])


def test_lines_logged_while_serving_a_request_carry_its_id(client, request_log):
    response = client.get("/no-such-page", headers={"X-Request-ID": "req-123"})
    assert response.status_code == 404
    assert response["X-Request-ID"] == "req-123"
    (record,) = [r for r in request_log.records if "Not Found" in r.getMessage()]
    assert record.request_id == "req-123"


@pytest.mark.anyio
async def test_the_async_path_carries_the_id_too(async_client, request_log):
    response = await async_client.get("/no-such-page", headers={"X-Request-ID": "req-async"})
    assert response.status_code == 404
    assert response["X-Request-ID"] == "req-async"
    (record,) = [r for r in request_log.records if "Not Found" in r.getMessage()]
    assert record.request_id == "req-async"


def test_a_line_logged_by_the_view_carries_the_id(rf):
    from django.http import HttpResponse

    from config.middleware import RequestIdMiddleware

    handler = Lines()
    logger = logging.getLogger("tests.view")
    logger.addHandler(handler)

    def view(request):
        logger.warning("inside the view")
        return HttpResponse()

    try:
        response = RequestIdMiddleware(view)(rf.get("/", headers={"X-Request-ID": "req-view"}))
    finally:
        logger.removeHandler(handler)
    assert response["X-Request-ID"] == "req-view"
    assert [r.request_id for r in handler.records] == ["req-view"]


def test_a_line_logged_after_the_request_has_no_id(client, request_log):
    client.get("/no-such-page", headers={"X-Request-ID": "req-over"})
    logging.getLogger("django.request").warning("later")
    assert request_log.records[-1].request_id is None
