"""The simulated provider: an OpenAI-compatible Chat Completions endpoint this project serves
itself (`/simulated/v1/chat/completions`, `/simulated/v1/models`), the default provider of
`make run`, the tests and the benchmark.

The text is deterministic: seeded from a hash of the messages and the model name, built from
a fixed word list and the longer words of the last user message; one word is one token.
`temperature` is accepted and ignored. Every answer says `"system_fingerprint":
"conveyor-simulated"`.

Its behaviour comes from, in increasing precedence:

1. the environment — `CONVEYOR_SIM_TTFT_MS` (200), `CONVEYOR_SIM_TPS` (50),
   `CONVEYOR_SIM_LATENCY_MS` (unset), `CONVEYOR_SIM_CHUNK_MS` (100),
   `CONVEYOR_SIM_RATE_429`, `CONVEYOR_SIM_RATE_500`, `CONVEYOR_SIM_RATE_HANG` (shares 0–1,
   default 0), `CONVEYOR_SIM_RETRY_AFTER` (1), `CONVEYOR_SIM_REQUIRE_KEY` (0);
2. options in the model name: `"simulated@latency_ms=1000,rate_429=0.1"`;
3. request headers: `X-Sim-Latency-Ms: 1000`, `X-Sim-Fail: 429`, `X-Sim-Ttft-Ms: 50`, …
   (only where its controls are on: see `controls_enabled`).

Options: `ttft_ms` (time to first token), `tps` (tokens per second), `latency_ms` (the whole
answer takes this long: the first token after min(ttft, latency), the rest spread evenly),
`chunk_ms` (a stream sends at most one chunk per this interval, so 400 streams stay cheap),
`rate_429` / `rate_500` / `rate_hang` (random shares), `retry_after` (the 429's header value),
and `fail`, which forces one behaviour: an HTTP status (`429`, `500`, `400`, `401`, …),
`hang` (no answer for 120 s), `stall` (a stream stops after half its tokens and hangs) or
`break` (a stream ends after half its tokens, without finish reason or `[DONE]`).

Nothing here touches the database, and waiting is `asyncio.sleep`: one Daphne process holds
hundreds of concurrent streams. A client that disconnects cancels its view.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from config.env import env_bool

log = logging.getLogger(__name__)

MODEL = "simulated"
FINGERPRINT = "conveyor-simulated"
HANG_SECONDS = 120.0

_WORDS = (
    "the a of and to in for with on that this it from by as is are was be can will more most "
    "system data job queue worker page content model answer result value process time request "
    "service network server client stream token provider batch retry failure success progress "
    "simple clear fast steady durable reliable careful useful modern small large quick patient "
    "build write read send keep run check measure show explain compare improve guide choose "
    "every each many few other new old first last next better best practical common quiet "
    "people team product market search guide review price quality option feature garden city"
).split()


class _BadRequest(Exception):
    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class Behaviour:
    ttft_ms: float = 200
    tps: float = 50
    latency_ms: float | None = None
    chunk_ms: float = 100
    rate_429: float = 0
    rate_500: float = 0
    rate_hang: float = 0
    retry_after: str = "1"
    fail: str | None = None

    def failure(self) -> str | None:
        """The forced failure, or one drawn from the configured shares."""
        if self.fail:
            return self.fail
        roll = random.random()
        for outcome, share in (("429", self.rate_429), ("500", self.rate_500), ("hang", self.rate_hang)):
            if roll < share:
                return outcome
            roll -= share
        return None

    def schedule(self, count: int) -> list[float]:
        """When each of `count` tokens is due, in seconds after the request."""
        if self.latency_ms is None:
            first, gap = self.ttft_ms / 1000, 1 / self.tps
        else:
            first = min(self.ttft_ms, self.latency_ms) / 1000
            gap = (self.latency_ms / 1000 - first) / max(count - 1, 1)
        return [first + i * gap for i in range(count)]


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("a number") from None
    if not math.isfinite(number):
        raise ValueError("a finite number")
    return number


def _rate(value: str) -> float:
    share = _number(value)
    if not 0 <= share <= 1:
        raise ValueError("a share between 0 and 1")
    return share


def _positive(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError("a number above 0")
    return number


def _non_negative(value: str) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError("a number of 0 or more")
    return number


def _fail(value: str) -> str:
    value = value.strip().lower()
    if value in ("hang", "stall", "break") or (value.isdigit() and 400 <= int(value) <= 599):
        return value
    raise ValueError("an HTTP status 400-599, hang, stall or break")


_OPTIONS = {
    "ttft_ms": _non_negative,
    "tps": _positive,
    "latency_ms": _non_negative,
    "chunk_ms": _non_negative,
    "rate_429": _rate,
    "rate_500": _rate,
    "rate_hang": _rate,
    "retry_after": str,
    "fail": _fail,
}


def _env_defaults() -> Behaviour:
    """The environment's behaviour, read per request (tests and benchmarks change it)."""
    values: dict[str, Any] = {}
    for key, parse in _OPTIONS.items():
        name = f"CONVEYOR_SIM_{key.upper()}"
        raw = os.environ.get(name, "").strip()
        if raw:
            try:
                values[key] = parse(raw)
            except ValueError as exc:
                raise ImproperlyConfigured(f"{name}={raw!r}: expected {exc}") from None
    return Behaviour(**values)


def controls_enabled() -> bool:
    """Whether the `X-Sim-*` headers and `/load` work. They let any caller make
    the provider fail or hang, so: CONVEYOR_SIMULATOR_CONTROLS when set, else
    only with DEBUG on while the simulator is a configured provider. The bare
    app without Django (`config/simulator/asgi.py`, benchmarks) has no DEBUG:
    there they are off unless the variable turns them on."""
    if not settings.configured:
        return env_bool("CONVEYOR_SIMULATOR_CONTROLS", False)
    explicit = getattr(settings, "CONVEYOR_SIMULATOR_CONTROLS", None)
    if explicit is not None:
        return explicit
    if not settings.DEBUG:
        return False
    from jobs.llm.providers import all_providers

    try:
        return any(provider.simulated for provider in all_providers())
    except ImproperlyConfigured:
        return False


def _behaviour(headers: dict[str, str], options: dict[str, str]) -> Behaviour:
    """Environment, then model-name options, then `X-Sim-*` headers (when its controls are on)."""
    given = dict(options)
    injected = {header[6:].replace("-", "_"): value for header, value in headers.items() if header.startswith("x-sim-")}
    if injected and controls_enabled():
        given.update(injected)
    values: dict[str, Any] = {}
    for key, raw in given.items():
        parse = _OPTIONS.get(key)
        if parse is None:
            raise _BadRequest(f"unknown simulation option {key!r}; known: {', '.join(_OPTIONS)}", param="model")
        try:
            values[key] = parse(raw)
        except ValueError as exc:
            raise _BadRequest(f"simulation option {key}={raw!r}: expected {exc}", param="model") from None
    return replace(_env_defaults(), **values)


# --- entry points -------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes | AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


async def _chat(headers: dict[str, str], raw: bytes) -> _Reply:
    """Answer one Chat Completions request; `headers` has lower-case names."""
    if denied := _check_key(headers):
        return denied
    try:
        body = _parse_body(raw)
        model, options = _split_model(body["model"])
        behaviour = _behaviour(headers, options)
    except _BadRequest as exc:
        return _error(400, exc.message, param=exc.param)

    failure = behaviour.failure()
    if failure == "hang":
        await asyncio.sleep(HANG_SECONDS)
        return _error(504, "simulated hang ended", type_="server_error")
    if failure and failure.isdigit():
        return _failure(int(failure), model, behaviour)

    answer = _Answer(body, model)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return _Reply(
            200,
            _stream(answer, behaviour, failure, include_usage),
            {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            content_type="text/event-stream",
        )
    times = behaviour.schedule(len(answer.tokens))
    await asyncio.sleep(times[-1])
    return _json(200, answer.completion())


async def _models(headers: dict[str, str]) -> _Reply:
    if denied := _check_key(headers):
        return denied
    return _json(
        200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "conveyor"}]}
    )


def _django(reply: _Reply) -> HttpResponse:
    if isinstance(reply.body, bytes):
        response = HttpResponse(reply.body, status=reply.status, content_type=reply.content_type)
    else:
        response = StreamingHttpResponse(reply.body, status=reply.status, content_type=reply.content_type)
    for name, value in reply.headers.items():
        response[name] = value
    return response


@csrf_exempt
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponse:
    headers = {name.lower(): value for name, value in request.headers.items()}
    return _django(await _chat(headers, request.body))


@require_GET
async def models(request: HttpRequest) -> HttpResponse:
    return _django(await _models({name.lower(): value for name, value in request.headers.items()}))


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The same endpoint as a bare ASGI app, without Django's middleware.

    Under Django every request passes the project's sync middleware (a dozen thread hops);
    mounted in config/asgi.py ahead of Django (`re_path(r"^simulated/v1/", simulated.asgi_app)`)
    a call costs a fraction of that CPU, which matters when a benchmark runs hundreds of calls
    on the same two cores as the workers.
    """
    if scope["type"] != "http":
        return
    path, method = scope["path"].rstrip("/"), scope["method"]
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    raw = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        raw += message.get("body", b"")
        if not message.get("more_body"):
            break

    started = False

    async def tracked_send(message: dict[str, Any]) -> None:
        nonlocal started
        started = True
        await send(message)

    async def respond() -> None:
        try:
            if path.endswith("/chat/completions") and method == "POST":
                with load.call():
                    await _send(await _chat(headers, raw), tracked_send)
                return
            if path.endswith("/chat/completions"):
                reply = _error(405, "use POST")
            elif path.endswith("/load") and controls_enabled():
                if method == "DELETE":
                    load.reset()
                reply = _json(200, load.snapshot())
            elif path.endswith("/models"):
                reply = await _models(headers) if method == "GET" else _error(405, "use GET")
            else:
                reply = _error(404, f"no route {scope['path']!r}", code="unknown_url")
            await _send(reply, tracked_send)
        except Exception:
            # Not re-raised: Daphne answers an app's exception with a 500 page, which fails
            # (and stops its housekeeping loop) once the response has started.
            log.exception("simulated provider failed")
            if not started:
                await _send(_error(500, "simulated provider failed", type_="server_error"), send)

    # A client that goes away cancels its answer, as Django's handler does.
    responding = asyncio.ensure_future(respond())
    listening = asyncio.ensure_future(_disconnected(receive))
    await asyncio.wait((responding, listening), return_when=asyncio.FIRST_COMPLETED)
    listening.cancel()
    responding.cancel()
    await asyncio.gather(responding, listening, return_exceptions=True)


class Load:
    """What this process is answering: calls in flight, their peak, how many
    started in all (`total`) and when each started (the last 10,000), so tests
    and benchmarks can check the limits a client claims to keep and count calls.
    `GET /simulated/v1/load` reads it (bare ASGI app only); `DELETE` resets it."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.in_flight = getattr(self, "in_flight", 0)
        self.peak = self.in_flight
        self.total = 0
        self.started: deque[float] = deque(maxlen=10_000)

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.total += 1
        self.started.append(time.time())
        try:
            yield
        finally:
            self.in_flight -= 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "peak": self.peak,
            "requests": len(self.started),
            "total": self.total,
            "started": list(self.started),
        }


load = Load()


async def _disconnected(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(reply: _Reply, send: Any) -> None:
    headers = [(b"content-type", reply.content_type.encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in reply.headers.items()]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    if isinstance(reply.body, bytes):
        await send({"type": "http.response.body", "body": reply.body})
        return
    async for chunk in reply.body:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


# --- the answer -------------------------------------------------------------


class _Answer:
    """The deterministic completion for one request."""

    def __init__(self, body: dict[str, Any], model: str) -> None:
        messages = body["messages"]
        self.model = model
        self.id = f"chatcmpl-sim-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        seed = hashlib.sha256(json.dumps([model, messages], sort_keys=True, default=str).encode()).digest()
        rng = random.Random(int.from_bytes(seed[:8], "big"))
        natural = rng.randint(24, 96)
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or natural
        self.tokens = _tokens(rng, min(natural, limit), _keywords(messages))
        self.finish_reason = "length" if limit < natural else "stop"
        self.prompt_tokens = sum(4 + (len(text) + 3) // 4 for text in _texts(messages))

    def usage(self, completion_tokens: int | None = None) -> dict[str, int]:
        completion = len(self.tokens) if completion_tokens is None else completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def completion(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.tokens)},
                    "finish_reason": self.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": self.usage(),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return _event(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
            }
        )


async def _stream(
    answer: _Answer, behaviour: Behaviour, failure: str | None, include_usage: bool
) -> AsyncIterator[bytes]:
    """The answer as server-sent events, each chunk holding the tokens due by its time.

    1. The role chunk goes at once (headers and first bytes arrive quickly, as with OpenAI).
    2. Tokens go as they fall due, at most one chunk per `chunk_ms`.
    3. Then the finish reason, the usage if asked for, and `[DONE]`.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    yield answer.chunk({"role": "assistant", "content": ""})

    tokens = answer.tokens
    times = behaviour.schedule(len(tokens))
    stop_at = len(tokens) // 2 if failure in ("break", "stall") else len(tokens)
    sent, last_chunk = 0, None
    while sent < stop_at:
        due = started + times[sent]
        if last_chunk is not None:
            due = max(due, last_chunk + behaviour.chunk_ms / 1000)
        await asyncio.sleep(max(0.0, due - loop.time()))
        last_chunk = now = loop.time()
        upto = sent + 1
        while upto < stop_at and started + times[upto] <= now:
            upto += 1
        yield answer.chunk({"content": "".join(tokens[sent:upto])})
        sent = upto

    if failure == "stall":
        await asyncio.sleep(HANG_SECONDS)
        return
    if failure == "break":
        return  # as a proxy cutting the answer short would: no finish reason, no [DONE]
    yield answer.chunk({}, answer.finish_reason)
    if include_usage:
        yield _event(
            {
                "id": answer.id,
                "object": "chat.completion.chunk",
                "created": answer.created,
                "model": answer.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [],
                "usage": answer.usage(),
            }
        )
    yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _tokens(rng: random.Random, count: int, keywords: list[str]) -> list[str]:
    """`count` words in sentences of 6–14 words, a paragraph every few sentences."""
    tokens: list[str] = []
    sentence_left = 0
    sentences = 0
    while len(tokens) < count:
        if sentence_left == 0:
            sentence_left = rng.randint(6, 14)
            starts_sentence = True
        else:
            starts_sentence = False
        word = rng.choice(keywords) if keywords and rng.random() < 0.2 else rng.choice(_WORDS)
        sentence_left -= 1
        if starts_sentence:
            word = word.capitalize()
        if sentence_left == 0 or len(tokens) == count - 1:
            word += "."
        if not tokens:
            tokens.append(word)
        elif starts_sentence and sentences and sentences % 4 == 0:
            tokens.append("\n\n" + word)
        else:
            tokens.append(" " + word)
        if starts_sentence:
            sentences += 1
    return tokens


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    texts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return texts


def _keywords(messages: list[dict[str, Any]]) -> list[str]:
    """The longer words of the last user message, so answers read as being about the prompt."""
    for message in reversed(messages):
        if message.get("role") == "user":
            words = "".join(c if c.isalnum() else " " for c in " ".join(_texts([message]))).lower().split()
            return list(dict.fromkeys(w for w in words if len(w) >= 4 and not w.isdigit()))[:12]
    return []


# --- requests and errors -----------------------------------------------------


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _BadRequest("you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list", param="messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest(f"messages[{index}] must be an object with a 'role'", param=f"messages[{index}]")
        if not isinstance(message.get("content"), str | list | None):
            raise _BadRequest(f"messages[{index}].content must be a string or a list", param=f"messages[{index}]")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _BadRequest(f"'{key}' must be an integer of at least 1", param=key)
    return body


def _split_model(name: str) -> tuple[str, dict[str, str]]:
    """`"simulated@latency_ms=1000,fail=429"` → ("simulated", {"latency_ms": "1000", "fail": "429"})."""
    model, _, spec = name.partition("@")
    options = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, equals, value = item.partition("=")
        if not equals:
            raise _BadRequest(f"model option {item!r} is not key=value", param="model")
        options[key.strip().lower()] = value.strip()
    return model or MODEL, options


def _check_key(headers: dict[str, str]) -> _Reply | None:
    if not env_bool("CONVEYOR_SIM_REQUIRE_KEY", False):
        return None
    scheme, _, key = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return None
    return _error(
        401,
        "You didn't provide an API key: send 'Authorization: Bearer <key>' (CONVEYOR_SIM_REQUIRE_KEY is on).",
        code="invalid_api_key",
    )


_FAILURES = {
    400: ("invalid_request_error", "simulated failure: this request was refused"),
    401: ("invalid_request_error", "simulated failure: incorrect API key provided"),
    403: ("invalid_request_error", "simulated failure: you are not allowed to use this model"),
    404: ("invalid_request_error", "simulated failure: the model does not exist"),
    429: ("rate_limit_exceeded", "simulated failure: rate limit reached, retry later"),
}


def _failure(status: int, model: str, behaviour: Behaviour) -> _Reply:
    type_, message = _FAILURES.get(status, ("server_error", f"simulated failure: the server answered {status}"))
    reply = _error(status, f"{message} (model {model!r})", type_=type_)
    if status in (429, 503):
        reply.headers["Retry-After"] = behaviour.retry_after
    return reply


def _error(
    status: int,
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> _Reply:
    return _json(status, {"error": {"message": message, "type": type_, "param": param, "code": code}})


def _json(status: int, data: dict[str, Any]) -> _Reply:
    return _Reply(status, json.dumps(data).encode(), {})
