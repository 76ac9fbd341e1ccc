"""The handler registry: `@handler("kind", ...)` ties a job kind to its function,
payload schema, default queue, attempts and timeout."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from jobs.errors import InvalidJob, PermanentError, UnknownKind


class Payload(BaseModel):
    """Base for payload schemas: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class InvalidPayload(PermanentError):
    """A stored payload its kind's schema refuses: retrying cannot change it."""


@dataclass(frozen=True)
class Handler:
    kind: str
    func: Callable[..., Any]
    schema: type[BaseModel]
    queue: str
    max_attempts: int
    timeout: int
    description: str
    internal: bool = False  # only the engine submits it (e.g. webhook.deliver)
    schedule: str | None = None  # a cron expression to submit it on, or None

    @functools.cached_property
    def is_async(self) -> bool:
        """`async def` handlers run in the worker process's asyncio lane (jobs/worker/lane.py)."""
        return inspect.iscoroutinefunction(self.func)

    def parse(self, payload: Any) -> BaseModel:
        """The job's payload as its schema reads it. Raises InvalidPayload: a
        job stored before a check existed (or written around it) goes to the
        dead-letter queue at once instead of failing the same way every attempt."""
        try:
            return self.schema.model_validate(payload)
        except ValidationError as exc:
            raise InvalidPayload("; ".join(f"{e['field']}: {e['message']}" for e in payload_errors(exc))) from None


_registry: dict[str, Handler] = {}


def payload_errors(exc: ValidationError) -> list[dict[str, str]]:
    """A schema's errors, each named by its path (`payload.variables.keyword`)."""
    return [
        {"field": ".".join(str(p) for p in ("payload", *err["loc"])), "message": err["msg"]} for err in exc.errors()
    ]


def handler(
    kind: str,
    *,
    schema: type[BaseModel],
    queue: str = "default",
    max_attempts: int = 5,
    timeout: int = 600,
    internal: bool = False,
    schedule: str | None = None,
    description: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `func(ctx, payload) -> result` as the handler of `kind`.
    An `internal` kind is refused to every client: only the engine submits it.
    `schedule` (a cron expression) declares a schedule named after the kind
    (jobs/engine/scheduling.py writes it into the table at start);
    `description` replaces the first line of the function's docstring, which
    the Submit page and the API's documentation show."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        if kind in _registry:
            raise ValueError(f"handler for {kind!r} registered twice")
        shown = description if description is not None else _first_line(func.__doc__)
        _registry[kind] = Handler(
            kind, func, schema, queue, max_attempts, timeout, shown, internal=internal, schedule=schedule
        )
        if schedule is not None:
            declare_for_handler(kind, schedule)
        return func

    return register


def _first_line(doc: str | None) -> str:
    lines = (doc or "").strip().splitlines()
    return lines[0].strip() if lines else ""


def get_handler(kind: str) -> Handler | None:
    return _registry.get(kind)


def submittable_handler(kind: Any, *, internal: bool = False) -> Handler:
    """The handler of a kind the caller may submit: every client entry point
    asks here (through `submission.prepare_job`); only the engine passes
    `internal=True`. Raises UnknownKind, or InvalidJob for an internal kind,
    naming `kind`."""
    found = _registry.get(kind) if isinstance(kind, str) else None
    if found is None:
        raise UnknownKind(
            [{"field": "kind", "message": f"unknown kind {kind!r}; known kinds: {', '.join(client_kinds())}"}]
        )
    if found.internal and not internal:
        raise InvalidJob(
            [
                {
                    "field": "kind",
                    "message": f"{kind!r} is internal: only the engine submits it; "
                    f"kinds you can submit: {', '.join(client_kinds())}",
                }
            ]
        )
    return found


def known_kinds() -> list[str]:
    """Every registered kind, internal ones included (for filters and listings)."""
    return sorted(_registry)


def client_kinds() -> list[str]:
    """The kinds a client may submit."""
    return [kind for kind, h in sorted(_registry.items()) if not h.internal]


def async_kinds() -> list[str]:
    """Kinds whose handlers run in the worker's asyncio lane."""
    return [kind for kind, h in sorted(_registry.items()) if h.is_async]


def sync_kinds() -> list[str]:
    """Kinds whose handlers run on the worker's own thread."""
    return [kind for kind, h in sorted(_registry.items()) if not h.is_async]


def all_handlers() -> list[Handler]:
    return [_registry[k] for k in known_kinds()]


def client_handlers() -> list[Handler]:
    """The handlers of the kinds a client may submit (the Submit page's list)."""
    return [_registry[k] for k in client_kinds()]


# --- schedules declared in code ----------------------------------------------------------

# Schedules declared in code (`schedule(...)`, `@handler(..., schedule=...)`),
# by name; jobs/engine/scheduling.py writes them into the table.
declared_schedules: dict[str, dict[str, Any]] = {}


def schedule(
    name: str,
    kind: str,
    payload: dict[str, Any] | None = None,
    cron: str | None = None,
    interval_seconds: int | None = None,
    timezone: str = "UTC",  # noqa: A002 - the public name of the option
    *,
    enabled: bool = True,
    overlap: str = "skip",
    queue: str | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
) -> None:
    """Declare a schedule in code (at import time, like a handler). It is
    written to the table after migrate and when a cluster starts; declaring
    the same name again replaces the declaration."""
    declared_schedules[name] = {
        "name": name,
        "kind": kind,
        "payload": dict(payload or {}),
        "cron": cron or "",
        "interval_seconds": interval_seconds,
        "timezone": timezone,
        "enabled": enabled,
        "overlap": overlap,
        "queue": queue or "",
        "priority": priority,
        "max_attempts": max_attempts,
    }


def declare_for_handler(kind: str, cron: str, **options: Any) -> None:
    """The schedule of `@handler(kind, schedule=cron)`: named after the kind."""
    schedule(kind, kind, cron=cron, **options)


def declared() -> dict[str, dict[str, Any]]:
    return dict(declared_schedules)


def forget_declared(name: str) -> None:
    declared_schedules.pop(name, None)
