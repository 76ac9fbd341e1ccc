"""Celery's side of `python -m bench peers` (bench/peers.py): the app its
workers load (`celery -A bench.peer_celery worker`) and the task bodies, the
same as the other columns': a no-op, the start time for W3, one call to the
simulated provider for W4. Redis broker and result backend at
BENCH_PEERS_REDIS. Needs the `bench` extra; nothing outside bench/ imports it."""

from __future__ import annotations

import os
import time

import httpx
from celery import Celery

REDIS = os.environ.get("BENCH_PEERS_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("bench_peers", broker=REDIS, backend=REDIS)
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_hijack_root_logger=False,
)

_client: httpx.Client | None = None


@app.task(name="noop")
def noop() -> None:
    return None


@app.task(name="pickup")
def pickup() -> float:
    """W3: when the task body started (wall clock), returned through the result backend."""
    return time.time()


@app.task(name="call_llm")
def call_llm(url: str, prompt: str, model: str) -> str:
    """W4: the call bench/stock_tasks.py makes (a thread-pool worker shares one client)."""
    global _client
    if _client is None:
        _client = httpx.Client(timeout=httpx.Timeout(30.0), limits=httpx.Limits(max_connections=200))
    response = _client.post(url, json={"model": model, "messages": [{"role": "user", "content": prompt}]})
    response.raise_for_status()
    if not response.json()["choices"][0]["message"]["content"]:
        raise ValueError(f"empty answer for {prompt!r}")
    return prompt
