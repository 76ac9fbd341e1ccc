"""Log lines that say which job or request they belong to.

Two context variables carry the context: the job a worker is running (set by
the runner and the lane through `job_log_context` / `job_log_contextvars`)
and the id of the request being served (set by
`config.middleware.RequestIdMiddleware`). `ContextFilter`, on the console
handler, copies them onto every record, so a line logged anywhere below a
handler or a view (a library, the ORM, Django-Q2) carries them too.

`LOG_FORMAT=json` writes one JSON object per line (`JsonFormatter`); the
default plain format appends the same fields as `key=value`.
"""

from __future__ import annotations

import contextvars
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

JOB_FIELDS = ("job_id", "kind", "attempt", "queue")
CONTEXT_FIELDS = (*JOB_FIELDS, "request_id")

_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("conveyor_log_job", default=None)
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("conveyor_log_request_id", default=None)


def _job_fields(job) -> dict[str, Any]:
    # `attempts` is the number of the running attempt once the job is claimed.
    return {"job_id": str(job.id), "kind": job.kind, "attempt": job.attempts, "queue": job.queue}


@contextmanager
def job_log_context(job) -> Iterator[None]:
    """Every line logged inside the block (on this thread) carries the job's
    id, kind, attempt number and queue."""
    token = _job.set(_job_fields(job))
    try:
        yield
    finally:
        _job.reset(token)


def job_log_contextvars(job) -> contextvars.Context:
    """A copy of the current context with the job's fields set: run an asyncio
    task in it (`loop.create_task(coro, context=...)`) and each of its lines
    carries them, while other tasks on the same loop keep theirs."""
    context = contextvars.copy_context()
    context.run(_job.set, _job_fields(job))
    return context


@contextmanager
def request_log_context(request_id: str) -> Iterator[None]:
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_context() -> dict[str, Any]:
    """The fields the current job and request add to a line (absent ones left out)."""
    fields = dict(_job.get() or {})
    request_id = _request_id.get()
    if request_id is not None:
        fields["request_id"] = request_id
    return fields


class ContextFilter(logging.Filter):
    """Adds the job and request fields to each record (None when absent);
    a field a caller passed with `extra=` is kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current_context()
        if "request_id" not in fields:
            # Django logs a 4xx/5xx response ("Not Found: /x") after the
            # middleware has returned, passing the request along.
            fields["request_id"] = getattr(getattr(record, "request", None), "request_id", None)
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        return True


def _record_context(record: logging.LogRecord) -> dict[str, Any]:
    return {name: value for name in CONTEXT_FIELDS if (value := getattr(record, name, None)) is not None}


class PlainFormatter(logging.Formatter):
    """`time level logger message`, then the context as `key=value`."""

    def __init__(self, fmt: str | None = None, **kwargs: Any) -> None:
        super().__init__(fmt or "%(asctime)s %(levelname)s %(name)s %(message)s", **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _record_context(record)
        if not context:
            return line
        suffix = " ".join(f"{name}={value}" for name, value in context.items())
        # After the message, before a traceback's lines.
        first, newline, rest = line.partition("\n")
        return f"{first} {suffix}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message,
    process, the context fields, and `exception` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            **_record_context(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)
