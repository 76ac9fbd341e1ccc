"""Batches: many jobs submitted at once, created in one transaction with bulk
inserts, and read back with their progress."""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import IntegrityError, connection, transaction
from django.db.backends.utils import CursorWrapper
from django.db.models import Count, Max, Q
from django.utils import timezone

from jobs.db import events
from jobs.djangoq import broker
from jobs.engine import dependencies, submission
from jobs.errors import ConveyorError, IdempotencyKeyReused, InvalidJob
from jobs.models import ACTIVE_STATES, Batch, BatchIdempotencyKey, Job, State

MAX_JOBS = 10_000
MAX_BUDGET = 10**15  # tokens (jobs.llm.usage)
# A batch with thousands of bad rows is usually one mistake repeated: the
# first errors say what it is, all of them would only make a huge response.
MAX_ERRORS = 100
JOB_FIELDS = frozenset(
    {"kind", "payload", "queue", "priority", "run_after", "max_attempts", "backoff_base", "backoff_max", "callback_url"}
)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class InvalidBatch(InvalidJob):
    """The batch is refused; each error names its row (`jobs[3].payload.seconds`)."""

    code = "invalid-batch"


def check_budget(value: object, *, field: str = "token_budget") -> int | None:
    """The budget as given, or InvalidBatch: None (no limit) or a whole number of tokens ≥ 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BUDGET:
        raise InvalidBatch(
            [{"field": field, "message": f"must be a whole number of tokens from 1 to {MAX_BUDGET}, or null"}]
        )
    return value


class BatchNotFound(ConveyorError):
    code = "batch-not-found"


class BatchIdempotencyKeyReused(IdempotencyKeyReused):
    def __init__(self, batch_id) -> None:
        self.job_id = None
        self.batch_id = batch_id
        ConveyorError.__init__(
            self, f"idempotency key already used for batch {batch_id} with a different request; use a new key"
        )


@contextmanager
def gc_paused() -> Iterator[None]:
    """Keep Python's cyclic garbage collector out of a batch's bulk work.

    A 10,000-job batch makes some 100,000 dicts and models that all live
    until it is written; the allocations alone set off about 140 collections
    per batch, one or two of them full ones over the whole heap: 0.15-0.4 s
    of a 10,000-job batch, with nothing to free. The pause is process-wide
    and short; a collector someone else turned off stays off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(frozen=True)
class BatchSubmitted:
    batch: Batch
    created: bool  # False: an earlier submission with the same idempotency key


@dataclass(frozen=True)
class BatchProgress:
    counts: dict[str, int]  # every state, zeros included
    done: bool  # every job has finished
    finished_at: datetime | None


@gc_paused()
def submit_batch(
    name: str,
    jobs: Sequence[Mapping[str, Any]],
    *,
    owner: str = "",
    callback_url: str = "",
    idempotency_key: str | None = None,
    label: Callable[[int], str] = "jobs[{}]".format,
    token_budget: int | None = None,
    then: Mapping[str, Any] | None = None,
) -> BatchSubmitted:
    """Create a batch of jobs: all of them or, when any is invalid, none.

    1. Each item (a dict of `submit_job`'s arguments) goes through
       `prepare_job`, the rules of a single submission. Errors are collected
       with their row, `label(index)` (`jobs[3].payload.seconds`), and raised
       together as InvalidBatch.
    2. One transaction writes the Batch, its idempotency row, the Job rows
       with their `job.created` events and pg_notify (one statement) and
       their broker rows (another), as `_insert_all` explains.
       The idempotency row goes in before the bulk work, so a concurrent
       duplicate waits on its unique index and fails before doing any.

    `token_budget`: the tokens the batch's LLM calls may use (jobs.llm.usage).
    `then`: a job (the fields of one item: kind, payload, queue, …) created
    `waiting` with the batch and queued when every job of the batch has
    finished, whatever their outcome (jobs.engine.dependencies); its handler
    reads the batch's counts with `ctx.batch_counts()`.

    Raises InvalidBatch, or BatchIdempotencyKeyReused when the key was used
    for a different batch.
    """
    name = name.strip() if isinstance(name, str) else ""
    errors = []
    if not 1 <= len(name) <= 200:
        errors.append({"field": "name", "message": "must be 1-200 characters"})
    if callback_url and not _is_http_url(callback_url):
        errors.append({"field": "callback_url", "message": "must be an http or https URL of at most 2000 characters"})
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        errors.append({"field": "idempotency_key", "message": "must be 1-255 characters"})
    if not 1 <= len(jobs) <= MAX_JOBS:
        errors.append({"field": "jobs", "message": f"must hold 1 to {MAX_JOBS} jobs; it holds {len(jobs)}"})
    try:
        check_budget(token_budget)
    except InvalidBatch as exc:
        errors += exc.errors
    if errors:
        raise InvalidBatch(errors)

    prepared = []
    for index, item in enumerate(jobs):
        try:
            prepared.append(_prepare(item))
        except InvalidJob as exc:
            errors += [{**e, "field": ".".join(filter(None, (label(index), e["field"])))} for e in exc.errors]
            if len(errors) >= MAX_ERRORS:
                break
    then_fields = None
    if then is not None and not errors:
        try:
            then_fields = _prepare(then)
        except InvalidJob as exc:
            errors += [{**e, "field": ".".join(filter(None, ("then", e["field"])))} for e in exc.errors]
    if errors:
        raise InvalidBatch(errors[:MAX_ERRORS])

    fingerprint = _fingerprint(name, callback_url, prepared, then_fields) if idempotency_key is not None else ""
    try:
        with transaction.atomic():
            batch = Batch.objects.create(
                name=name, owner=owner, total=len(prepared), callback_url=callback_url, token_budget=token_budget
            )
            if idempotency_key is not None:
                BatchIdempotencyKey.objects.create(
                    batch=batch, owner=owner, key=idempotency_key, request_fingerprint=fingerprint
                )
            _insert_all(batch, prepared, owner=owner, has_dependents=then_fields is not None)
            if then_fields is not None:
                dependencies.then_after_batch(batch, then_fields, owner=owner)
    except IntegrityError as exc:
        if idempotency_key is None or "batch_unique_idempotency_key" not in str(exc):
            raise
        earlier = BatchIdempotencyKey.objects.select_related("batch").get(owner=owner, key=idempotency_key)
        if earlier.request_fingerprint != fingerprint:
            raise BatchIdempotencyKeyReused(earlier.batch_id) from None
        return BatchSubmitted(earlier.batch, created=False)
    return BatchSubmitted(batch, created=True)


def jobs_from_csv(
    text: str, *, kind: str, payload_template: dict[str, Any] | None = None, **options: Any
) -> list[dict[str, Any]]:
    """One job per data row of a CSV file whose first row names the columns.

    Without a template a row's payload is the row itself, `{column: cell}`.
    With one, every string in the template that names a column in braces is
    filled from the row: `"{topic}"` alone becomes the cell, `"Write about
    {topic}"` the text with the cell in it. Cells are strings; the kind's
    payload schema converts them as it would JSON (`"1.5"` → 1.5).
    `options` (queue, priority, …) apply to every job.

    Raises InvalidBatch naming the row (`rows[1]` is the first row after the
    header) and the column.
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise InvalidBatch([{"field": "file", "message": "is empty; the first row must name the columns"}])
        header = [name.strip() for name in header]
        if "" in header or len(set(header)) != len(header):
            raise InvalidBatch([{"field": "file", "message": "the header row must name each column once"}])
        items, errors = [], []
        for number, row in enumerate((row for row in reader if row), start=1):
            if number > MAX_JOBS:
                raise InvalidBatch([{"field": "file", "message": f"has more than {MAX_JOBS} rows"}])
            if len(row) != len(header):
                errors.append(
                    {"field": f"rows[{number}]", "message": f"has {len(row)} cells; the header has {len(header)}"}
                )
                continue
            values = dict(zip(header, row, strict=True))
            try:
                payload = values if payload_template is None else _fill(payload_template, values)
            except KeyError as exc:
                errors.append(
                    {
                        "field": f"rows[{number}]",
                        "message": f"the payload template names {{{exc.args[0]}}}, which is not a column",
                    }
                )
                continue
            items.append({"kind": kind, "payload": payload, **options})
    except csv.Error as exc:
        raise InvalidBatch([{"field": "file", "message": f"is not valid CSV: {exc}"}]) from None
    if errors:
        raise InvalidBatch(errors[:MAX_ERRORS])
    return items


def get_batch(batch_id: uuid.UUID | str, *, owner: str | None = None) -> Batch:
    """Raises BatchNotFound (also for a malformed id, and for another owner's
    batch when `owner` is given)."""
    query = Batch.objects.all() if owner is None else Batch.objects.filter(owner=owner)
    try:
        return query.get(id=batch_id)
    except (Batch.DoesNotExist, ValidationError, ValueError, TypeError):
        raise BatchNotFound(f"no batch with id {batch_id}") from None


def page_batches(
    *, owner: str | None = None, before: tuple[datetime, uuid.UUID] | None = None, limit: int = 50
) -> list[Batch]:
    """Newest first; the batches after position `before` (keyset pagination);
    with `owner`, only that owner's."""
    query = Batch.objects.all() if owner is None else Batch.objects.filter(owner=owner)
    if before is not None:
        created_at, batch_id = before
        query = query.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=batch_id))
    return list(query.order_by("-created_at", "-id")[:limit])


def batch_progress(batches: Sequence[Batch]) -> dict[uuid.UUID, BatchProgress]:
    """Counts by state of each batch's jobs: one index-only scan of the
    (batch, state) index, and the last finish only of a batch done without
    its finished_at."""
    rows = Job.objects.filter(batch__in=[b.id for b in batches]).values("batch_id", "state").annotate(n=Count("*"))
    counts: dict[uuid.UUID, dict[str, int]] = {b.id: dict.fromkeys(State.values, 0) for b in batches}
    for row in rows:
        counts[row["batch_id"]][row["state"]] = row["n"]
    done = {b.id: sum(counts[b.id].values()) > 0 and not any(counts[b.id][s] for s in ACTIVE_STATES) for b in batches}
    unstamped = [b.id for b in batches if done[b.id] and b.finished_at is None]
    last = dict(
        Job.objects.filter(batch__in=unstamped)
        .values("batch_id")
        .annotate(last=Max("finished_at"))
        .values_list("batch_id", "last")
        if unstamped
        else []
    )
    return {
        b.id: BatchProgress(counts[b.id], done[b.id], b.finished_at or (last.get(b.id) if done[b.id] else None))
        for b in batches
    }


def _prepare(item: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise InvalidJob([{"field": "", "message": "must be a JSON object"}])
    unknown = sorted(set(item) - JOB_FIELDS)
    if unknown:
        raise InvalidJob([{"field": name, "message": "is not a job field"} for name in unknown])
    options = {k: v for k, v in item.items() if k not in ("kind", "payload")}
    return submission.prepare_job(item.get("kind"), item.get("payload"), **options)


def _fingerprint(
    name: str, callback_url: str, prepared: list[dict[str, Any]], then: dict[str, Any] | None = None
) -> str:
    asked = {"name": name, "callback_url": callback_url, "jobs": [submission.fingerprint(f) for f in prepared]}
    if then is not None:  # absent otherwise: digests of batches without one stay as they were
        asked["then"] = submission.fingerprint(then)
    return hashlib.sha256(json.dumps(asked, separators=(",", ":")).encode()).hexdigest()


def _insert_all(batch: Batch, prepared: list[dict[str, Any]], *, owner: str, has_dependents: bool = False) -> None:
    """Insert the jobs with their `job.created` events, then their broker rows.

    The jobs go to Postgres as JSON, which Python makes in one `json.dumps`
    where COPY or bulk_create format each of ~30 values of each row; Postgres
    fills the columns every job shares from one record of the model's
    defaults, so a field added to Job is written here too.

    Signing the broker tasks is the largest share of a batch's Python time
    (broker.task_package) and needs only the job ids, so a
    thread does it while the jobs statement runs: Postgres inserts and Python
    signs on two cores at once (the waiting query releases the GIL).
    """
    now = timezone.now()
    common = dict(submission.job_defaults())
    common.update(owner=owner, batch_id=batch.id, created_at=now, updated_at=now, has_dependents=has_dependents)
    for job in prepared:
        job["id"] = str(uuid.uuid4())
    rows = [submission.to_json(common), submission.to_json(prepared), "job.created", "job.created"]
    # Started after the json.dumps, which would otherwise share the GIL with it.
    with ThreadPoolExecutor(max_workers=1) as signer, connection.cursor() as cursor:
        tasks = signer.submit(_sign_all, prepared)
        cursor.execute(_INSERT_JOBS, rows)
        _enqueue_all(cursor, prepared, tasks.result())


def _sign_all(prepared: list[dict[str, Any]]) -> list[str]:
    return [broker.task_package(job["id"], job["timeout"]) for job in prepared]


# A batch at least this large refreshes the broker table's statistics.
ANALYZE_BROKER_ROWS = 1000


def _enqueue_all(cursor: CursorWrapper, prepared: list[dict[str, Any]], tasks: list[str]) -> None:
    """`broker.enqueue` for many jobs: the same broker rows in one COPY (as
    JSON, their long task strings took Postgres twice as long), and one
    wake-up per broker key (Postgres folds equal notifications anyway)."""
    now = timezone.now()
    keys = {queue: broker.cluster_for_queue(queue) for queue in {job["queue"] for job in prepared}}
    with cursor.copy("COPY django_q_ormq (key, payload, lock, priority, job_id) FROM STDIN") as copy:
        for job, task in zip(prepared, tasks, strict=True):
            copy.write_row([keys[job["queue"]], task, max(job["run_after"] or now, now), job["priority"], job["id"]])
    cursor.execute(
        "SELECT pg_notify(%s, key) FROM unnest(%s::text[]) AS key", [broker.CHANNEL, sorted(set(keys.values()))]
    )
    if len(prepared) >= ANALYZE_BROKER_ROWS:
        # The claims' plans need to know the rows are there: from statistics
        # taken while the queue was empty, Postgres read and sorted every ready
        # row of a 10,000-job backlog in each claim (by lock, all equal) rather
        # than take the first few in the claim index's order, until autovacuum
        # analyzed the table a minute later. Counts this transaction's rows.
        cursor.execute("ANALYZE django_q_ormq (key, lock, priority, job_id)")


# The jobs, and their events and notifications as `events.record` writes them.
_INSERT_JOBS = (
    "WITH j AS (INSERT INTO jobs_job"
    " SELECT * FROM json_populate_recordset(json_populate_record(NULL::jobs_job, %s::json), %s::json)"
    " RETURNING id, state, kind, queue)"
    + events.ctes(data_sql="jsonb_build_object('state', state, 'kind', kind)")
    + " SELECT count(*) FROM n"
)


def _fill(template: Any, values: Mapping[str, str]) -> Any:
    """The template with `{column}` placeholders replaced; KeyError names an unknown column."""
    if isinstance(template, dict):
        return {key: _fill(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [_fill(value, values) for value in template]
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template)
        if whole:
            return values[whole.group(1)]
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return template


def _is_http_url(url: str) -> bool:
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        return False
    return len(url) <= 2000
