"""The stock approach the LLM benchmark compares with: a plain Django-Q2 task
that makes one blocking HTTP call, one call per worker process."""

from __future__ import annotations

import httpx
from django.db import connection

_client: httpx.Client | None = None


def call_llm(url: str, prompt: str, model: str) -> None:
    global _client
    if _client is None:
        _client = httpx.Client(timeout=httpx.Timeout(30.0))
    response = _client.post(url, json={"model": model, "messages": [{"role": "user", "content": prompt}]})
    response.raise_for_status()
    text = response.json()["choices"][0]["message"]["content"]
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO bench_stock_done (prompt, chars) VALUES (%s, %s)", [prompt, len(text)])
