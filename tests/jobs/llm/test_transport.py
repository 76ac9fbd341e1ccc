"""The LLM client's transport (httpx over jobs.llm.transport's asyncio backend)
against a real HTTP/1.1 server on loopback: bodies larger than its buffers in
both directions, keep-alive reuse, a connection the server closed while idle,
and the read and connect errors httpx callers see."""

from __future__ import annotations

import asyncio
import hashlib
import socket

import httpx
import pytest

from jobs.llm.transport import HIGH_WATER, Transport
from tests.conftest import free_port, wait_until_async


class Server:
    """Answers `GET /size/N` with N bytes, `POST /echo-hash` with the body's
    SHA-256, `GET /hang` never; counts connections; `close_idle()` drops them."""

    def __init__(self) -> None:
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ")
                headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if path == "/hang":
                    await asyncio.sleep(3600)  # never answers: the client's read timeout is the test
                if path.startswith("/size/"):
                    payload = bytes(range(256)) * (int(path.rsplit("/", 1)[1]) // 256)
                else:
                    payload = hashlib.sha256(body).hexdigest().encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload) + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close_idle(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()


def run(scenario) -> None:
    async def main() -> None:
        server = Server()
        port = await server.start()
        client = httpx.AsyncClient(
            transport=Transport(ssl_context=None, limits=httpx.Limits(max_connections=4)),
            base_url=f"http://127.0.0.1:{port}",
        )
        try:
            await scenario(client, server)
        finally:
            await client.aclose()
            server.server.close()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def test_a_body_larger_than_the_read_buffer_arrives_whole_and_in_order():
    size = 16 * HIGH_WATER

    async def scenario(client: httpx.AsyncClient, server: Server) -> None:
        async with client.stream("GET", f"/size/{size}") as response:
            received = bytearray()
            async for chunk in response.aiter_raw():
                received += chunk
                await asyncio.sleep(0)  # a slow reader: the transport pauses and resumes
        assert received == bytes(range(256)) * (size // 256)

    run(scenario)


def test_a_large_request_body_is_sent_whole():
    body = bytes(range(256)) * 16384  # 4 MiB

    async def scenario(client: httpx.AsyncClient, server: Server) -> None:
        response = await client.post("/echo-hash", content=body)
        assert response.text == hashlib.sha256(body).hexdigest()

    run(scenario)


def test_an_idle_connection_is_reused_and_one_the_server_closed_is_replaced():
    async def scenario(client: httpx.AsyncClient, server: Server) -> None:
        for _ in range(3):
            assert (await client.get("/size/256")).status_code == 200
        assert server.connections == 1
        server.close_idle()
        pool = client._transport.pool  # our transport's httpcore pool (jobs/engine/pooled_transport.py)
        await wait_until_async(
            lambda: pool.connections and all(connection.has_expired() for connection in pool.connections),
            timeout=10,
            message="the client's idle connection to see the close",
        )
        assert (await client.get("/size/512")).content == bytes(range(256)) * 2
        assert server.connections == 2

    run(scenario)


def test_a_silent_server_is_a_read_timeout():
    async def scenario(client: httpx.AsyncClient, server: Server) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await client.get("/hang", timeout=httpx.Timeout(5, read=0.3))

    run(scenario)


def test_a_refused_connection_is_a_connect_error():
    port = free_port()  # nothing listens there

    async def scenario(client: httpx.AsyncClient, server: Server) -> None:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")

    run(scenario)


def test_the_socket_options_httpcore_passes_are_applied():
    async def scenario(client: httpx.AsyncClient, server: Server) -> None:
        from jobs.llm.transport import AsyncioBackend

        port = server.server.sockets[0].getsockname()[1]
        stream = await AsyncioBackend().connect_tcp(
            "127.0.0.1", port, timeout=5, socket_options=[(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        )
        try:
            sock = stream.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)
            assert stream.get_extra_info("is_readable") is False
        finally:
            await stream.aclose()

    run(scenario)


def test_the_transport_streams_on_the_asyncio_backend_through_public_apis_only():
    from jobs.llm.transport import AsyncioStream

    async def scenario(client, server):
        async with client.stream("GET", "/size/1048576") as response:
            # httpcore's public extension names the stream its backend made.
            assert isinstance(response.extensions["network_stream"], AsyncioStream)
            chunks = [chunk async for chunk in response.aiter_raw()]
        assert len(chunks) > 1 and sum(map(len, chunks)) == 1048576

    run(scenario)
    transport = Transport(ssl_context=None, limits=httpx.Limits(max_connections=1))
    assert isinstance(transport, httpx.AsyncBaseTransport)
    assert not isinstance(transport, httpx.AsyncHTTPTransport)  # nothing of httpx's internals replaced
    assert not hasattr(transport, "_pool")
