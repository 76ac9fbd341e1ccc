"""Daphne's TCP connections send a write at once when nothing is waiting to go.

Twisted's transports never write in `write()`: they buffer the bytes, ask the
reactor to watch the socket for writability and send on the next turn of the
loop, then stop watching (twisted/twisted#5303). Under Daphne's asyncio
reactor that is two `epoll_ctl` calls, an extra loop turn and a dozen Python
frames per write. An SSE process writes thousands of small chunks a second
(each event to each stream), and this dance dominated its CPU.

`install()` makes `tcp.Server.write` try `send()` first, as asyncio's own
transports do, and fall back to Twisted's buffered path for whatever the
kernel did not take (a slow reader, a full socket buffer) and whenever bytes
are already buffered, so the order of writes is kept. Errors are left to the
buffered path too: the reactor reports them as before, never from inside
`write()`. TLS connections (`self.TLS`) are untouched.

Written for Twisted 26.10.0 (`tcp.Server`'s `write`/`writeSequence`, and the
`dataBuffer`/`offset`/`_tempDataLen` of `abstract.FileDescriptor`); on any
other version Twisted's own write path stays (config/server/patching.py).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import abstract, tcp

from config.server.patching import guarded

NAME = "twisted-tcp-writes"
PACKAGE = "Twisted"
VERSIONS = ("26.10.0",)


def install() -> bool:
    """Patch `twisted.internet.tcp.Server` on the versions it was written for
    (idempotent); True when installed."""
    return guarded(NAME, package=PACKAGE, versions=VERSIONS, install=lambda: _install())


def _install() -> None:
    tcp.Server.write = _write
    tcp.Server.writeSequence = _write_sequence


def _write(self: tcp.Server, data: bytes) -> None:
    if (
        self.TLS
        or not isinstance(data, bytes)  # Twisted's path raises its TypeError
        or not data
        or not self.connected
        or self.disconnecting
        or self._writeDisconnected
        or self._tempDataLen
        or len(self.dataBuffer) > self.offset
    ):
        tcp.Connection.write(self, data)
        return
    try:
        sent = self.socket.send(data)
    except OSError:
        sent = 0  # EAGAIN, or an error the reactor will report on the buffered path
    if sent < len(data):
        abstract.FileDescriptor.write(self, data[sent:])


def _write_sequence(self: tcp.Server, iovec: Iterable[bytes]) -> None:
    if self.TLS:
        tcp.Connection.writeSequence(self, iovec)
    else:
        _write(self, b"".join(iovec))
