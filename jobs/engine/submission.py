"""Submitting jobs: the one function every entry point (API, dashboard, admin,
CLI) calls to create a job."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.utils import timezone
from pydantic import ValidationError as PydanticValidationError

from jobs.db import events, sql
from jobs.djangoq import broker
from jobs.engine import dependencies, ssrf
from jobs.engine.registry import payload_errors, submittable_handler
from jobs.errors import IdempotencyKeyReused, InvalidJob, PayloadTooLarge
from jobs.models import Batch, Job, State

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
MAX_BACKOFF = 7 * 24 * 3600.0
MAX_RUN_AFTER = timedelta(days=366)
# JSON nested deeper than this is refused: Python's json, pydantic and
# Postgres would each fail on much deeper input with errors of their own.
MAX_PAYLOAD_DEPTH = 64
# The encoders json.dumps(…) would build on every call with these options,
# made once: a 10,000-job batch calls them 10,000 times.
_FINGERPRINT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
_SIZE_JSON = json.JSONEncoder(ensure_ascii=False)


@dataclass(frozen=True)
class Submitted:
    job: Job
    created: bool  # False: an earlier submission with the same idempotency key


def submit_job(
    kind: str,
    payload: Any,
    *,
    queue: str | None = None,
    priority: int = 0,
    run_after: datetime | None = None,
    max_attempts: int | None = None,
    backoff_base: float | None = None,
    backoff_max: float | None = None,
    idempotency_key: str | None = None,
    callback_url: str = "",
    owner: str = "",
    batch: Batch | None = None,
    internal: bool = False,
    depends_on: Sequence[uuid.UUID | str] = (),
    on_dependency_failure: str = "cancel",
    visible_to: str | None = None,
) -> Submitted:
    """Validate and create a job, its `job.created` event and its broker row in
    one transaction. Only the engine passes `internal=True`, to submit a kind
    no client may (webhook.deliver).

    `depends_on`: ids of existing jobs; the job is created `waiting` and queued
    when the last of them finishes (jobs.engine.dependencies), or cancelled when
    one fails and `on_dependency_failure` is "cancel" ("run": it runs anyway).
    `visible_to`: the owner whose jobs it may name (None: any job).

    Raises InvalidJob (with per-field errors) or IdempotencyKeyReused.
    """
    fields = prepare_job(
        kind,
        payload,
        queue=queue,
        priority=priority,
        run_after=run_after,
        max_attempts=max_attempts,
        backoff_base=backoff_base,
        backoff_max=backoff_max,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        internal=internal,
    )
    if depends_on or on_dependency_failure != "cancel":
        errors = dependencies.check_policy(on_dependency_failure)
        try:
            ids = dependencies.parse_ids(depends_on)
        except InvalidJob as exc:
            errors += exc.errors
        if errors:
            raise InvalidJob(errors)
        fields["on_dependency_failure"] = on_dependency_failure
    # Only a replay with the same idempotency key reads the digest.
    asked = fingerprint(fields, depends_on=ids if depends_on else ()) if idempotency_key is not None else ""
    if depends_on:
        fields["state"] = State.WAITING
        job = _insert_waiting(
            Job(owner=owner, batch=batch, request_fingerprint=asked, **fields), ids, visible_to=visible_to
        )
    else:
        job = _insert(fields, owner=owner, batch=batch, asked=asked)
    if job is not None:
        return Submitted(job, created=True)
    # The idempotency key was taken: by this request before (a replay) or by
    # a different one. The unique index decided, not a check-then-insert.
    existing = Job.objects.get(owner=owner, idempotency_key=idempotency_key)
    if existing.request_fingerprint != asked:
        raise IdempotencyKeyReused(existing.id)
    return Submitted(existing, created=False)


def prepare_job(
    kind: str,
    payload: Any,
    *,
    queue: str | None = None,
    priority: int = 0,
    run_after: datetime | None = None,
    max_attempts: int | None = None,
    backoff_base: float | None = None,
    backoff_max: float | None = None,
    idempotency_key: str | None = None,
    callback_url: str = "",
    internal: bool = False,
) -> dict[str, Any]:
    """Validate a submission and return the Job fields it makes (no database
    writes), all but `request_fingerprint`: only a caller with an idempotency
    key needs it (`fingerprint(fields)`); large batches otherwise spent a
    noticeable share of their time on digests nothing read."""
    handler = submittable_handler(kind, internal=internal)
    if not isinstance(payload, dict):
        raise InvalidJob([{"field": "payload", "message": "must be a JSON object"}])
    unstorable = _unstorable(payload, "payload")
    if unstorable:
        raise InvalidJob(unstorable)
    size = len(_SIZE_JSON.encode(payload).encode())
    limit = settings.CONVEYOR["MAX_PAYLOAD_BYTES"]
    if size > limit:
        raise PayloadTooLarge(
            [{"field": "payload", "message": f"is {size} bytes; the limit is {limit} bytes (256 KiB)"}]
        )

    errors: list[dict[str, str]] = []
    try:
        normalized = handler.schema.model_validate(payload).model_dump(mode="json")
    except PydanticValidationError as exc:
        normalized = {}
        errors += payload_errors(exc)

    queue = handler.queue if queue in (None, "") else queue
    if not isinstance(queue, str) or not QUEUE_NAME.match(queue):
        errors.append({"field": "queue", "message": "must be 1-100 letters, digits, '_', '.' or '-'"})
    if not _is_int(priority) or not -1000 <= priority <= 1000:
        errors.append({"field": "priority", "message": "must be an integer from -1000 to 1000"})
    max_attempts = handler.max_attempts if max_attempts is None else max_attempts
    if not _is_int(max_attempts) or not 1 <= max_attempts <= 50:
        errors.append({"field": "max_attempts", "message": "must be an integer from 1 to 50"})
    backoff_base = 2.0 if backoff_base is None else backoff_base
    backoff_max = 600.0 if backoff_max is None else backoff_max
    for name, value in (("backoff_base", backoff_base), ("backoff_max", backoff_max)):
        if not _is_number(value) or not 0 < value <= MAX_BACKOFF:
            errors.append(
                {"field": name, "message": f"must be a number of seconds above 0 and at most {MAX_BACKOFF:.0f}"}
            )
    if _is_number(backoff_base) and _is_number(backoff_max) and backoff_base > backoff_max:
        errors.append({"field": "backoff_max", "message": "must not be below backoff_base"})

    scheduled = False
    if run_after is not None:
        now = timezone.now()
        if not isinstance(run_after, datetime) or timezone.is_naive(run_after):
            errors.append({"field": "run_after", "message": "must be a date-time with a time zone (ISO 8601)"})
        elif run_after > now + MAX_RUN_AFTER:
            errors.append({"field": "run_after", "message": "must be within a year from now"})
        else:
            scheduled = run_after > now
    if idempotency_key is not None and (not isinstance(idempotency_key, str) or not 1 <= len(idempotency_key) <= 255):
        errors.append({"field": "idempotency_key", "message": "must be 1-255 characters"})
    elif idempotency_key is not None:
        errors += _unstorable(idempotency_key, "idempotency_key")
    callback_url = callback_url or ""
    if callback_url and not isinstance(callback_url, str):
        errors.append({"field": "callback_url", "message": "must be an http or https URL"})
    elif callback_url and _unstorable(callback_url, "callback_url"):
        errors += _unstorable(callback_url, "callback_url")
    elif callback_url:
        try:
            URLValidator(schemes=["http", "https"])(callback_url)
        except ValidationError:
            errors.append({"field": "callback_url", "message": "must be an http or https URL"})
        if len(callback_url) > 2000:
            errors.append({"field": "callback_url", "message": "must be at most 2000 characters"})
        if not any(e["field"] == "callback_url" for e in errors):
            try:
                # Literal addresses and localhost names only: no DNS lookup at
                # submission. Delivery checks the resolved address again.
                ssrf.check_url(callback_url, resolve_host=False)
            except ssrf.UnsafeURL as exc:
                errors.append({"field": "callback_url", "message": str(exc)})
    if errors:
        raise InvalidJob(errors)

    return {
        "kind": kind,
        "queue": queue,
        "payload": normalized,
        "priority": priority,
        "max_attempts": max_attempts,
        "backoff_base": float(backoff_base),
        "backoff_max": float(backoff_max),
        "timeout": handler.timeout,
        "run_after": run_after,
        "state": State.SCHEDULED if scheduled else State.QUEUED,
        "idempotency_key": idempotency_key,
        "callback_url": callback_url,
    }


def fingerprint(fields: dict[str, Any], *, depends_on: Sequence[uuid.UUID] = ()) -> str:
    """A digest of what was asked for, to tell a replay from a reused key."""
    asked = {
        k: fields[k]
        for k in ("kind", "queue", "payload", "priority", "max_attempts", "backoff_base", "backoff_max", "callback_url")
    }
    asked["run_after"] = fields["run_after"].isoformat() if fields["run_after"] else None
    if depends_on:  # absent otherwise: the digests of jobs without dependencies stay as they were
        asked["depends_on"] = sorted(str(job_id) for job_id in depends_on)
        asked["on_dependency_failure"] = fields.get("on_dependency_failure", "cancel")
    return hashlib.sha256(_FINGERPRINT_JSON.encode(asked).encode()).hexdigest()


def _insert(fields: dict[str, Any], *, owner: str, batch: Batch | None, asked: str) -> Job | None:
    """Insert the job, its `job.created` event, its broker row and both
    notifications in one statement (so one round trip, atomic on its own).

    Only the columns a submission sets are parameters; the statement writes
    every other column's default as a literal and returns no columns: the
    Job comes from the values sent, not from a row read back.

    Returns None when the job's idempotency key is already taken.
    """
    now = timezone.now()
    row = {
        **job_defaults(),
        **fields,
        "id": uuid.uuid4(),
        "owner": owner,
        "batch_id": batch.pk if batch is not None else None,
        "request_fingerprint": asked,
        "created_at": now,
        "updated_at": now,
    }
    params = [row[name] for name in _SUBMITTED]
    params[_PAYLOAD_AT] = _PAYLOAD_JSON.encode(row["payload"])
    key = broker.cluster_for_queue(row["queue"])
    params += ["job.created", "job.created", key, broker.task_package(row["id"], row["timeout"]), key]
    if sql.fetchone(_insert_one(), params) is None:
        return None
    if row["run_after"] is not None:  # as the database returns it: in UTC
        row["run_after"] = row["run_after"].astimezone(UTC)
    job = Job.from_db(DEFAULT_DB_ALIAS, _ATTNAMES, [row[name] for name in _ATTNAMES])
    if batch is not None:
        job.batch = batch
    return job


# The columns a submission sets, by attribute name, in the order of
# `_insert_one`'s parameters; every other column takes its field's default.
_SUBMITTED = (
    "id",
    "kind",
    "queue",
    "payload",
    "state",
    "priority",
    "max_attempts",
    "backoff_base",
    "backoff_max",
    "timeout",
    "run_after",
    "owner",
    "idempotency_key",
    "request_fingerprint",
    "callback_url",
    "batch_id",
    "on_dependency_failure",
    "created_at",
    "updated_at",
)
_PAYLOAD_AT = _SUBMITTED.index("payload")
_PAYLOAD_JSON = json.JSONEncoder(separators=(",", ":"))
_ATTNAMES = [f.attname for f in Job._meta.concrete_fields]


@functools.cache
def _insert_one() -> str:
    """`_insert`'s statement: the same for every submission, so Postgres
    prepares it once per connection (jobs/db/sql.py)."""
    by_name = {f.attname: f for f in Job._meta.concrete_fields}
    rest = [f for f in Job._meta.concrete_fields if f.attname not in _SUBMITTED]
    names = [by_name[name].column for name in _SUBMITTED] + [f.column for f in rest]
    values = ["%s::jsonb" if name == "payload" else "%s" for name in _SUBMITTED]
    values += [_literal(f.get_db_prep_save(f.get_default(), connections[DEFAULT_DB_ALIAS])) for f in rest]
    return (
        f"WITH j AS (INSERT INTO jobs_job ({', '.join(names)}) VALUES ({', '.join(values)})"
        " ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING"
        " RETURNING id, kind, queue, state, priority, run_after)"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'kind', kind)")
        + broker.ctes()
        + " SELECT (SELECT count(*) FROM n) + (SELECT count(*) FROM bn) FROM j"
    )


def _literal(value: Any) -> str:
    """A column default as SQL (`%` doubled: the text still carries parameters)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''").replace("%", "%%") + "'"
    raise TypeError(f"no SQL literal for a default of type {type(value).__name__}")


def _insert_waiting(job: Job, ids: list[uuid.UUID], *, visible_to: str | None) -> Job | None:
    """Create `job` `waiting` on the jobs `ids` (locked first, see
    jobs.engine.dependencies), with its edges and `job.created` event, and
    settle it (queued or cancelled at once if its dependencies already
    decide), in one transaction. No broker row until it is queued.

    Returns None when the job's idempotency key is already taken."""
    with transaction.atomic():
        states = dependencies.lock_dependencies(ids, visible_to=visible_to)
        job.pending_dependencies = sum(state not in dependencies.RESOLVING for state in states.values())
        try:
            with transaction.atomic():
                job.save(force_insert=True)
        except IntegrityError as exc:
            if job.idempotency_key is None or "job_unique_idempotency_key" not in str(exc):
                raise
            return None
        events.record(job.id, "job.created", {"state": job.state, "kind": job.kind}, queue=job.queue)
        return dependencies.link(job, states)


@dataclass(frozen=True)
class ReadyJob:
    """A job `insert_jobs` can write: `prepare_job`'s fields, its id, creation
    time, request fingerprint (only with an idempotency key) and signed
    broker task, all made before the insert so none of it waits on it."""

    fields: dict[str, Any]
    id: uuid.UUID
    created_at: datetime
    fingerprint: str
    task: str


def ready_job(fields: dict[str, Any]) -> ReadyJob:
    job_id = uuid.uuid4()
    return ReadyJob(
        fields=fields,
        id=job_id,
        created_at=timezone.now(),
        fingerprint=fingerprint(fields) if fields["idempotency_key"] is not None else "",
        task=broker.task_package(job_id, fields["timeout"]),
    )


def insert_jobs(jobs: list[tuple[str, ReadyJob]]) -> dict[uuid.UUID, Job]:
    """Create (owner, job) pairs in one statement: each job, its `job.created`
    event, its broker row and the notifications, as `submit_job` writes one.

    Returns the jobs created, by id. One whose idempotency key its owner had
    already used is not created and not returned: `submit_job` tells the
    replay of an earlier request from a reused key.
    """
    rows, tasks = [], []
    for owner, ready in jobs:
        key = broker.cluster_for_queue(ready.fields["queue"])
        rows.append(
            {
                **ready.fields,
                "id": ready.id,
                "owner": owner,
                "request_fingerprint": ready.fingerprint,
                "created_at": ready.created_at,
                "updated_at": ready.created_at,
            }
        )
        tasks.append({"id": ready.id, "key": key, "task": ready.task})
    with sql.cursor() as cursor:
        cursor.execute(
            _insert_many(), [to_json(job_defaults()), to_json(rows), "job.created", "job.created", to_json(tasks)]
        )
        return {job.id: job for job in map(sql.job_from_row, cursor.fetchall())}


@functools.cache
def _insert_many() -> str:
    # The jobs go as one JSON document; a record of the model's defaults
    # fills what the document leaves out (as jobs.engine.batches does).
    columns = sql.job_columns()[0]
    return (
        "WITH j AS (INSERT INTO jobs_job"
        " SELECT * FROM json_populate_recordset(json_populate_record(NULL::jobs_job, %s::json), %s::json)"
        f" ON CONFLICT (owner, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING {columns})"
        + events.ctes(data_sql="jsonb_build_object('state', state, 'kind', kind)")
        + ", b AS (INSERT INTO django_q_ormq (key, payload, lock, priority, job_id)"
        " SELECT t.key, t.task, greatest(coalesce(j.run_after, now()), now()), j.priority, j.id"
        " FROM j JOIN json_to_recordset(%s::json) AS t(id uuid, key text, task text) ON t.id = j.id RETURNING key)"
        f", bn AS (SELECT pg_notify('{broker.CHANNEL}', key) FROM (SELECT DISTINCT key FROM b) AS k)"
        f" SELECT {columns}, (SELECT count(*) FROM n) + (SELECT count(*) FROM bn) FROM j"
    )


@functools.cache
def job_defaults() -> dict[str, Any]:
    """Each Job field's default, by attribute name (shared: copy it to change it)."""
    return {f.attname: f.get_default() for f in Job._meta.concrete_fields}


def to_json(value: Any) -> str:
    """Compact JSON of job rows and their parts (datetimes and UUIDs as text)."""
    return _ROW_JSON.encode(value)


def _json_default(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_ROW_JSON = json.JSONEncoder(separators=(",", ":"), default=_json_default)


def _unstorable(value: Any, path: str) -> list[dict[str, str]]:
    """Errors for what Postgres cannot store in text or jsonb (a NUL character,
    an unpaired surrogate, NaN or an infinity) or nests deeper than
    MAX_PAYLOAD_DEPTH, each naming where it is. The API refuses most of these
    when it parses a body; the dashboard, the CLI and Python callers meet them
    here only. Iterative: a deep payload must not exhaust the stack."""
    errors: list[dict[str, str]] = []
    stack: list[tuple[Any, str, int]] = [(value, path, 0)]
    while stack and len(errors) < 20:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            problem = _text_problem(value)
            if problem:
                errors.append({"field": path, "message": problem})
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append({"field": path, "message": f"{value} is not a JSON number"})
        elif isinstance(value, (dict, list, tuple)):
            if depth >= MAX_PAYLOAD_DEPTH:
                errors.append({"field": path, "message": f"nests deeper than {MAX_PAYLOAD_DEPTH} levels"})
                continue
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(value, dict):
                    problem = _text_problem(key) if isinstance(key, str) else "is not a string"
                    if problem:
                        errors.append({"field": path, "message": f"has a key that {problem}"})
                        continue
                stack.append((item, f"{path}.{key}", depth + 1))
    return errors


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    if not _is_utf8(text):
        return "contains an unpaired surrogate, which is not valid Unicode"
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN
