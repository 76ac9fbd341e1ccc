"""Helpers of the dashboard tests: users, sessions, an SSE test client, hubs."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlparse

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator

from tests.conftest import wait_until_async


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _user(username: str, *, staff: bool, operate: bool):
    from django.contrib.auth.models import Permission, User

    user = User.objects.create_user(username, password="pw-" + username, is_staff=staff)
    if operate:
        user.user_permissions.add(Permission.objects.get(codename="operate_job", content_type__app_label="jobs"))
    return user


@pytest.fixture
def operator(db):
    """Staff with jobs.operate_job: may act."""
    return _user("olga", staff=True, operate=True)


@pytest.fixture
def reader(db):
    """Signed in, no permission: may only look."""
    return _user("rick", staff=False, operate=False)


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def reader_client(client, reader):
    client.force_login(reader)
    return client


def session_cookie(user) -> bytes:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


class SSEClient:
    """Drives config.asgi.application like Daphne would for one SSE request."""

    def __init__(self, path: str, *, cookie: bytes | None = None, headers: list[tuple[bytes, bytes]] = ()) -> None:
        from config.asgi import application

        parsed = urlparse(path)
        all_headers = [(b"host", b"testserver"), (b"accept", b"text/event-stream"), *headers]
        if cookie:
            all_headers.append((b"cookie", cookie))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": parsed.path,
            "raw_path": parsed.path.encode(),
            "root_path": "",
            "query_string": parsed.query.encode(),
            "headers": all_headers,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.communicator = ApplicationCommunicator(application, scope)
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.raw = b""
        self._buffer = b""
        self._parsed: list[dict] = []
        self.finished = False

    async def open(self, timeout: float = 10) -> SSEClient:
        await self.communicator.send_input({"type": "http.request", "body": b""})
        start = await self.communicator.receive_output(timeout)
        assert start["type"] == "http.response.start", start
        self.status = start["status"]
        self.headers = {k.lower(): v for k, v in start.get("headers", [])}
        return self

    async def _read(self, timeout: float) -> bool:
        """Read one body chunk; False when the response has ended."""
        if self.finished:
            return False
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "http.response.body", message
        self.raw += message["body"]
        self._buffer += message["body"]
        if not message.get("more_body"):
            self.finished = True
        return True

    async def body(self, timeout: float = 5) -> bytes:
        while await self._read(timeout):
            pass
        return self.raw

    async def events(self, count: int, *, timeout: float = 10, names: set[str] | None = None) -> list[dict]:
        """The next `count` messages (optionally only those named in `names`)."""
        found: list[dict] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(found) < count:
            while b"\n\n" in self._buffer:
                block, self._buffer = self._buffer.split(b"\n\n", 1)
                message = parse_block(block.decode())
                if message is not None:
                    self._parsed.append(message)
            while self._parsed and len(found) < count:
                message = self._parsed.pop(0)
                if names is None or message["event"] in names:
                    found.append(message)
            if len(found) >= count:
                break
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or not await self._read(remaining):
                raise AssertionError(
                    f"expected {count} messages, got {len(found)}: {found!r}; raw: {self.raw[-2000:]!r}"
                )
        return found

    async def nothing_more(self, timeout: float = 0.3) -> bool:
        """True when no message is pending (comments aside) for `timeout` seconds."""
        if self._parsed or not await self.communicator.receive_nothing(timeout):
            return False
        return all(parse_block(b.decode()) is None for b in self._buffer.split(b"\n\n") if b.strip())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.communicator.send_input({"type": "http.disconnect"})
            await self.communicator.wait(5)


def parse_block(block: str) -> dict | None:
    """One SSE message as {"id", "event", "data"}; None for comments and `retry:`."""
    message: dict = {"id": None, "event": "message", "data": []}
    seen = False
    for line in block.splitlines():
        if not line or line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            message["data"].append(value)
            seen = True
        elif field == "event":
            message["event"] = value
        elif field == "id":
            message["id"] = int(value)
    if not seen:
        return None
    message["data"] = "\n".join(message["data"])
    return message


@contextlib.asynccontextmanager
async def running_hub(**options):
    """An EventHub installed as the process's hub, stopped (and the thread's
    database connections closed, so the test database can be dropped) after."""
    from django.db import connections

    from dashboard.live.hub import EventHub, install_hub

    options.setdefault("publish_stats", False)
    hub = EventHub(**options)
    install_hub(hub)
    try:
        yield hub
    finally:
        await hub.stop()
        install_hub(None)
        await sync_to_async(connections.close_all)()


async def wait_for(predicate, *, timeout: float = 5.0, message: str = "") -> None:
    await wait_until_async(predicate, timeout=timeout, message=message)
