"""Provider configuration from the environment."""

from __future__ import annotations

import json
import os

import pytest
from django.core.exceptions import ImproperlyConfigured

from jobs.errors import PermanentError
from jobs.llm.providers import UnknownProvider, all_providers, get_provider


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CONVEYOR_LLM_") or name == "PORT":
            monkeypatch.delenv(name)


def configure(monkeypatch, providers) -> None:
    monkeypatch.setenv("CONVEYOR_LLM_PROVIDERS", providers if isinstance(providers, str) else json.dumps(providers))


OPENAI = {"name": "openai", "base_url": "https://api.openai.com/v1/", "default_model": "gpt-4o-mini"}
LOCAL = {"name": "local-vllm", "base_url": "http://10.0.0.5:8000/v1", "max_concurrency": 64, "requests_per_minute": 600}


def test_without_configuration_the_one_provider_is_the_simulated_one():
    provider = get_provider()
    assert provider.name == "simulated"
    assert provider.base_url == "http://127.0.0.1:8000/simulated/v1"
    assert provider.simulated
    assert provider.max_concurrency == 200
    assert provider.requests_per_minute == 0
    assert provider.default_model == "simulated"
    assert all_providers() == [provider]
    assert get_provider("simulated") == provider


def test_the_simulated_provider_follows_port(monkeypatch):
    monkeypatch.setenv("PORT", "8123")
    assert get_provider().base_url == "http://127.0.0.1:8123/simulated/v1"


def test_providers_come_from_json_with_keys_from_the_environment(monkeypatch, tmp_path):
    configure(monkeypatch, [OPENAI, LOCAL, {"name": "simulated", "simulated": True}])
    monkeypatch.setenv("CONVEYOR_LLM_OPENAI_API_KEY", "sk-from-env")
    key_file = tmp_path / "vllm-key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("CONVEYOR_LLM_LOCAL_VLLM_API_KEY_FILE", str(key_file))

    assert [p.name for p in all_providers()] == ["openai", "local-vllm", "simulated"]
    openai = get_provider()  # the first is the default
    assert openai.name == "openai"
    assert openai.base_url == "https://api.openai.com/v1"
    assert openai.api_key == "sk-from-env"
    assert not openai.simulated
    local = get_provider("local-vllm")
    assert local.api_key == "from-file"
    assert (local.max_concurrency, local.requests_per_minute) == (64, 600)
    assert (local.connect_timeout, local.read_timeout, local.total_timeout) == (5.0, 120.0, 300.0)
    simulated = get_provider("simulated")
    assert simulated.simulated and simulated.base_url == "http://127.0.0.1:8000/simulated/v1"


def test_the_default_provider_can_be_named(monkeypatch):
    configure(monkeypatch, [OPENAI, LOCAL])
    monkeypatch.setenv("CONVEYOR_LLM_DEFAULT_PROVIDER", "local-vllm")
    assert get_provider().name == "local-vllm"
    assert all_providers()[0].name == "local-vllm"


def test_the_configuration_is_read_again_when_the_environment_changes(monkeypatch):
    assert get_provider().name == "simulated"
    configure(monkeypatch, [OPENAI])
    assert get_provider().name == "openai"


def test_an_unknown_provider_names_the_known_ones(monkeypatch):
    configure(monkeypatch, [OPENAI, LOCAL])
    with pytest.raises(UnknownProvider) as caught:
        get_provider("anthropic")
    assert isinstance(caught.value, PermanentError)
    assert str(caught.value) == "unknown LLM provider 'anthropic'; configured providers: openai, local-vllm"


@pytest.mark.parametrize(
    ("providers", "message"),
    [
        ("[{not json", "CONVEYOR_LLM_PROVIDERS is not valid JSON"),
        ("{}", "CONVEYOR_LLM_PROVIDERS must be a non-empty JSON list"),
        ([], "CONVEYOR_LLM_PROVIDERS must be a non-empty JSON list"),
        (
            [{**OPENAI, "max_concurrency": 0}],
            "CONVEYOR_LLM_PROVIDERS[0].max_concurrency: Input should be greater than or equal to 1",
        ),
        ([OPENAI, {**LOCAL, "read_timeout": "soon"}], "CONVEYOR_LLM_PROVIDERS[1].read_timeout:"),
        ([{**OPENAI, "rpm": 5}], "CONVEYOR_LLM_PROVIDERS[0].rpm: Extra inputs are not permitted"),
        ([{"base_url": "http://x"}], "CONVEYOR_LLM_PROVIDERS[0].name: Field required"),
        ([{"name": "x"}], "CONVEYOR_LLM_PROVIDERS[0].base_url: required"),
        (
            [{**OPENAI, "base_url": "api.openai.com"}],
            "CONVEYOR_LLM_PROVIDERS[0].base_url: Value error, must start with http",
        ),
        ([{**OPENAI, "name": "open ai"}], "CONVEYOR_LLM_PROVIDERS[0].name:"),
        ([OPENAI, OPENAI], "CONVEYOR_LLM_PROVIDERS[1].name: 'openai' is used twice"),
        (["openai"], "CONVEYOR_LLM_PROVIDERS[0]: Input should be a valid dictionary"),
    ],
)
def test_a_bad_configuration_is_refused_naming_the_field(monkeypatch, providers, message):
    configure(monkeypatch, providers)
    with pytest.raises(ImproperlyConfigured) as caught:
        get_provider()
    assert message in str(caught.value)


def test_an_unknown_default_provider_is_refused(monkeypatch):
    configure(monkeypatch, [OPENAI])
    monkeypatch.setenv("CONVEYOR_LLM_DEFAULT_PROVIDER", "nope")
    with pytest.raises(ImproperlyConfigured, match="CONVEYOR_LLM_DEFAULT_PROVIDER='nope'"):
        get_provider()


def test_an_unreadable_key_file_is_refused(monkeypatch, tmp_path):
    configure(monkeypatch, [OPENAI])
    monkeypatch.setenv("CONVEYOR_LLM_OPENAI_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ImproperlyConfigured, match="CONVEYOR_LLM_OPENAI_API_KEY_FILE"):
        get_provider()


def test_the_key_never_shows_in_a_providers_repr(monkeypatch):
    configure(monkeypatch, [OPENAI])
    monkeypatch.setenv("CONVEYOR_LLM_OPENAI_API_KEY", "sk-secret")
    assert "sk-secret" not in repr(get_provider())
