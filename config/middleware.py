"""Request ids: one per request, on every log line it causes and in its response;
and for the ASGI apps mounted ahead of Django (config/asgi.py), what Django's
middleware would do for them: the Host check, the HTTPS redirect, the security
headers, the request id; and the client address a declared proxy forwards."""

from __future__ import annotations

import ipaddress
import re
import uuid
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http.request import split_domain_port, validate_host

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
    """The last address of the request's `X-Forwarded-For` headers, if it is
    an IP address (anything else would reach the lockout's address column)."""
    found = None
    for name, value in headers:
        if name.lower() == b"x-forwarded-for":
            found = value.decode("latin-1").rsplit(",", 1)[-1].strip() or found
    try:
        return str(ipaddress.ip_address(found)) if found else None
    except ValueError:
        return None


# --- ASGI apps mounted ahead of Django ------------------------------------------


class DjangoProtections:
    """ASGI: Django's protections for an app that Django's middleware never sees
    (the SSE streams, the simulated provider). What Django would refuse or
    redirect (a Host outside ALLOWED_HOSTS, plain HTTP under
    SECURE_SSL_REDIRECT) goes to `django_app`, which answers it as for any
    page; the rest gets the headers SecurityMiddleware, XFrameOptionsMiddleware
    and RequestIdMiddleware add, and logs under its request id."""

    def __init__(self, app, django_app) -> None:
        self.app = app
        self.django_app = django_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = request_headers(scope)
        secure = is_secure(scope, headers)
        if not host_allowed(headers.get("host", "")) or (settings.SECURE_SSL_REDIRECT and not secure):
            return await self.django_app(scope, receive, send)
        request_id = request_id_from(headers.get(HEADER.lower(), ""))
        added = [*security_headers(secure), (HEADER.lower().encode(), request_id.encode())]

        async def protected_send(message):
            if message["type"] == "http.response.start":
                given = list(message.get("headers", []))
                present = {name.lower() for name, _ in given}
                message = {**message, "headers": given + [h for h in added if h[0] not in present]}
            await send(message)

        with request_log_context(request_id):
            return await self.app(scope, receive, protected_send)


def request_headers(scope: dict[str, Any]) -> dict[str, str]:
    """The request's headers by lowercase name, repeated ones joined with "," as Django does."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        name, value = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    return headers


def host_allowed(host: str) -> bool:
    """Whether Django's HttpRequest.get_host would accept this Host header."""
    domain, _ = split_domain_port(host)
    return bool(domain) and validate_host(domain, allowed_hosts())


def allowed_hosts() -> list[str]:
    # As HttpRequest.get_host: DEBUG with no ALLOWED_HOSTS allows local names.
    allowed = settings.ALLOWED_HOSTS
    if settings.DEBUG and not allowed:
        return [".localhost", "127.0.0.1", "[::1]"]
    return allowed


def is_secure(scope: dict[str, Any], headers: dict[str, str]) -> bool:
    # As HttpRequest.is_secure, SECURE_PROXY_SSL_HEADER included.
    if settings.SECURE_PROXY_SSL_HEADER:
        header, secure_value = settings.SECURE_PROXY_SSL_HEADER
        name = header.removeprefix("HTTP_").replace("_", "-").lower()
        value = headers.get(name)
        if value is not None:
            return value.split(",")[0].strip() == secure_value
    return scope.get("scheme") == "https"


def security_headers(secure: bool) -> list[tuple[bytes, bytes]]:
    """The headers SecurityMiddleware and XFrameOptionsMiddleware add to an answer."""
    found = [(b"x-frame-options", settings.X_FRAME_OPTIONS.upper().encode())]
    if secure and settings.SECURE_HSTS_SECONDS:
        hsts = f"max-age={settings.SECURE_HSTS_SECONDS}"
        if settings.SECURE_HSTS_INCLUDE_SUBDOMAINS:
            hsts += "; includeSubDomains"
        if settings.SECURE_HSTS_PRELOAD:
            hsts += "; preload"
        found.append((b"strict-transport-security", hsts.encode()))
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        found.append((b"x-content-type-options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        found.append((b"referrer-policy", (policy if isinstance(policy, str) else ",".join(policy)).encode()))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        found.append((b"cross-origin-opener-policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode()))
    return found
