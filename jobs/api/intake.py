"""POST /api/v1/jobs from API-key callers, without Django's request cycle.

Under Daphne nearly all of a submission's CPU through Django is the request
cycle around one INSERT: a thread hop, the middleware chain, the key lookup,
django-ninja's parsing and rendering, and the handler's threads taking turns
on the GIL (figures in bench/README.md). The intake (mounted in config/asgi.py ahead of Django) answers the
common case itself and hands everything else to Django, unchanged:

1. On the event loop: read the body and check what Django would (method,
   host, scheme, media type, size, a bearer key, the Idempotency-Key), parse
   it with the API's own strict JSON reader, `JobIn` and
   `submission.prepare_job`, and sign the job's broker task.
2. On one writer thread: take every submission waiting, verify their keys in
   one query (`apikeys.verify_api_keys`) and create their jobs in one
   statement (`submission.insert_jobs`): a group commit. A lone request
   waits for nothing; under load, one statement and one WAL flush serve
   dozens of requests.
3. Back on the loop: render the job as the view does (`views.job_detail_out`,
   `JobDetailOut`, django-ninja's renderer) with the headers Django's middleware
   would add (tests/jobs/api/test_intake.py holds the two answers equal).

Anything else — no or a bad key, a missing scope, a session caller, a body
that does not parse or validate, an Idempotency-Key already used (a replay or
a conflict), a database error before the group's statement or one Postgres
reported for it (it rolled back) — goes to Django with the body as it came,
and Django answers it exactly as it always has: the intake writes nothing
before it knows the request is good.

Once the group's statement has been sent, a failure (the connection cut
before the rows came back, an error reading them, an answer that cannot be
built) may follow its commit, so the request is never handed to Django to be
created again. With an Idempotency-Key Django may answer it: it replays the
job if the group committed. Without one the client gets a problem: 503 with
Retry-After when the outcome is unknown, 500 when the job exists but its
answer could not be built.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
import pydantic
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpResponse
from django.urls import reverse
from ninja.responses import NinjaJSONEncoder

from config.middleware import HEADER as REQUEST_ID
from config.middleware import host_allowed, request_id_from
from config.middleware import is_secure as _is_secure
from config.middleware import security_headers as _security_headers
from jobs.api.parsing import MAX_BODY, loads
from jobs.api.problems import Problem, problem_response
from jobs.api.schemas import JobIn
from jobs.djangoq import broker
from jobs.engine import submission
from jobs.engine.apikeys import verify_api_keys
from jobs.errors import ConveyorError
from jobs.models import ApiKey

log = logging.getLogger(__name__)

# Submissions one statement creates at most.
GROUP = 200

# A submission whose group statement failed after it was sent: it may have
# committed, so it must not be created again.
UNKNOWN: Any = object()


@dataclass
class _Submission:
    key: str
    ready: submission.ReadyJob
    done: asyncio.Future = field(repr=False)


class Intake:
    def __init__(self, django_app) -> None:
        self.django_app = django_app
        self._waiting: list[_Submission] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        self._closing: threading.Thread | None = None

    async def __call__(self, scope: dict[str, Any], receive, send) -> None:
        headers = _headers(scope) if scope["type"] == "http" and scope["method"] == "POST" else None
        key = _bearer_key(headers) if headers is not None and self._serves(scope, headers) else None
        if key is None:
            return await self.django_app(scope, receive, send)
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        job = await self._submit(key, headers, body)
        if job is None:
            return await self.django_app(scope, _replaying(body, receive), send)
        secure = _is_secure(scope, headers)
        answer = _answer(job)
        if answer is None and "idempotency-key" in headers:
            # Safe for Django: the key is unique in the database, so it
            # replays the job if the group committed and creates it if not.
            return await self.django_app(scope, _replaying(body, receive), send)
        await _send(send, answer if answer is not None else _failure(job), headers, secure=secure)

    def _serves(self, scope: dict[str, Any], headers: dict[str, str]) -> bool:
        """What Django would refuse or redirect is left to Django (and a site
        under a path prefix, whose Location headers carry it)."""
        if settings.FORCE_SCRIPT_NAME or scope.get("root_path"):
            return False
        if not host_allowed(headers.get("host", "")):
            return False
        if settings.SECURE_SSL_REDIRECT and not _is_secure(scope, headers):
            return False
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json" and not (
            media_type.startswith("application/") and media_type.endswith("+json")
        ):
            return False
        length = headers.get("content-length", "")
        return length.isdigit() and int(length) <= MAX_BODY

    async def _submit(self, key: str, headers: dict[str, str], body: bytes):
        """The job created for this request, or None for Django to answer it."""
        idempotency_key = headers.get("idempotency-key")
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            return None
        try:
            asked = JobIn.model_validate(loads(body))
            fields = submission.prepare_job(
                asked.kind, asked.payload, **asked.options(), idempotency_key=idempotency_key
            )
        except (Problem, pydantic.ValidationError, ConveyorError):
            return None
        item = _Submission(key, submission.ready_job(fields), asyncio.get_running_loop().create_future())
        with self._lock:
            self._waiting.append(item)
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write, name="conveyor-intake", daemon=True)
                self._writer.start()
        self._wake.set()
        return await item.done

    def close(self) -> None:
        """Stop the writer once it has written what is waiting; it closes its
        database connection. The next submission starts another."""
        with self._lock:
            writer, self._writer = self._writer, None
            self._closing = writer
        if writer is not None:
            self._wake.set()
            writer.join(timeout=10)

    def _write(self) -> None:
        """The writer thread: one group of waiting submissions after another."""
        me = threading.current_thread()
        while True:
            with self._lock:
                if self._closing is me and not self._waiting:
                    break
                group, self._waiting = self._waiting[:GROUP], self._waiting[GROUP:]
                if not self._waiting:
                    self._wake.clear()
            if not group:
                self._wake.wait()
                continue
            try:
                results = self._create(group)
            except Exception:  # a bug here must not leave requests waiting forever
                log.exception("intake: %d submissions failed, perhaps after their commit", len(group))
                results = [UNKNOWN] * len(group)
            for item, job in zip(group, results, strict=True):
                with contextlib.suppress(RuntimeError):  # its event loop has closed
                    item.done.get_loop().call_soon_threadsafe(_settle, item.done, job)
        connection.close()

    def _create(self, group: list[_Submission]) -> list[Any]:
        """Each submission's job; None for Django to answer it (nothing was
        written for it), UNKNOWN when its statement failed after being sent."""
        # Submissions commit durably, as Django's do: a client given an id keeps its job.
        allowed: list[_Submission] = []
        sent = False
        try:
            # The writer keeps its connection (with CONVEYOR_DB_POOL, Django
            # would hand it back to the pool after every group and take one
            # again, building its connection parameters each time); only one
            # a query found broken is replaced.
            broker.replace_broken_connection()
            keys = _submitters(group)
            owners = {item.key: api_key.owner for item in group if (api_key := keys.get(item.key)) is not None}
            allowed = [item for item in group if item.key in owners]
            sent = bool(allowed)
            created = submission.insert_jobs([(owners[item.key], item.ready) for item in allowed]) if allowed else {}
        except Exception as exc:
            unknown = sent and not _rolled_back(exc)
            if unknown:
                log.error("intake: %d submissions failed after their statement was sent", len(allowed), exc_info=exc)
            elif isinstance(exc, DatabaseError):
                log.warning("intake: %d submissions left to Django (%s)", len(group), exc)
            else:
                log.exception("intake: %d submissions left to Django", len(group))
            if isinstance(exc, DatabaseError):
                connection.close()
            sent_ids = {item.ready.id for item in allowed} if unknown else set()
            return [UNKNOWN if item.ready.id in sent_ids else None for item in group]
        return [created.get(item.ready.id) for item in group]


def _rolled_back(exc: Exception) -> bool:
    """Whether the failed group statement certainly wrote nothing: Postgres
    reported an error for it and the session survived. In autocommit the
    statement is its own transaction, so it rolled back; a connection lost on
    the way, or an error on our side after it ran, leaves the outcome unknown."""
    cause = exc.__cause__
    if not isinstance(exc, DatabaseError) or not isinstance(cause, psycopg.Error) or not cause.diag.sqlstate:
        return False
    return connection.is_usable()


def _submitters(group: list[_Submission]) -> dict[str, ApiKey]:
    """The keys of `group` that may submit."""
    return {
        key: api_key
        for key, api_key in verify_api_keys({item.key for item in group}).items()
        if api_key is not None and ApiKey.Scope.SUBMIT in api_key.scopes
    }


def _settle(done: asyncio.Future, job) -> None:
    if not done.done():  # the client may have gone
        done.set_result(job)


@dataclass
class _Answer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


def _answer(job) -> _Answer | None:
    """The 202 for a created job; None when there is none to give."""
    if job is UNKNOWN:
        return None
    try:
        body = job_json(job)
    except Exception:
        log.exception("intake: job %s was created but its answer could not be built", job.id)
        return None
    headers = [(b"content-type", _CONTENT_TYPE), (b"location", f"{_location_prefix()}{job.id}".encode())]
    return _Answer(202, body, headers)


def _failure(job) -> _Answer:
    """The problem for a request that may or does have a job but no answer."""
    if job is UNKNOWN:
        problem = problem_response(
            "unavailable",
            "The database failed while the job was being created: it may or may not exist."
            " Send an Idempotency-Key to retry safely.",
            headers={"Retry-After": "1"},
        )
    else:
        problem = problem_response(
            "internal-error", f"Job {job.id} was created, but its answer failed on our side; it has been logged."
        )
    return _Answer(problem.status_code, problem.content, _http_headers(problem))


def _http_headers(response: HttpResponse) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in response.items()]


async def _send(send, answer: _Answer, headers: dict[str, str], *, secure: bool) -> None:
    response = [
        *answer.headers,
        *_security_headers(secure),
        (b"content-length", str(len(answer.body)).encode()),
        (REQUEST_ID.lower().encode(), request_id_from(headers.get(REQUEST_ID.lower(), "")).encode()),
    ]
    await send({"type": "http.response.start", "status": answer.status, "headers": response})
    await send({"type": "http.response.body", "body": answer.body})


_CONTENT_TYPE = b"application/json; charset=utf-8"  # django-ninja's JSONRenderer


def job_json(job) -> bytes:
    """The body `POST /jobs` answers with, as django-ninja renders `JobDetailOut`
    from `views.job_detail_out`. What `job_detail_out` builds is already what
    `JobDetailOut` holds, so it is not validated again (django-ninja's
    validation of it took three times as long as the rest);
    tests/jobs/api/test_intake.py holds the two equal."""
    from jobs.api.views import job_detail_out

    return json.dumps(job_detail_out(job, attempts=[]), cls=NinjaJSONEncoder).encode()


@functools.cache
def _location_prefix() -> str:
    # reverse() costs more than the rest of the answer; the id is all that varies.
    return reverse("api-v1:get_job", args=[UUID(int=0)]).removesuffix(str(UUID(int=0)))


def _headers(scope: dict[str, Any]) -> dict[str, str] | None:
    """The request's headers by lowercase name; None when one comes twice."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        name = name.decode("latin-1").lower()
        if name in headers:
            return None
        headers[name] = value.decode("latin-1")
    return headers


def _bearer_key(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


async def _read_body(receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replaying(body: bytes, receive):
    """`receive` for Django: the body already read, then whatever comes next."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
