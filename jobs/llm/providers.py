"""Which LLM providers exist, read from the environment.

`CONVEYOR_LLM_PROVIDERS` (or `CONVEYOR_LLM_PROVIDERS_FILE`) holds a JSON list:

    [{"name": "openai", "base_url": "https://api.openai.com/v1", "default_model": "gpt-4o-mini",
      "max_concurrency": 50, "requests_per_minute": 500},
     {"name": "simulated", "simulated": true}]

API keys come from `CONVEYOR_LLM_<NAME>_API_KEY` or the file `CONVEYOR_LLM_<NAME>_API_KEY_FILE`
names (`<NAME>` upper-cased, `-` as `_`); an `api_key` in the JSON is the fallback. The default
provider is `CONVEYOR_LLM_DEFAULT_PROVIDER`, else the first in the list. Without any of this,
the one provider is "simulated": the endpoint this project serves on `PORT` (see simulated.py).

`max_concurrency` and `requests_per_minute` hold across every worker on every host: they
are enforced in Postgres before each call (jobs/llm/limits.py).

The environment is read on each call (tests change it); the parse is cached per distinct
environment, so the hot path costs one scan of `os.environ`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from config.env import env_str
from jobs.errors import PermanentError

SIMULATED = "simulated"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key: str | None = None
    default_model: str | None = None
    max_concurrency: int = 16
    requests_per_minute: int = 0  # 0 = unlimited
    connect_timeout: float = 5.0
    read_timeout: float = 120.0
    total_timeout: float = 300.0
    simulated: bool = False

    def __repr__(self) -> str:  # never print the key
        return f"Provider(name={self.name!r}, base_url={self.base_url!r}, simulated={self.simulated})"


class UnknownProvider(PermanentError, LookupError):
    """A job or caller named a provider that is not configured."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown LLM provider {name!r}; configured providers: {', '.join(known)}")


class _ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    base_url: str | None = None
    api_key: str | None = None
    default_model: str | None = None
    max_concurrency: int = Field(16, ge=1)
    requests_per_minute: int = Field(0, ge=0)
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(120.0, gt=0)
    total_timeout: float = Field(300.0, gt=0)
    simulated: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use letters, digits, '-' and '_' (it names the API key variable)")
        return value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value


_CONFIGS = TypeAdapter(list[_ProviderConfig])


def api_key_variable(name: str) -> str:
    return f"CONVEYOR_LLM_{name.upper().replace('-', '_')}_API_KEY"


def simulated_base_url() -> str:
    """Where this project serves the simulated provider (Daphne on `PORT`)."""
    return f"http://127.0.0.1:{os.environ.get('PORT') or 8000}/simulated/v1"


def all_providers() -> list[Provider]:
    """Every configured provider, the default first."""
    return list(_load(_snapshot())[0])


def get_provider(name: str | None = None) -> Provider:
    """The provider called `name`, or the default one for None."""
    providers, default = _load(_snapshot())
    wanted = name or default
    for provider in providers:
        if provider.name == wanted:
            return provider
    raise UnknownProvider(wanted, [p.name for p in providers])


def _snapshot() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("CONVEYOR_LLM_") or k == "PORT"))


@functools.lru_cache(maxsize=8)
def _load(snapshot: tuple[tuple[str, str], ...]) -> tuple[tuple[Provider, ...], str]:
    """Parse the provider list; `snapshot` (the relevant environment) is only the cache key."""
    raw = env_str("CONVEYOR_LLM_PROVIDERS")
    if raw is None or not raw.strip():
        configs = [_ProviderConfig(name=SIMULATED, simulated=True, default_model=SIMULATED, max_concurrency=200)]
    else:
        configs = _parse(raw)

    providers = tuple(_provider(config) for config in configs)
    names = [p.name for p in providers]
    default = env_str("CONVEYOR_LLM_DEFAULT_PROVIDER") or names[0]
    if default not in names:
        raise ImproperlyConfigured(
            f"CONVEYOR_LLM_DEFAULT_PROVIDER={default!r} is not a configured provider (configured: {', '.join(names)})"
        )
    providers = tuple(sorted(providers, key=lambda p: p.name != default))
    return providers, default


def _parse(raw: str) -> list[_ProviderConfig]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ImproperlyConfigured(f"CONVEYOR_LLM_PROVIDERS is not valid JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ImproperlyConfigured("CONVEYOR_LLM_PROVIDERS must be a non-empty JSON list of provider objects")
    try:
        configs = _CONFIGS.validate_python(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            index, *field = error["loc"]
            where = f"CONVEYOR_LLM_PROVIDERS[{index}]" + "".join(f".{part}" for part in field)
            problems.append(f"{where}: {error['msg']}")
        raise ImproperlyConfigured("; ".join(problems)) from None

    seen: set[str] = set()
    for index, config in enumerate(configs):
        if config.name in seen:
            raise ImproperlyConfigured(f"CONVEYOR_LLM_PROVIDERS[{index}].name: {config.name!r} is used twice")
        seen.add(config.name)
        if config.base_url is None and not config.simulated:
            raise ImproperlyConfigured(f"CONVEYOR_LLM_PROVIDERS[{index}].base_url: required (provider {config.name!r})")
    return configs


def _provider(config: _ProviderConfig) -> Provider:
    values = config.model_dump()
    values["api_key"] = env_str(api_key_variable(config.name)) or config.api_key
    if config.simulated:
        values["base_url"] = config.base_url or simulated_base_url()
        values["default_model"] = config.default_model or SIMULATED
    return Provider(**values)
