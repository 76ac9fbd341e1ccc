"""Daphne's TCP transport with config/server/tcp_writes.py: writes go out at once,
and fall back to Twisted's buffer in order when the socket cannot take them."""

from __future__ import annotations

import socket

import pytest
from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor

from config.server import tcp_writes


@pytest.fixture
def connection():
    """A server transport on one end of a socket pair, the other end to read."""
    tcp_writes.install()
    ours, theirs = socket.socketpair()
    reactor = MemoryReactor()
    transport = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 1), None, 1, reactor)
    yield transport, theirs, reactor
    ours.close()
    theirs.close()


def _read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_write_is_sent_at_once_without_watching_the_socket(connection):
    transport, peer, reactor = connection
    transport.writeSequence([b"3\r\n", b"abc", b"\r\n"])
    transport.write(b"more")
    assert _read_all(peer) == b"3\r\nabc\r\nmore"
    assert transport not in reactor.writers


def test_what_the_socket_does_not_take_is_buffered_and_later_writes_queue_behind_it(connection):
    transport, peer, reactor = connection
    big = b"x" * (8 << 20)  # more than any socket buffer
    transport.write(big)
    assert transport in reactor.writers  # the reactor sends the rest when it can
    transport.write(b"after")  # must not overtake the buffered bytes
    received = _read_all(peer)
    while transport in reactor.writers:
        transport.doWrite()
        received += _read_all(peer)
    assert received == big + b"after"


def test_a_write_after_the_connection_closed_is_dropped(connection):
    transport, peer, reactor = connection
    transport.connected = False
    transport.write(b"late")
    assert _read_all(peer) == b""
