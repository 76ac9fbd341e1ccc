"""An async client for the OpenAI-compatible Chat Completions API (OpenAI, vLLM, Ollama,
llama.cpp server, most gateways), streaming or not.

Failures become the engine's errors, so a handler can let them propagate:

| what happened                                   | raised                | retry                          |
| ----------------------------------------------- | --------------------- | ------------------------------ |
| 429                                             | `ProviderThrottled`   | after `Retry-After`, not counted |
| 5xx, 408/409, timeouts, connection errors, a stream that breaks | `ProviderUnavailable` | with backoff (or `Retry-After`) |
| 400/401/403/404 and other 4xx                   | `ProviderRejected`    | never: dead-letter queue       |

Each carries `partial_text`: what a stream had delivered before it broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import math
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from jobs.engine.http import parse_retry_after
from jobs.errors import PermanentError, RetryableError
from jobs.llm.providers import Provider
from jobs.llm.transport import Transport

DEFAULT_RETRY_AFTER = 1.0
# A provider's error body can be a whole HTML page; keep what fits in a job's error.
_MAX_MESSAGE = 500

OnDelta = Callable[[str], Awaitable[None] | None]


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_seconds: float
    model: str
    # The text was cut short (finish_reason "length", "content_filter", …), not finished.
    partial: bool = False
    # The provider sent no `usage`: the counts are estimates (about 4 characters a token).
    usage_estimated: bool = False
    time_to_first_token: float | None = None
    provider: str = ""
    simulated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# --- errors -----------------------------------------------------------------


class ProviderThrottled(RetryableError):
    """429: wait `retry_after` seconds; the attempt does not count."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = DEFAULT_RETRY_AFTER,
        provider: str = "",
        status_code: int | None = 429,
        partial_text: str = "",
    ) -> None:
        super().__init__(message, retry_after=retry_after, count_attempt=False)
        self.provider = provider
        self.status_code = status_code
        self.partial_text = partial_text


class ProviderUnavailable(RetryableError):
    """5xx, a timeout, a connection error or a broken stream: retry with backoff."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        provider: str = "",
        status_code: int | None = None,
        partial_text: str = "",
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.provider = provider
        self.status_code = status_code
        self.partial_text = partial_text


class ProviderRejected(PermanentError):
    """The provider refused the request (400/401/403/404…): retrying cannot help."""

    def __init__(self, message: str, *, provider: str = "", status_code: int | None = None, partial_text: str = ""):
        super().__init__(message)
        self.provider = provider
        self.status_code = status_code
        self.partial_text = partial_text


ProviderError = ProviderThrottled | ProviderUnavailable | ProviderRejected

# 4xx answers that say "try again later" rather than "this request is wrong".
_TRANSIENT_4XX = {408, 409, 425}


# --- shared connections -----------------------------------------------------

# httpcore's pool does work quadratic in its connection count on every request
# (encode/httpcore#1035): one client holding hundreds of connections spends
# more CPU on bookkeeping than on HTTP. A provider's connections are therefore spread over
# clients of at most this many, each call going to the least busy one.
_CONNECTIONS_PER_CLIENT = 16


class _Pool:
    """One provider's clients on one event loop."""

    def __init__(self, provider: Provider) -> None:
        count = math.ceil(provider.max_concurrency / _CONNECTIONS_PER_CLIENT)
        size = math.ceil(provider.max_concurrency / count)
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=30)
        # A plain-http provider (the simulated one, a local vLLM or Ollama) never
        # speaks TLS: it skips loading the CA bundle, which is slow.
        ssl_context = _ssl_context() if provider.base_url.startswith("https://") else None
        self.clients = [
            httpx.AsyncClient(
                transport=Transport(ssl_context=ssl_context, limits=limits), headers={"User-Agent": "conveyor"}
            )
            for _ in range(count)
        ]
        self.busy = [0] * count

    def least_busy(self) -> int:
        return min(range(len(self.clients)), key=self.busy.__getitem__)

    @contextlib.contextmanager
    def lease(self) -> Iterator[httpx.AsyncClient]:
        # With at most max_concurrency calls in flight, the least busy client always
        # has a free connection: no call queues behind another client's.
        index = self.least_busy()
        self.busy[index] += 1
        try:
            yield self.clients[index]
        finally:
            self.busy[index] -= 1

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Provider, _Pool]] = weakref.WeakKeyDictionary()


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Loading the CA bundle is slow: once per process, not per client.
    return httpx.create_ssl_context()


def _pool_for(provider: Provider) -> _Pool:
    """The running loop's pool for `provider`; httpx clients belong to the loop they
    first ran on, so each loop (a worker's lane, a test's `asyncio.run`) has its own."""
    per_loop = _pools.setdefault(asyncio.get_running_loop(), {})
    pool = per_loop.get(provider)
    if pool is None or any(client.is_closed for client in pool.clients):
        pool = per_loop[provider] = _Pool(provider)
    return pool


def client_for(provider: Provider) -> httpx.AsyncClient:
    """A client of the running loop's shared pool for `provider` (the least busy one)."""
    pool = _pool_for(provider)
    return pool.clients[pool.least_busy()]


async def aclose_clients() -> None:
    """Close the running loop's clients (call before the loop ends)."""
    for pool in _pools.pop(asyncio.get_running_loop(), {}).values():
        await pool.aclose()


# --- the call ---------------------------------------------------------------


async def chat(
    provider: Provider,
    *,
    messages: list[dict[str, Any]],
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    stream: bool = True,
    on_delta: OnDelta | None = None,
    client: httpx.AsyncClient | None = None,
) -> ChatResult:
    """One Chat Completions call; `on_delta(text)` sees each piece of a streamed answer.

    Raises ProviderThrottled, ProviderUnavailable or ProviderRejected (see the module
    docstring). Whatever `on_delta` raises (a cancellation, a lost lease) propagates as is.
    """
    model = model or provider.default_model
    if not model:
        raise ProviderRejected(f"{provider.name}: no model given and the provider has no default_model")
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    headers = {"Accept": "text/event-stream" if stream else "application/json"}
    if provider.api_key:
        headers["Authorization"] = f"Bearer {provider.api_key}"
    timeout = httpx.Timeout(
        connect=provider.connect_timeout,
        read=provider.read_timeout,
        write=provider.read_timeout,
        pool=provider.total_timeout,
    )

    call = _Call(provider, model, on_delta)
    response = None
    try:
        async with asyncio.timeout(provider.total_timeout) as deadline, _client(provider, client) as http:
            async with http.stream(
                "POST", f"{provider.base_url}/chat/completions", json=body, headers=headers, timeout=timeout
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise _status_error(provider, response)
                # A server that ignores "stream" answers with one JSON document.
                if stream and not response.headers.get("content-type", "").startswith("application/json"):
                    await call.read_stream(response)
                else:
                    await call.read_whole(response)
    except TimeoutError:
        if not deadline.expired():
            raise
        raise call.unavailable(f"no complete answer within the total timeout of {provider.total_timeout:g} s") from None
    except httpx.TimeoutException as exc:
        raise call.unavailable(_timeout_message(provider, exc)) from exc
    except httpx.RequestError as exc:
        raise call.unavailable(f"connection error: {exc.__class__.__name__}: {exc}") from exc
    finally:
        if response is not None:
            _forget_stream(response)
    return call.result(messages)


_DONE = httpx.ByteStream(b"")


def _forget_stream(response: httpx.Response) -> None:
    """Break the reference cycle httpx leaves between a response and its
    stream (the stream keeps its response), once the response is closed.

    Without it every call left about sixteen objects (the response, its
    headers, its request, the pool's stream wrappers) for the cyclic garbage
    collector, which a lane runs seldom (`jobs.worker.lane.GC_THRESHOLD`):
    they would wait for it. Now they are freed as soon as the call returns."""
    response.stream = _DONE


@contextlib.asynccontextmanager
async def _client(provider: Provider, client: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    if client is not None:
        yield client
        return
    with _pool_for(provider).lease() as pooled:
        yield pooled


class _Call:
    """What one call has received so far."""

    def __init__(self, provider: Provider, model: str, on_delta: OnDelta | None) -> None:
        self.provider = provider
        self.model = model
        self.on_delta = on_delta
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def unavailable(self, reason: str, *, status_code: int | None = None) -> ProviderUnavailable:
        received = f" after {len(self.text)} characters of output" if self.parts else ""
        return ProviderUnavailable(
            f"{self.provider.name}: {reason}{received}",
            provider=self.provider.name,
            status_code=status_code,
            partial_text=self.text,
        )

    async def read_whole(self, response: httpx.Response) -> None:
        try:
            data = json.loads(await response.aread())
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise self.unavailable("the answer is not a chat completion", status_code=200) from None
        self.model = data.get("model") or self.model
        self.finish_reason = choice.get("finish_reason")
        self.usage = data.get("usage")
        if text:
            self.first_token_at = time.monotonic()
            self.parts.append(text)

    async def read_stream(self, response: httpx.Response) -> None:
        """Read server-sent events until `[DONE]`; an end before it is a broken stream."""
        async for data in _sse_data(response.aiter_lines()):
            if data.strip() == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise self.unavailable(f"the stream sent a chunk that is not JSON: {data[:100]!r}") from None
            if not isinstance(chunk, dict):
                raise self.unavailable(f"the stream sent a chunk that is not an object: {data[:100]!r}")
            if "error" in chunk:
                raise self.unavailable(f"the stream reported an error: {_error_message(chunk) or data[:200]}")
            await self._take(chunk)
        # Some servers end without `[DONE]`; an answer with its finish reason is still whole.
        if self.finish_reason is None:
            raise self.unavailable("the stream ended before the answer was complete")

    async def _take(self, chunk: dict[str, Any]) -> None:
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            text = (choice.get("delta") or {}).get("content")
            if text:
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                self.parts.append(text)
                if self.on_delta is not None:
                    outcome = self.on_delta(text)
                    if inspect.isawaitable(outcome):
                        await outcome
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def result(self, messages: list[dict[str, Any]]) -> ChatResult:
        text = self.text
        usage = self.usage or {}
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        estimated = not isinstance(prompt_tokens, int) or not isinstance(completion_tokens, int)
        if estimated:
            prompt_tokens = estimate_tokens(_message_texts(messages))
            completion_tokens = estimate_tokens([text])
        return ChatResult(
            text=text,
            finish_reason=self.finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_seconds=time.monotonic() - self.started,
            model=self.model,
            partial=self.finish_reason not in ("stop", "tool_calls"),
            usage_estimated=estimated,
            time_to_first_token=None if self.first_token_at is None else self.first_token_at - self.started,
            provider=self.provider.name,
            simulated=self.provider.simulated,
        )


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event (multi-line data joined; comments skipped)."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        # Other fields (event:, id:, retry:) and ":" keepalive comments carry nothing for us.
    if data:
        yield "\n".join(data)


# --- helpers ----------------------------------------------------------------


def estimate_tokens(texts: Iterable[str]) -> int:
    """About four characters a token, as OpenAI's rule of thumb has it."""
    return sum((len(text) + 3) // 4 for text in texts)


def _message_texts(messages: list[dict[str, Any]]) -> list[str]:
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
            texts.extend(part.get("text", "") for part in content if isinstance(part, dict))
    return texts


def _status_error(provider: Provider, response: httpx.Response) -> ProviderError:
    status = response.status_code
    message = f"{provider.name}: HTTP {status}: {_error_message_of(response)}"
    if status == 429:
        retry_after = parse_retry_after(response.headers)
        return ProviderThrottled(
            message,
            retry_after=DEFAULT_RETRY_AFTER if retry_after is None else retry_after,
            provider=provider.name,
            status_code=status,
        )
    if status >= 500 or status in _TRANSIENT_4XX:
        return ProviderUnavailable(
            message, retry_after=parse_retry_after(response.headers), provider=provider.name, status_code=status
        )
    # 400/401/403/404/413/422…, and redirects (a wrong base_url): the request itself is wrong.
    return ProviderRejected(message, provider=provider.name, status_code=status)


def _error_message_of(response: httpx.Response) -> str:
    text = response.text
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = None
    message = message or text.strip() or response.reason_phrase
    return message[:_MAX_MESSAGE]


def _error_message(body: Any) -> str | None:
    """The message of an OpenAI-style error body, or of the shapes other servers use."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str) and error:  # Ollama: {"error": "model 'x' not found"}
        return error
    for key in ("message", "detail"):  # FastAPI-based servers: {"detail": ...}
        if body.get(key):
            return str(body[key])
    return None


def _timeout_message(provider: Provider, exc: httpx.TimeoutException) -> str:
    if isinstance(exc, httpx.ConnectTimeout):
        return f"connect timeout (no connection within {provider.connect_timeout:g} s)"
    if isinstance(exc, httpx.ReadTimeout):
        return f"read timeout (nothing received for {provider.read_timeout:g} s)"
    if isinstance(exc, httpx.WriteTimeout):
        return f"write timeout (the request not sent within {provider.read_timeout:g} s)"
    if isinstance(exc, httpx.PoolTimeout):
        return f"no free connection within {provider.total_timeout:g} s"
    return f"timeout: {exc.__class__.__name__}"
