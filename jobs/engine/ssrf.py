"""Outbound HTTP that cannot be turned against the inside (SSRF).

Webhook URLs come from API clients. Without care, `http://169.254.169.254/`
would read the cloud's instance credentials and `http://localhost:5432/` would
probe the database. So:

1. Only http and https URLs are accepted.
2. The host is resolved *when the connection is made*, every address is
   checked, and the socket connects to the checked address: a name that
   resolved to a public address when it was registered and to 127.0.0.1 now
   (DNS rebinding) is refused. TLS still verifies the certificate against the
   name (SNI), and the Host header is the name: only the address is pinned.
   This lives in an httpcore network backend, below httpx, so it holds for
   every connection httpx opens (and redirects are not followed anyway).
3. Loopback, private, link-local, reserved and otherwise non-public addresses
   are refused unless `CONVEYOR_WEBHOOK_ALLOW_PRIVATE`; multicast, unspecified
   and cloud-metadata addresses always are.
4. Time is bounded: 5 s to connect, 15 s in all (a deadline that every read
   and write shares, so a receiver dripping one byte a second cannot hold a
   worker); the response body is read up to 1 KiB, then the connection is
   dropped.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator

from jobs.engine.pooled_transport import PooledTransport

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CONNECT_TIMEOUT = 5.0
TOTAL_TIMEOUT = 15.0
MAX_BODY = 1024

# Instance-metadata services: AWS (and its IPv6 twin), ECS task metadata,
# GCP/Azure/OCI (the same 169.254.169.254), Alibaba, Azure's wire server.
# Some are public addresses, so they are named rather than caught by range.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeURL(Exception):
    """The URL may not be called: bad scheme or syntax, or a refused address."""


class BlockedAddress(UnsafeURL):
    """The host is, or resolves to, an address outbound calls may not reach."""


@dataclass(frozen=True)
class Response:
    status_code: int
    body: bytes  # at most MAX_BODY bytes
    elapsed: float  # seconds, request sent to body read
    headers: httpx.Headers = field(default_factory=httpx.Headers)


def allow_private() -> bool:
    return settings.CONVEYOR_WEBHOOKS["ALLOW_PRIVATE"]


def refusal(address: IPAddress) -> str | None:
    """Why `address` may not be called ("a loopback address", …), or None."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address dressed as IPv6 reaches the IPv4 host.
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address in _NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if allow_private():
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "not a public address"
    return None


def resolve(host: str, port: int) -> list[IPAddress]:
    """The addresses `host` resolves to, in the resolver's order (tests patch this)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])  # drop an IPv6 zone
        if address not in addresses:
            addresses.append(address)
    return addresses


def safe_addresses(host: str, port: int) -> list[IPAddress]:
    """Resolve `host` and check every address; raise BlockedAddress if any is refused.

    All of them, not only the one we would use: a name that resolves to a
    public and a private address is someone's trick, not a receiver."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            addresses = resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnsafeURL(f"the host {host!r} does not resolve ({exc})") from None
    if not addresses:
        raise UnsafeURL(f"the host {host!r} does not resolve")
    for address in addresses:
        reason = refusal(address)
        if reason:
            shown = "" if str(address) == host.strip("[]") else f" resolves to {address}, which"
            raise BlockedAddress(f"the host {host}{shown} is {reason}; outbound calls may not reach it")
    return addresses


def check_url(url: str, *, resolve_host: bool = True) -> None:
    """Refuse (UnsafeURL) a URL that is not http(s), is malformed, or whose host
    is or resolves to a refused address. Delivery checks again at connect time."""
    parts = _parse(url)
    host = parts.hostname or ""
    if resolve_host:
        safe_addresses(host, parts.port or (443 if parts.scheme == "https" else 80))
        return
    # Without DNS: literal addresses, and the names that always mean this host.
    if host == "localhost" or host.endswith(".localhost"):
        if not allow_private():
            raise BlockedAddress(f"the host {host} is a loopback address; outbound calls may not reach it")
        return
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    reason = refusal(address)
    if reason:
        raise BlockedAddress(f"the host {address} is {reason}; outbound calls may not reach it")


def post(
    url: str,
    *,
    content: bytes,
    headers: dict[str, str],
    connect_timeout: float = CONNECT_TIMEOUT,
    total_timeout: float = TOTAL_TIMEOUT,
    max_body: int = MAX_BODY,
) -> Response:
    """POST `content` to `url` under the rules above.

    Raises UnsafeURL (BlockedAddress) for a refused URL, httpx.TimeoutException
    past a timeout, httpx.TransportError when the connection fails. Redirects
    are answers like any other: not followed.
    """
    _parse(url)
    started = time.monotonic()
    deadline = started + total_timeout
    timeout = httpx.Timeout(total_timeout, connect=connect_timeout)
    with httpx.Client(
        transport=_GuardedTransport(deadline), timeout=timeout, follow_redirects=False, trust_env=False
    ) as client:
        with client.stream("POST", url, content=content, headers=headers) as response:
            body = b""
            # Raw bytes: a compressed answer is not inflated (no zip bombs).
            for chunk in response.iter_raw(chunk_size=max_body):
                body += chunk
                if len(body) >= max_body:
                    break
            return Response(response.status_code, body[:max_body], time.monotonic() - started, response.headers)


def _parse(url: str):
    if not isinstance(url, str) or len(url) > 2000:
        raise UnsafeURL("the URL must be at most 2000 characters")
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise UnsafeURL("the URL must be an http or https URL") from None
    return urlsplit(url)


# --- the guarded connection layer ----------------------------------------


class _GuardedTransport(PooledTransport):
    def __init__(self, deadline: float) -> None:
        # httpx builds its own pool without a way to pass a network backend:
        # a transport on our own (one connection: a transport serves one request).
        super().__init__(
            httpcore.ConnectionPool(
                ssl_context=httpx.create_ssl_context(trust_env=False),
                max_connections=1,
                network_backend=_GuardedBackend(deadline),
            )
        )


class _GuardedBackend(httpcore.NetworkBackend):
    """Resolves, checks, then connects to the checked address (never the name)."""

    def __init__(self, deadline: float) -> None:
        self._backend = httpcore.SyncBackend()
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        error: Exception | None = None
        for address in _within_time(
            safe_addresses, host, port, timeout=_within(timeout, self._deadline, httpcore.ConnectTimeout)
        ):
            try:
                stream = self._backend.connect_tcp(
                    str(address),
                    port,
                    timeout=_within(timeout, self._deadline, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                error = exc
                continue
            return _DeadlineStream(stream, self._deadline)
        raise error or httpcore.ConnectError(f"could not connect to {host}")

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None):
        raise BlockedAddress("unix sockets may not be reached")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _DeadlineStream(httpcore.NetworkStream):
    """A stream whose every read and write waits at most until the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _within(timeout, self._deadline, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _within(timeout, self._deadline, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        tls = self._stream.start_tls(
            ssl_context, server_hostname, _within(timeout, self._deadline, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(tls, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _within_time(func, *args: Any, timeout: float) -> Any:
    """`func(*args)`, or ConnectTimeout once `timeout` passes: getaddrinfo has
    no timeout of its own, and a slow resolver must not hold a worker."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, func(*args)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="ssrf-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise httpcore.ConnectTimeout(f"resolving the host took over {timeout:.1f} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _within(timeout: float | None, deadline: float, error: type[Exception]) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise error("the total time allowed for the request ran out")
    return remaining if timeout is None else min(timeout, remaining)
