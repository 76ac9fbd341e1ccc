"""Outbound safety: refused addresses, checked when connecting; no redirects;
bounded time and body. CONVEYOR_WEBHOOK_ALLOW_PRIVATE is off here unless a
test turns it on."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import httpx
import pytest

from jobs.engine import ssrf
from jobs.errors import InvalidJob
from jobs.models import Job, State
from tests.jobs.api.conftest import ApiClient, assert_problem
from tests.jobs.webhooks.conftest import deliveries_of, finish, run_delivery

BLOCKED = {
    "http://127.0.0.1/": "loopback",
    "http://127.1.2.3:8000/": "loopback",
    "http://[::1]/": "loopback",
    "http://10.1.2.3/": "private",
    "http://172.16.0.1/": "private",
    "http://192.168.1.1/": "private",
    "http://[fc00::1]/": "private",
    "http://169.254.10.10/": "link-local",
    "http://[fe80::1]/": "link-local",
    "http://224.0.0.1/": "multicast",
    "http://[ff02::1]/": "multicast",
    "http://240.0.0.1/": "reserved",
    "http://0.0.0.0/": "unspecified",
    "http://100.64.0.1/": "not a public address",  # carrier-grade NAT
    "http://169.254.169.254/latest/meta-data/": "cloud metadata",
    "http://[fd00:ec2::254]/": "cloud metadata",
    "http://100.100.100.200/": "cloud metadata",
    "http://[::ffff:127.0.0.1]/": "loopback",  # IPv4 in IPv6 clothing
    "http://[64:ff9b::a00:1]/": "private",  # NAT64 of 10.0.0.1
}


@pytest.fixture
def resolver(monkeypatch):
    """Map names to addresses in place of DNS; `resolver.calls` counts lookups."""

    class Resolver:
        def __init__(self) -> None:
            self.names: dict[str, list[list[str]]] = {}
            self.calls = 0

        def map(self, name: str, *answers: str) -> None:
            """Each lookup of `name` gets the next answer (the last repeats)."""
            self.names[name] = [[a] for a in answers]

        def __call__(self, host: str, port: int):
            self.calls += 1
            answers = self.names.get(host)
            if answers is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            answer = answers.pop(0) if len(answers) > 1 else answers[0]
            return [ipaddress.ip_address(a) for a in answer]

    fake = Resolver()
    monkeypatch.setattr(ssrf, "resolve", fake)
    return fake


@pytest.mark.parametrize(("url", "reason"), BLOCKED.items())
def test_each_blocked_address_class_is_refused(url, reason):
    with pytest.raises(ssrf.BlockedAddress, match=reason):
        ssrf.check_url(url)
    with pytest.raises(ssrf.BlockedAddress, match=reason):
        ssrf.post(url, content=b"{}", headers={})


def test_a_name_that_resolves_to_loopback_is_refused():
    with pytest.raises(ssrf.BlockedAddress, match=r"localhost resolves to (127\.0\.0\.1|::1), which is a loopback"):
        ssrf.check_url("http://localhost:8000/hook")


def test_a_name_mapped_to_127_0_0_1_is_refused(resolver):
    resolver.map("hooks.example.test", "127.0.0.1")
    with pytest.raises(ssrf.BlockedAddress, match="hooks.example.test resolves to 127.0.0.1"):
        ssrf.check_url("https://hooks.example.test/in")


def test_a_name_with_one_private_address_among_public_ones_is_refused(resolver):
    resolver.names["mixed.example.test"] = [["93.184.215.14", "10.0.0.7"]]
    with pytest.raises(ssrf.BlockedAddress, match="10.0.0.7, which is a private address"):
        ssrf.check_url("https://mixed.example.test/")


def test_the_address_is_checked_again_when_connecting(resolver, receiver):
    """DNS rebinding: public when registered, loopback when called."""
    resolver.map("rebind.example.test", "93.184.215.14", "127.0.0.1")
    url = f"http://rebind.example.test:{receiver.port}/hook"
    ssrf.check_url(url)
    with pytest.raises(ssrf.BlockedAddress, match="resolves to 127.0.0.1, which is a loopback"):
        ssrf.post(url, content=b"{}", headers={})
    assert receiver.received() == []


def test_the_connection_goes_to_the_checked_address_under_the_original_name(resolver, receiver, allow_private):
    resolver.map("receiver.example.test", "127.0.0.1")
    response = ssrf.post(f"http://receiver.example.test:{receiver.port}/hook", content=b"{}", headers={})
    assert response.status_code == 200
    assert resolver.calls == 1
    (message,) = receiver.received()
    assert message.headers["host"] == f"receiver.example.test:{receiver.port}"


def test_cloud_metadata_stays_refused_when_private_addresses_are_allowed(allow_private, resolver):
    resolver.map("metadata.google.internal", "169.254.169.254")
    for url in ("http://169.254.169.254/", "http://metadata.google.internal/", "http://[fd00:ec2::254]/"):
        with pytest.raises(ssrf.BlockedAddress, match="cloud metadata"):
            ssrf.post(url, content=b"{}", headers={})
    ssrf.check_url("http://127.0.0.1:9/")  # allowed


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/", "example.com", "http://"])
def test_only_http_and_https_urls_are_called(url):
    with pytest.raises(ssrf.UnsafeURL, match="http or https"):
        ssrf.post(url, content=b"{}", headers={})


def test_redirects_are_answers_not_followed(allow_private):
    hits: list[str] = []

    def serve(conn: socket.socket) -> None:
        request = conn.recv(65536).decode()
        hits.append(request.split(" ", 2)[1])
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    with _server(serve) as port:
        response = ssrf.post(f"http://127.0.0.1:{port}/hook", content=b"{}", headers={})
    assert response.status_code == 302
    assert hits == ["/hook"]


def test_the_response_body_read_stops_at_1_kib(allow_private):
    def serve(conn: socket.socket) -> None:
        conn.recv(65536)
        body = b"x" * 100_000
        conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    with _server(serve) as port:
        response = ssrf.post(f"http://127.0.0.1:{port}/", content=b"{}", headers={})
    assert response.status_code == 500
    assert response.body == b"x" * 1024


def test_the_total_time_is_bounded_even_while_bytes_trickle_in(allow_private):
    def serve(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        for _ in range(100):
            time.sleep(0.1)  # one header byte every 0.1 s: no single read times out
            conn.sendall(b"X")

    started = time.monotonic()
    with _server(serve) as port, pytest.raises(httpx.TimeoutException):
        ssrf.post(f"http://127.0.0.1:{port}/", content=b"{}", headers={}, total_timeout=1.0)
    assert time.monotonic() - started < 3


def test_a_slow_resolver_counts_against_the_time_allowed(monkeypatch):
    # A resolver that takes 3 s to answer.
    monkeypatch.setattr(ssrf, "resolve", lambda host, port: time.sleep(3) or [])
    started = time.monotonic()
    with pytest.raises(httpx.ConnectTimeout, match="resolving"):
        ssrf.post("http://slow.example.test/", content=b"{}", headers={}, total_timeout=0.5)
    assert time.monotonic() - started < 2


def test_without_dns_literal_addresses_and_localhost_are_still_refused(resolver):
    for url in ("http://localhost:8000/", "http://api.localhost/", "http://10.0.0.1/", "http://[::1]/"):
        with pytest.raises(ssrf.BlockedAddress):
            ssrf.check_url(url, resolve_host=False)
    ssrf.check_url("https://unknown.example.test/", resolve_host=False)
    assert resolver.calls == 0


def test_the_timeouts_are_5_s_to_connect_and_15_s_in_all():
    assert (ssrf.CONNECT_TIMEOUT, ssrf.TOTAL_TIMEOUT, ssrf.MAX_BODY) == (5.0, 15.0, 1024)


# --- at submission, registration and delivery --------------------------------


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "not a url", "javascript:alert(1)", "http://exa mple.com/"])
def test_a_bad_callback_url_is_refused_at_submission(make_key, url):
    api = ApiClient(make_key())
    response = api.post("/jobs", {"kind": "demo.noop", "payload": {}, "callback_url": url})
    body = assert_problem(response, 422, "invalid-job")
    assert body["errors"] == [{"field": "callback_url", "message": "must be an http or https URL"}]
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://localhost:8000/hook", "loopback"),
        ("http://169.254.169.254/", "cloud metadata"),
        ("http://10.0.0.1/", "private"),
        ("ftp://example.com/", "http or https"),
    ],
)
def test_an_endpoint_at_a_refused_address_is_refused_at_registration(make_key, url, reason):
    api = ApiClient(make_key())
    response = api.post("/webhooks", {"url": url, "event_types": ["job.succeeded"]})
    body = assert_problem(response, 422, "validation-error")
    assert body["errors"][0]["field"] == "url"
    assert reason in body["errors"][0]["message"]


@pytest.mark.django_db(transaction=True)
def test_a_callback_to_a_loopback_address_is_refused_at_submission(make_job, receiver):
    with pytest.raises(InvalidJob) as refused:
        make_job(callback_url=receiver.url("/hook"))
    assert refused.value.errors == [
        {
            "field": "callback_url",
            "message": "the host 127.0.0.1 is a loopback address; outbound calls may not reach it",
        }
    ]


def test_a_callback_to_a_refused_address_is_dead_lettered_at_once(make_job, receiver, monkeypatch):
    # Accepted while private addresses were allowed (or through a name that
    # resolved elsewhere then): delivery checks the address again.
    with monkeypatch.context() as allowed:
        allowed.setattr(ssrf, "allow_private", lambda: True)
        job = make_job(callback_url=receiver.url("/hook"))
    job = finish(job)
    (delivery,) = deliveries_of(job)
    deliver_job = run_delivery(delivery)
    assert deliver_job.state == State.DEAD
    assert deliver_job.attempts == 1
    assert deliver_job.error_type == "DeliveryRefused"
    assert "127.0.0.1 is a loopback address" in deliver_job.error_message
    (attempt,) = delivery.attempts.all()
    assert attempt.status_code is None and "loopback" in attempt.error
    assert receiver.received() == []


# --- helpers -------------------------------------------------------------


class _server:
    """A one-connection-at-a-time TCP server on 127.0.0.1 running `serve(conn)`."""

    def __init__(self, serve) -> None:
        self.serve = serve
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=15)
        self.sock.close()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    self.serve(conn)
                except OSError:
                    pass
