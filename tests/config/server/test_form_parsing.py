"""config/server/form_parsing.py: Daphne's requests leave form bodies to Django."""

from __future__ import annotations

from types import SimpleNamespace

from daphne.http_protocol import WebRequest
from twisted.internet.address import IPv4Address

from config.server import form_parsing


def make_request() -> WebRequest:
    address = IPv4Address("TCP", "127.0.0.1", 8000)
    channel = SimpleNamespace(
        factory=SimpleNamespace(server=SimpleNamespace(protocol_connected=lambda request: None)),
        getPeer=lambda: address,
        getHost=lambda: address,
        transport=None,
    )
    return WebRequest(channel, False)


def test_twisted_does_not_parse_the_forms_daphne_never_reads():
    form_parsing.install()
    form_parsing.install()  # idempotent

    request = make_request()

    assert request._parsePOSTFormSubmission is False
