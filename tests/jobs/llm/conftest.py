"""A real Daphne serving the simulated provider, and providers pointing at it."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine, Iterator
from typing import Any

import httpx
import pytest

from jobs.llm.client import aclose_clients
from jobs.llm.providers import Provider
from tests.conftest import ARTIFACTS, Processes, free_port, wait_until

API_KEY = "test-key"
# Nothing listens on port 9: any query would fail.
NO_DATABASE = "postgres://conveyor@127.0.0.1:9/none"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on a fresh loop and close the clients it opened."""

    async def main() -> Any:
        try:
            return await coro
        finally:
            await aclose_clients()

    return asyncio.run(main())


def start_daphne(procs: Processes, application: str, **env: str) -> str:
    """Start Daphne serving `application`; return its base URL once it answers."""
    port = free_port()
    # A listen backlog above Twisted's default of 50: a burst of 400 connects
    # (test_it_holds_hundreds_of_concurrent_streams) then never waits on SYN retries.
    endpoint = f"tcp:port={port}:interface=127.0.0.1:backlog=1024"
    proc = procs.start("daphne", [sys.executable, "-m", "daphne", "-e", endpoint, application], **env)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"Daphne exited with {proc.returncode}:\n{procs.log_of(proc)}")
        try:
            return httpx.get(f"{base}/simulated/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).is_success
        except httpx.TransportError:
            return False

    wait_until(answers, timeout=60, interval=0.2, message="Daphne to serve the simulated provider")
    return base


@pytest.fixture(scope="session")
def daphne() -> Iterator[str]:
    """One Daphne for the session: the project's ASGI app, fast simulated timings, keys required.

    Its database does not exist: the simulated provider must never need one."""
    procs = Processes(ARTIFACTS / "logs" / "llm")
    try:
        yield start_daphne(
            procs,
            "config.asgi:application",
            DATABASE_URL=NO_DATABASE,
            CONVEYOR_SIM_TTFT_MS="20",
            CONVEYOR_SIM_TPS="2000",
            CONVEYOR_SIM_CHUNK_MS="20",
            CONVEYOR_SIM_LATENCY_MS="",
            CONVEYOR_SIM_RATE_429="",
            CONVEYOR_SIM_RATE_500="",
            CONVEYOR_SIM_RATE_HANG="",
            CONVEYOR_SIM_FAIL="",
            CONVEYOR_SIM_REQUIRE_KEY="1",
            # The tests inject failures with X-Sim-* headers and read /load.
            CONVEYOR_SIMULATOR_CONTROLS="1",
        )
    finally:
        procs.stop_all()


def make_provider(base: str, **overrides: Any) -> Provider:
    values: dict[str, Any] = {
        "name": "sim",
        "base_url": f"{base}/simulated/v1",
        "api_key": API_KEY,
        "default_model": "simulated",
        "max_concurrency": 50,
        "connect_timeout": 5.0,
        "read_timeout": 10.0,
        "total_timeout": 20.0,
        "simulated": True,
    }
    values.update(overrides)
    return Provider(**values)


@pytest.fixture
def provider(daphne: str) -> Provider:
    return make_provider(daphne)
