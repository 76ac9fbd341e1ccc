"""Request ids: one per request, on every log line it causes and in its response."""

from __future__ import annotations

import re
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from config.logs import request_log_context

HEADER = "X-Request-ID"
# What a proxy may hand us (a UUID, a hex trace id, "abc-123.4"); anything
# else (too long, spaces, control characters) would let a client write into
# our logs, so it is replaced by an id of our own.
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(request) -> str:
    """The request's X-Request-ID when it looks like an id, else a new one."""
    return request_id_from(request.headers.get(HEADER, ""))


def request_id_from(given: str) -> str:
    """`given` (an X-Request-ID header's value) when it looks like an id, else a new one."""
    return given if _VALID.match(given) else uuid.uuid4().hex


class RequestIdMiddleware:
    """Sets `request.request_id`, logs everything under it, and echoes it in
    the `X-Request-ID` response header. Put it first in MIDDLEWARE."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        request.request_id = request_id_of(request)
        with request_log_context(request.request_id):
            response = self.get_response(request)
        response[HEADER] = request.request_id
        return response

    async def _acall(self, request):
        request.request_id = request_id_of(request)
        with request_log_context(request.request_id):
            response = await self.get_response(request)
        response[HEADER] = request.request_id
        return response


class ProxyHeaders:
    """ASGI: the client address is the one the proxy put in `X-Forwarded-For`.

    Installed only with CONVEYOR_BEHIND_PROXY=1 (config/asgi.py). Daphne's own
    --proxy-headers believed whoever sent the header, so a client talking to
    Daphne directly chose its address (and escaped the sign-in lockout). The
    last entry is the one the proxy next to us wrote, whether it overwrites
    the header (as the README's nginx configuration does) or appends to it.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            forwarded = forwarded_for(scope["headers"])
            if forwarded is not None:
                scope = {**scope, "client": (forwarded, 0)}
        return await self.app(scope, receive, send)


def forwarded_for(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The last address of the request's `X-Forwarded-For` headers, if any."""
    found = None
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            last = value.decode("latin-1").rsplit(",", 1)[-1].strip()
            found = last or found
    return found
