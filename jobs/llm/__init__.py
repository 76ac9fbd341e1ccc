"""LLM providers: their configuration, the Chat Completions client and the simulated provider.

- `providers.py` — which providers exist (from the environment), `get_provider(name)`.
- `client.py` — `chat(provider, messages=...)` over httpx, with streaming and the error mapping
  to `RetryableError` / `PermanentError`.
- `simulated.py` — the OpenAI-compatible endpoint the project serves itself under `/simulated/v1/`.
"""
