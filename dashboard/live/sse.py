"""Server-sent-event framing (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

KEEPALIVE = b": keep-alive\n\n"


@dataclass(frozen=True)
class Message:
    """One SSE message. `id` is the event-log cursor a client resumes from."""

    event: str
    data: str
    id: int | None = None
    # "replace": a later message with the same event name makes this one moot,
    # so a burst or a replay may send only the last. "append": every one counts.
    mode: str = "replace"

    def encode(self) -> bytes:
        return self._framed

    @cached_property
    def _framed(self) -> bytes:
        # Once per message: streams that show the same event share its Message.
        lines = []
        if self.id is not None:
            lines.append(f"id: {self.id}")
        lines.append(f"event: {_single_line(self.event)}")
        # A data line ends at any of \r\n, \r or \n; the client joins the lines
        # with \n again.
        lines.extend(f"data: {line}" for line in (self.data.splitlines() or [""]))
        return ("\n".join(lines) + "\n\n").encode()


def retry(milliseconds: int) -> bytes:
    """Tell the browser how long to wait before reconnecting."""
    return f"retry: {int(milliseconds)}\n\n".encode()


def compact(messages: list[Message]) -> list[Message]:
    """Drop "replace" messages that a later one with the same event name supersedes.

    The survivors keep their order, so the last message still carries the
    highest id of the batch (the client's cursor ends where the batch ends).
    """
    last = {m.event: i for i, m in enumerate(messages) if m.mode == "replace"}
    return [m for i, m in enumerate(messages) if m.mode != "replace" or last[m.event] == i]


def encode(messages: list[Message]) -> bytes:
    return b"".join(m.encode() for m in messages)


def parse_cursor(value: str | bytes | None) -> int | None:
    """An event id from `Last-Event-ID` or `?after=`; None when absent or malformed."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def _single_line(value: str) -> str:
    return value.replace("\r", " ").replace("\n", " ")
