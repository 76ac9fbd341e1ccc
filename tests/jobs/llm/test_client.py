"""The Chat Completions client against the simulated provider, over real HTTP through Daphne."""

from __future__ import annotations

import asyncio
import gc
import time
from dataclasses import replace

import httpx
import pytest

from jobs.errors import PermanentError, RetryableError
from jobs.llm.client import (
    ProviderRejected,
    ProviderThrottled,
    ProviderUnavailable,
    chat,
    client_for,
    parse_retry_after,
)
from tests.jobs.llm.conftest import free_port, run

pytestmark = pytest.mark.processes

PROMPT = [
    {"role": "system", "content": "You write landing pages."},
    {"role": "user", "content": "Write about garden tools for small balconies"},
]


def test_it_streams_deltas_as_they_arrive(provider):
    deltas: list[tuple[float, str]] = []

    async def on_delta(text: str) -> None:
        deltas.append((time.monotonic(), text))

    result = run(chat(provider, messages=PROMPT, model="simulated@latency_ms=600,chunk_ms=50", on_delta=on_delta))

    assert len(deltas) >= 4
    assert deltas[-1][0] - deltas[0][0] > 0.3  # spread over the answer's time, not one burst at the end
    assert "".join(text for _, text in deltas) == result.text
    assert result.finish_reason == "stop"
    assert not result.partial
    assert result.completion_tokens == len(result.text.split())
    assert result.prompt_tokens > 0
    assert not result.usage_estimated  # the provider's own usage (stream_options.include_usage)
    assert result.model == "simulated"
    assert result.simulated
    assert 0.5 < result.latency_seconds < 5
    assert result.time_to_first_token is not None and result.time_to_first_token < result.latency_seconds


def test_a_plain_callback_also_receives_the_deltas(provider):
    deltas: list[str] = []
    result = run(chat(provider, messages=PROMPT, on_delta=deltas.append))
    assert deltas and "".join(deltas) == result.text


def test_it_answers_without_streaming(provider):
    deltas: list[str] = []
    result = run(chat(provider, messages=PROMPT, stream=False, on_delta=deltas.append))

    assert result.text and result.finish_reason == "stop"
    assert result.completion_tokens == len(result.text.split())
    assert not result.usage_estimated
    assert deltas == []


def test_the_same_prompt_gives_the_same_text_streamed_or_not(provider):
    async def three():
        return await asyncio.gather(
            chat(provider, messages=PROMPT),
            chat(provider, messages=PROMPT, stream=False),
            chat(provider, messages=PROMPT, model="simulated@tps=5000"),  # timing options keep the text
        )

    first, second, third = run(three())
    assert first.text == second.text == third.text
    other = run(chat(provider, messages=[{"role": "user", "content": "Something else entirely"}]))
    assert other.text != first.text


def test_max_tokens_cuts_the_answer_with_finish_reason_length(provider):
    for stream in (True, False):
        result = run(chat(provider, messages=PROMPT, max_tokens=5, stream=stream))
        assert result.completion_tokens == 5
        assert len(result.text.split()) == 5
        assert result.finish_reason == "length"
        assert result.partial


def test_429_is_throttling_with_the_providers_retry_after(provider):
    with pytest.raises(ProviderThrottled) as caught:
        run(chat(provider, messages=PROMPT, model="simulated@fail=429,retry_after=7"))

    error = caught.value
    assert isinstance(error, RetryableError)
    assert error.retry_after == 7
    assert error.count_attempt is False
    assert error.status_code == 429
    assert "rate limit reached" in str(error)


def test_429_without_retry_after_waits_a_second(provider):
    with pytest.raises(ProviderThrottled) as caught:
        run(chat(provider, messages=PROMPT, model="simulated@fail=429,retry_after="))
    assert caught.value.retry_after == 1.0


def test_500_is_unavailable_and_counts_the_attempt(provider):
    with pytest.raises(ProviderUnavailable) as caught:
        run(chat(provider, messages=PROMPT, model="simulated@fail=500", stream=False))

    assert isinstance(caught.value, RetryableError)
    assert caught.value.count_attempt is True
    assert caught.value.status_code == 500
    assert caught.value.retry_after is None  # the engine's backoff decides


def test_503_with_retry_after_passes_the_delay_on(provider):
    with pytest.raises(ProviderUnavailable) as caught:
        run(chat(provider, messages=PROMPT, model="simulated@fail=503,retry_after=3"))
    assert caught.value.retry_after == 3


def test_a_hang_ends_at_the_total_timeout(provider):
    hurried = replace(provider, read_timeout=30, total_timeout=0.8)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as caught:
        run(chat(hurried, messages=PROMPT, model="simulated@fail=hang"))

    assert 0.7 < time.monotonic() - started < 2.5
    assert "total timeout of 0.8 s" in str(caught.value)


def test_a_hang_ends_at_the_read_timeout(provider):
    hurried = replace(provider, read_timeout=0.5, total_timeout=30)
    started = time.monotonic()
    with pytest.raises(ProviderUnavailable) as caught:
        run(chat(hurried, messages=PROMPT, model="simulated@fail=hang", stream=False))

    assert time.monotonic() - started < 2.5
    assert "read timeout" in str(caught.value)


def test_400_is_permanent_with_the_providers_message(provider):
    with pytest.raises(ProviderRejected) as caught:
        run(chat(provider, messages=PROMPT, model="simulated@fail=400"))

    assert isinstance(caught.value, PermanentError)
    assert caught.value.status_code == 400
    assert "simulated failure: this request was refused" in str(caught.value)


def test_a_request_the_provider_finds_invalid_is_permanent(provider):
    with pytest.raises(ProviderRejected) as caught:
        run(chat(provider, messages=[]))
    assert "'messages' must be a non-empty list" in str(caught.value)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_other_refusals_are_permanent(provider, status):
    with pytest.raises(ProviderRejected) as caught:
        run(chat(provider, messages=PROMPT, model=f"simulated@fail={status}"))
    assert caught.value.status_code == status


def test_a_missing_api_key_is_refused_with_the_providers_message(provider):
    with pytest.raises(ProviderRejected) as caught:
        run(chat(replace(provider, api_key=None), messages=PROMPT))
    assert caught.value.status_code == 401
    assert "You didn't provide an API key" in str(caught.value)


def test_a_stream_that_ends_early_keeps_its_partial_text(provider):
    deltas: list[str] = []
    with pytest.raises(ProviderUnavailable) as caught:
        run(chat(provider, messages=PROMPT, model="simulated@fail=break", on_delta=deltas.append))

    whole = run(chat(provider, messages=PROMPT))
    partial = caught.value.partial_text
    assert partial and partial == "".join(deltas)
    assert whole.text.startswith(partial) and len(partial) < len(whole.text)
    assert "ended before the answer was complete" in str(caught.value)


def test_a_stream_that_stalls_keeps_its_partial_text(provider):
    hurried = replace(provider, read_timeout=0.5)
    with pytest.raises(ProviderUnavailable) as caught:
        run(chat(hurried, messages=PROMPT, model="simulated@fail=stall"))
    assert caught.value.partial_text
    assert "read timeout" in str(caught.value)


def test_a_connection_cut_mid_stream_keeps_its_partial_text(provider):
    """A server that dies mid-answer: the chunked body stops and the socket closes."""
    chunks = [
        'data: {"choices":[{"index":0,"delta":{"content":"Hello"}}]}\n\n',
        'data: {"choices":[{"index":0,"delta":{"content":" world"}}]}\n\n',
    ]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            data = chunk.encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # one chunk at a time, as a model streams
        writer.transport.abort()

    async def scenario():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await chat(replace(provider, base_url=f"http://127.0.0.1:{port}/v1"), messages=PROMPT)

    with pytest.raises(ProviderUnavailable) as caught:
        run(scenario())
    assert caught.value.partial_text == "Hello world"
    assert "connection error" in str(caught.value)


def test_a_refused_connection_is_unavailable(provider):
    nobody = replace(provider, base_url=f"http://127.0.0.1:{free_port()}/v1")
    with pytest.raises(ProviderUnavailable) as caught:
        run(chat(nobody, messages=PROMPT))
    assert caught.value.partial_text == ""
    assert "ConnectError" in str(caught.value)


def test_usage_is_estimated_when_the_provider_sends_none(provider):
    """A server without `usage` (older llama.cpp, some gateways): counts from the text, flagged."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = {"choices": [{"index": 0, "message": {"content": "four words of text"}, "finish_reason": "stop"}]}
        return httpx.Response(200, json=body)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await chat(provider, messages=PROMPT, stream=False, client=client)

    result = run(scenario())
    assert result.usage_estimated
    assert result.completion_tokens == 5  # 18 characters, about 4 a token
    assert result.prompt_tokens > 0


def test_an_exception_from_on_delta_propagates_unchanged(provider):
    class Stop(Exception):
        pass

    def on_delta(text: str) -> None:
        raise Stop

    with pytest.raises(Stop):
        run(chat(provider, messages=PROMPT, on_delta=on_delta))


def test_a_call_leaves_nothing_for_the_cyclic_collector(provider):
    # httpx leaves a response and its stream pointing at each other; chat
    # breaks that once the response is closed, so a lane's calls are freed as
    # they return, not by the collector's passes (bench/README.md, "The
    # cyclic garbage collector in the lane").
    # (A connection the server closes leaves asyncio's transport behind: that
    # is per connection, not per call, and not counted here.)
    async def calls() -> list[str]:
        await chat(provider, messages=PROMPT, stream=False)  # the pool and its connection
        await chat(provider, messages=PROMPT)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                await chat(provider, messages=PROMPT, stream=False)
                await chat(provider, messages=PROMPT)
            gc.collect()
            return [
                f"{type(o).__module__}.{type(o).__qualname__}"
                for o in gc.garbage
                if type(o).__module__.split(".")[0] in ("httpx", "httpcore", "h11", "jobs")
            ]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()

    assert run(calls()) == []


def test_one_pool_per_event_loop(provider):
    async def clients():
        return client_for(provider), client_for(provider)

    first, again = run(clients())
    assert first is again
    other, _ = run(clients())
    assert other is not first
    assert first.is_closed  # closed with its loop's pool


def test_it_holds_hundreds_of_concurrent_streams(provider):
    """400 one-second streams at once in one Daphne process: all answered, together."""
    wide = replace(provider, max_concurrency=400)

    async def many():
        return await asyncio.gather(
            *(
                chat(
                    wide,
                    messages=[{"role": "user", "content": f"page {i}"}],
                    model="simulated@latency_ms=1000,chunk_ms=250",
                )
                for i in range(400)
            )
        )

    started = time.monotonic()
    results = run(many())
    elapsed = time.monotonic() - started
    assert len(results) == 400 and all(r.finish_reason == "stop" for r in results)
    assert elapsed < 20, f"400 concurrent one-second calls took {elapsed:.1f} s"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "5"}, 5.0),
        ({"Retry-After": "2.5"}, 2.5),
        ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(headers, expected):
    assert parse_retry_after(httpx.Headers(headers)) == expected


def test_retry_after_as_a_future_http_date():
    from email.utils import formatdate

    seconds = parse_retry_after(httpx.Headers({"Retry-After": formatdate(time.time() + 30, usegmt=True)}))
    assert seconds is not None and 28 <= seconds <= 30
