"""Procrastinate's side of `python -m bench peers` (bench/peers.py): the app its
workers load (`procrastinate --app bench.peer_procrastinate.app worker`) and the
task bodies, the same as the other columns': a no-op, the start time for W3,
one call to the simulated provider for W4. Async tasks, Procrastinate's native
form; psycopg 3 connector on the database at BENCH_PEERS_PG. Needs the `bench`
extra; nothing outside bench/ imports it."""

from __future__ import annotations

import os
import time

import httpx
import procrastinate

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ.get("BENCH_PEERS_PG", "")))

_client: httpx.AsyncClient | None = None


@app.task(name="noop")
async def noop() -> None:
    return None


@app.task(name="pickup")
async def pickup(key: int) -> None:
    """W3: when the task body started (wall clock), written to bench_peer_started."""
    started = time.time()
    await app.connector.execute_query_async(
        "INSERT INTO bench_peer_started (key, started) VALUES (%(key)s, %(started)s)", key=key, started=started
    )


@app.task(name="call_llm")
async def call_llm(url: str, prompt: str, model: str) -> None:
    """W4: the call bench/stock_tasks.py makes, on one shared async client."""
    global _client
    if _client is None:
        _client = httpx.AsyncClient(timeout=httpx.Timeout(30.0), limits=httpx.Limits(max_connections=200))
    response = await _client.post(url, json={"model": model, "messages": [{"role": "user", "content": prompt}]})
    response.raise_for_status()
    if not response.json()["choices"][0]["message"]["content"]:
        raise ValueError(f"empty answer for {prompt!r}")
