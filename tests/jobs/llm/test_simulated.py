"""The simulated provider's HTTP surface, with a plain HTTP client."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import ARTIFACTS, Processes
from tests.jobs.llm.conftest import API_KEY, NO_DATABASE, start_daphne

pytestmark = pytest.mark.processes

AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"model": "simulated", "messages": [{"role": "user", "content": "Explain durable job queues"}]}


def post(base: str, body: object = BODY, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}/simulated/v1/chat/completions", content=content, headers={**AUTH, **headers}, timeout=10)


def sse_chunks(response: httpx.Response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]


def test_a_completion_is_openai_shaped_and_marked_simulated(daphne):
    response = post(daphne)

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["system_fingerprint"] == "conveyor-simulated"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == len(body["choices"][0]["message"]["content"].split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_stream_is_server_sent_events_ending_in_done(daphne):
    response = post(daphne, {**BODY, "stream": True, "stream_options": {"include_usage": True}})

    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = sse_chunks(response)
    assert chunks[-1] == "[DONE]"
    events = [json.loads(chunk) for chunk in chunks[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(
        e["object"] == "chat.completion.chunk" and e["system_fingerprint"] == "conveyor-simulated" for e in events
    )
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] > 0
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert streamed == post(daphne).json()["choices"][0]["message"]["content"]


def test_without_include_usage_a_stream_sends_no_usage(daphne):
    events = [json.loads(chunk) for chunk in sse_chunks(post(daphne, {**BODY, "stream": True}))[:-1]]
    assert not any("usage" in event for event in events)


def test_the_answer_uses_the_prompts_words(daphne):
    text = post(daphne).json()["choices"][0]["message"]["content"].lower()
    assert any(word in text for word in ("explain", "durable", "queues"))


def test_latency_header_sets_the_whole_answers_time(daphne):
    for body in (BODY, {**BODY, "stream": True}):
        started = time.monotonic()
        response = post(daphne, body, **{"X-Sim-Latency-Ms": "700"})
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        assert 0.65 < elapsed < 2.0, elapsed


def test_time_to_first_token_and_tokens_per_second_set_the_pace(daphne):
    started = time.monotonic()
    response = post(daphne, {**BODY, "max_tokens": 10}, **{"X-Sim-Ttft-Ms": "300", "X-Sim-Tps": "20"})
    elapsed = time.monotonic() - started
    assert response.json()["usage"]["completion_tokens"] == 10
    assert 0.3 + 9 / 20 - 0.05 < elapsed < 2.5, elapsed


def test_fail_header_forces_a_429_with_retry_after(daphne):
    response = post(daphne, **{"X-Sim-Fail": "429", "X-Sim-Retry-After": "4"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "4"
    assert response.json()["error"]["type"] == "rate_limit_exceeded"


@pytest.mark.parametrize("status", [400, 500, 503])
def test_fail_header_forces_an_error_status(daphne, status):
    response = post(daphne, **{"X-Sim-Fail": str(status)})
    assert response.status_code == status
    assert response.json()["error"]["message"].startswith("simulated failure")


def test_headers_win_over_model_options(daphne):
    response = post(daphne, {**BODY, "model": "simulated@fail=500"}, **{"X-Sim-Fail": "429"})
    assert response.status_code == 429


def test_a_share_of_one_always_fails(daphne):
    assert post(daphne, {**BODY, "model": "simulated@rate_500=1"}).status_code == 500
    assert post(daphne, {**BODY, "model": "simulated@rate_500=0"}).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the request body is not valid JSON"),
        ({"model": "simulated"}, "'messages' must be a non-empty list"),
        ({"messages": BODY["messages"]}, "you must provide a model parameter"),
        ({**BODY, "messages": ["hi"]}, "messages[0] must be an object with a 'role'"),
        ({**BODY, "max_tokens": 0}, "'max_tokens' must be an integer of at least 1"),
        ({**BODY, "model": "simulated@speed=9"}, "unknown simulation option 'speed'"),
        ({**BODY, "model": "simulated@rate_429=2"}, "simulation option rate_429='2': expected a share between 0 and 1"),
    ],
)
def test_a_bad_request_gets_an_openai_style_400(daphne, body, message):
    response = post(daphne, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


def test_a_key_is_required_when_configured(daphne):
    response = httpx.post(f"{daphne}/simulated/v1/chat/completions", json=BODY)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_it_lists_its_model(daphne):
    response = httpx.get(f"{daphne}/simulated/v1/models", headers=AUTH)
    assert response.json()["data"][0]["id"] == "simulated"
    assert httpx.get(f"{daphne}/simulated/v1/chat/completions", headers=AUTH).status_code == 405


def test_the_bare_asgi_app_answers_like_the_django_views(daphne):
    """`simulated.asgi_app` (for mounting ahead of Django's middleware) gives the same answers."""
    procs = Processes(ARTIFACTS / "logs" / "llm-asgi")
    try:
        bare = start_daphne(
            procs,
            "config.simulator.simulated:asgi_app",
            DATABASE_URL=NO_DATABASE,
            CONVEYOR_SIM_TTFT_MS="20",
            CONVEYOR_SIM_TPS="2000",
            CONVEYOR_SIM_REQUIRE_KEY="",
            CONVEYOR_SIMULATOR_CONTROLS="1",
        )
        assert post(bare).json()["choices"] == post(daphne).json()["choices"]
        streamed = sse_chunks(post(bare, {**BODY, "stream": True}))
        assert streamed[-1] == "[DONE]"
        throttled = post(bare, **{"X-Sim-Fail": "429"})
        assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "1")
        assert post(bare, b"nope").json()["error"]["message"] == "the request body is not valid JSON"
        assert httpx.get(f"{bare}/simulated/v1/nowhere").status_code == 404
    finally:
        procs.stop_all()


# --- controls and failure injection: development and tests only ---------------------


def _in_process(method: str, path: str, **headers: str) -> httpx.Response:
    """One request to the bare ASGI app, in this process (settings as overridden)."""
    import asyncio

    from config.simulator import simulated

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=simulated.asgi_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            body = json.dumps({**BODY, "max_tokens": 3}).encode() if method == "POST" else None
            return await client.request(method, path, content=body, headers=headers, timeout=10)

    return asyncio.run(call())


def _controls_work() -> dict[str, bool]:
    failed = _in_process("POST", "/simulated/v1/chat/completions", **{"X-Sim-Fail": "429"})
    assert failed.status_code in (200, 429), failed.text
    return {
        "load": _in_process("GET", "/simulated/v1/load").status_code == 200,
        "reset": _in_process("DELETE", "/simulated/v1/load").status_code == 200,
        "injection": failed.status_code == 429,
    }


ON = {"load": True, "reset": True, "injection": True}
OFF = {"load": False, "reset": False, "injection": False}


@pytest.fixture
def sim_env(monkeypatch):
    for name in (
        "CONVEYOR_SIM_REQUIRE_KEY",
        "CONVEYOR_SIM_FAIL",
        "CONVEYOR_LLM_PROVIDERS",
        "CONVEYOR_SIMULATOR_CONTROLS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONVEYOR_SIM_TTFT_MS", "0")
    monkeypatch.setenv("CONVEYOR_SIM_TPS", "10000")
    return monkeypatch


def test_with_debug_off_the_controls_answer_404_and_injection_headers_are_ignored(sim_env, settings):
    settings.DEBUG = False
    settings.CONVEYOR_SIMULATOR_CONTROLS = None
    assert _controls_work() == OFF
    assert _in_process("GET", "/simulated/v1/load").json()["error"]["code"] == "unknown_url"


def test_with_debug_on_the_controls_work_while_the_simulator_is_a_configured_provider(sim_env, settings):
    settings.DEBUG = True
    settings.CONVEYOR_SIMULATOR_CONTROLS = None
    assert _controls_work() == ON
    real = [{"name": "openai", "base_url": "https://api.openai.com/v1", "default_model": "gpt-4o-mini"}]
    sim_env.setenv("CONVEYOR_LLM_PROVIDERS", json.dumps(real))
    assert _controls_work() == OFF


def test_an_explicit_setting_turns_the_controls_on_or_off(sim_env, settings):
    settings.DEBUG = False
    settings.CONVEYOR_SIMULATOR_CONTROLS = True
    assert _controls_work() == ON
    settings.DEBUG = True
    settings.CONVEYOR_SIMULATOR_CONTROLS = False
    assert _controls_work() == OFF


def test_load_counts_every_call_beyond_the_10_000_start_times_it_keeps():
    from config.simulator.simulated import Load

    load = Load()
    for _ in range(10_003):
        with load.call():
            pass
    snapshot = load.snapshot()
    assert (snapshot["requests"], snapshot["total"], snapshot["in_flight"]) == (10_000, 10_003, 0)
    load.reset()
    assert load.snapshot()["total"] == 0
