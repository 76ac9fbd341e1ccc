"""The endpoints of /api/v1/: parse, call one public function of `jobs`, render."""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

import pydantic
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from ninja import Header, Query, Router, Status
from pydantic import WithJsonSchema

from jobs import services
from jobs.api import pagination
from jobs.api.auth import require
from jobs.api.parsing import MAX_BATCH_BODY, check_length, check_text, loads, read_body, require_media_type
from jobs.api.problems import PROBLEM_JSON, PROBLEMS, TYPE_BASE, Problem, pydantic_errors
from jobs.api.schemas import (
    BatchCsvForm,
    BatchIn,
    BatchOut,
    BatchPage,
    BatchPatch,
    Count,
    DeadFilters,
    DeadSelection,
    EventFilters,
    EventOut,
    JobDetailOut,
    JobFilters,
    JobOut,
    JobPage,
    JobSelection,
    Page,
    ProblemType,
    QueuePatch,
    QueueStatsOut,
    RetrySelection,
    SubmitJobIn,
    UsageOut,
)
from jobs.engine.representation import batch_out, job_detail_out, job_out, tokens_out

router = Router()

READ, SUBMIT, OPERATE = require("read"), require("submit"), require("operate")
# Its length is documented, not enforced by django-ninja (that would be a
# 422): a bad key is a 400, from _idempotency_key.
KeyText = Annotated[str, WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 255})]
IdempotencyKey = Header(
    None,
    alias="Idempotency-Key",
    description="1-255 characters. The same key with the same body answers the first job again (200, "
    "`Idempotent-Replayed: true`); with another body it is a 422.",
)


def _doc(*statuses: int, created: bool = False, body: dict | None = None) -> dict[str, Any]:
    """OpenAPI extras: the operation's problem responses, and its headers."""
    # Integer keys, as django-ninja's own: its deep merge then joins the two.
    responses: dict[int, Any] = {
        status: {
            "description": " / ".join(title for s, title, _ in PROBLEMS.values() if s == status),
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/ProblemOut"}}},
        }
        for status in (*statuses, 401, 403, 422, 500, 503)
    }
    if created:
        responses[202] = {"headers": {"Location": {"schema": {"type": "string"}, "description": "The new resource."}}}
        responses[200] = {
            "headers": {
                "Idempotent-Replayed": {
                    "schema": {"type": "string", "enum": ["true"]},
                    "description": "The answer of an earlier request with the same Idempotency-Key.",
                }
            }
        }
    extra: dict[str, Any] = {"responses": responses}
    if body:
        extra["requestBody"] = body
    return extra


# --- jobs ----------------------------------------------------------------


@router.post(
    "/jobs",
    auth=SUBMIT,
    response={202: JobDetailOut, 200: JobDetailOut},
    openapi_extra=_doc(400, 413, 415, created=True),
)
def submit_job(
    request: HttpRequest, body: SubmitJobIn, response: HttpResponse, idempotency_key: KeyText | None = IdempotencyKey
):
    """Submit a job. 202 with the job; 200 when the Idempotency-Key was seen with the same body."""
    submitted = services.submit_job(
        body.kind,
        body.payload,
        **body.options(),
        **body.workflow(),
        idempotency_key=_idempotency_key(idempotency_key),
        owner=request.auth.owner,
        visible_to=request.auth.visible_owner,
    )
    job = submitted.job
    response["Location"] = reverse("api-v1:get_job", args=[job.id])
    if not submitted.created:
        response["Idempotent-Replayed"] = "true"
        return Status(200, job_detail_out(job))
    return Status(202, job_detail_out(job, attempts=[]))


@router.get("/jobs", auth=READ, response=JobPage, openapi_extra=_doc())
def list_jobs(request: HttpRequest, filters: Query[JobFilters]):
    """Jobs, newest first, a page at a time."""
    rows = services.page_jobs(
        state=filters.state,
        queue=filters.queue,
        kind=filters.kind,
        batch=filters.batch,
        owner=request.auth.visible_owner,
        before=pagination.decode(filters.cursor),
        limit=filters.limit + 1,
    )
    jobs, next_cursor = pagination.page(rows, filters.limit)
    return {"items": [job_out(job) for job in jobs], "next_cursor": next_cursor}


# Before /jobs/{job_id}: django-ninja matches paths in order.
@router.post("/jobs/cancel", auth=OPERATE, response=Count, openapi_extra=_doc(400, 413, 415))
def cancel_jobs(request: HttpRequest, body: JobSelection):
    """Cancel jobs by `ids` or by `filter` {state, kind, queue, batch, since}: waiting ones at once,
    running ones at their next check. An API key acts on its own jobs only. Returns how many."""
    return {"count": services.cancel_matching(_job_selection(request, body), actor=request.auth.actor)}


@router.post("/jobs/retry", auth=OPERATE, response=Count, openapi_extra=_doc(400, 413, 415))
def retry_jobs(request: HttpRequest, body: RetrySelection):
    """Queue again the dead jobs a `filter` {kind, queue, batch, since} names (e.g. every dead job of a
    kind since a time). An API key acts on its own jobs only. Returns how many."""
    return {"count": services.retry_matching(_job_selection(request, body), actor=request.auth.actor)}


@router.get("/jobs/{job_id}", auth=READ, response=JobDetailOut, openapi_extra=_doc(404))
def get_job(request: HttpRequest, job_id: UUID):
    """A job with its attempts, their streamed text (`output`) and log lines."""
    return job_detail_out(services.get_job(job_id, owner=request.auth.visible_owner))


@router.get("/jobs/{job_id}/events", auth=READ, response=list[EventOut], openapi_extra=_doc(404))
def job_events(request: HttpRequest, job_id: UUID, filters: Query[EventFilters]):
    """The job's events, oldest first (those after the event id `after`)."""
    job = services.get_job(job_id, owner=request.auth.visible_owner)
    return [
        {"id": e.id, "type": e.type, "data": e.data, "created_at": e.created_at}
        for e in services.job_events(job.id, after=filters.after)
    ]


@router.post("/jobs/{job_id}/cancel", auth=OPERATE, response={202: JobOut}, openapi_extra=_doc(404, 409))
def cancel_job(request: HttpRequest, job_id: UUID):
    """Cancel a waiting job; ask a running one to stop (it stays running until it does). 409 once finished."""
    return Status(202, job_out(services.cancel_job(job_id, actor=request.auth.actor)))


@router.post("/jobs/{job_id}/retry", auth=OPERATE, response={202: JobOut}, openapi_extra=_doc(404, 409))
def retry_job(request: HttpRequest, job_id: UUID):
    """Queue a dead or cancelled job again. 409 in any other state."""
    return Status(202, job_out(services.retry_job(job_id, actor=request.auth.actor)))


# --- dead-letter queue ---------------------------------------------------


@router.get("/dlq", auth=READ, response=JobPage, openapi_extra=_doc())
def list_dead_jobs(request: HttpRequest, filters: Query[DeadFilters]):
    """Dead jobs, newest first, a page at a time."""
    rows = services.page_jobs(
        state="dead",
        queue=filters.queue,
        kind=filters.kind,
        error_type=filters.error_type,
        owner=request.auth.visible_owner,
        before=pagination.decode(filters.cursor),
        limit=filters.limit + 1,
    )
    jobs, next_cursor = pagination.page(rows, filters.limit)
    return {"items": [job_out(job) for job in jobs], "next_cursor": next_cursor}


@router.post("/dlq/retry", auth=OPERATE, response=Count, openapi_extra=_doc(400, 413, 415))
def retry_dead_jobs(request: HttpRequest, body: DeadSelection):
    """Retry dead jobs by id (cancelled ones too) or by filter; returns how many were queued."""
    return {"count": services.retry_jobs(actor=request.auth.actor, **_selection(body))}


@router.post("/dlq/discard", auth=OPERATE, response=Count, openapi_extra=_doc(400, 413, 415))
def discard_dead_jobs(request: HttpRequest, body: DeadSelection):
    """Discard dead jobs by id or by filter; returns how many were discarded."""
    return {"count": services.discard_jobs(actor=request.auth.actor, **_selection(body))}


# --- queues --------------------------------------------------------------


@router.get("/queues", auth=READ, response=list[QueueStatsOut], openapi_extra=_doc())
def queues(request: HttpRequest):
    """Per queue: jobs by state, age of the oldest runnable job, the last minute's throughput,
    and its operator controls (`paused`, `max_running`)."""
    return services.queue_stats(always=[settings.CONVEYOR["DEFAULT_QUEUE"]])


def _queue_out(name: str) -> dict[str, Any]:
    (stats,) = [q for q in services.queue_stats(always=[name]) if q["queue"] == name]
    return stats


def _control(action, name: str, *args) -> dict[str, Any]:
    try:
        action(name, *args)
    except services.QueueError as exc:
        raise Problem("validation-error", str(exc), errors=[{"field": exc.field, "message": str(exc)}]) from None
    return _queue_out(name)


@router.post("/queues/{queue}/pause", auth=OPERATE, response=QueueStatsOut, openapi_extra=_doc())
def pause_queue(request: HttpRequest, queue: str):
    """Pause a queue: no cluster claims its jobs (running ones finish); submissions are accepted and wait."""
    return _control(services.pause_queue, queue)


@router.post("/queues/{queue}/resume", auth=OPERATE, response=QueueStatsOut, openapi_extra=_doc())
def resume_queue(request: HttpRequest, queue: str):
    """Resume a paused queue: its waiting jobs are picked up at once."""
    return _control(services.resume_queue, queue)


@router.patch("/queues/{queue}", auth=OPERATE, response=QueueStatsOut, openapi_extra=_doc(400, 415))
def update_queue(request: HttpRequest, queue: str, body: QueuePatch):
    """Set `max_running` (an integer >= 1, or null for no limit): at most that many of the queue's jobs
    run at once, across every cluster and host."""
    return _control(services.set_max_running, queue, body.max_running)


# --- operator actions on many jobs ---------------------------------------


def _own(request: HttpRequest) -> str | None:
    """Bulk actions touch only an API key's own jobs; a dashboard session acts on all."""
    return request.auth.owner if request.auth.owner.startswith("apikey:") else None


def _job_selection(request: HttpRequest, body: JobSelection | RetrySelection) -> services.Selection:
    ids = getattr(body, "ids", None)
    if ids is not None:
        return services.Selection(ids=ids, owner=_own(request))
    return services.Selection(**body.filter.model_dump(exclude_none=True), owner=_own(request))


@router.post("/jobs/{job_id}/run-now", auth=OPERATE, response={202: JobOut}, openapi_extra=_doc(404, 409))
def run_job_now(request: HttpRequest, job_id: UUID):
    """Run a scheduled or retrying job now (without waiting for its time). 409 in any other state."""
    owner = request.auth.visible_owner
    return Status(202, job_out(services.run_job_now(job_id, owner=owner, actor=request.auth.actor)))


@router.post("/batches/{batch_id}/cancel", auth=OPERATE, response=Count, openapi_extra=_doc(404))
def cancel_batch(request: HttpRequest, batch_id: UUID):
    """Cancel every unfinished job of a batch; returns how many. An API key cancels its own batches only."""
    return {"count": services.cancel_batch(batch_id, owner=_own(request), actor=request.auth.actor)}


# --- batches -------------------------------------------------------------

_BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/BatchIn"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/BatchCsvUpload"}},
    },
}


@router.post(
    "/batches",
    auth=SUBMIT,
    response={202: BatchOut, 200: BatchOut},
    openapi_extra=_doc(400, 413, 415, created=True, body=_BATCH_BODY),
)
def submit_batch(request: HttpRequest, response: HttpResponse, idempotency_key: KeyText | None = IdempotencyKey):
    """Submit up to 10,000 jobs at once: all are created, or none (422 naming each bad row).

    JSON: `{"name", "jobs": [job, …]}`. Or multipart/form-data with a CSV `file`
    (first row names the columns), `name`, `kind` and an optional
    `payload_template`. Up to 20 MiB.
    """
    key = _idempotency_key(idempotency_key)
    # Parsing 10,000 jobs makes as many short-lived objects as submitting them.
    with services.gc_paused():
        if require_media_type(request, "application/json", "multipart/form-data") == "application/json":
            body = _validate(BatchIn, loads(read_body(request, limit=MAX_BATCH_BODY)))
            name, callback_url, label = body.name, body.callback_url, "jobs[{}]".format
            # One dump of the list, not one per job (large batches).
            jobs = body.model_dump(include={"jobs"})["jobs"]
            budget = {"token_budget": body.token_budget}
            if body.then is not None:
                budget["then"] = body.then.model_dump()
        else:
            form, jobs = _csv_jobs(request)
            # rows[1] is the first row after the header, as jobs_from_csv counts.
            name, callback_url, label = form.name, form.callback_url, lambda index: f"rows[{index + 1}]"
            budget = {}
        submitted = services.submit_batch(
            name, jobs, owner=request.auth.owner, callback_url=callback_url, idempotency_key=key, label=label, **budget
        )
    batch = submitted.batch
    response["Location"] = reverse("api-v1:get_batch", args=[batch.id])
    if not submitted.created:
        response["Idempotent-Replayed"] = "true"
    return Status(202 if submitted.created else 200, batch_out(batch))


@router.get("/batches", auth=READ, response=BatchPage, openapi_extra=_doc())
def list_batches(request: HttpRequest, filters: Query[Page]):
    """Batches, newest first, a page at a time."""
    rows = services.page_batches(
        owner=request.auth.visible_owner, before=pagination.decode(filters.cursor), limit=filters.limit + 1
    )
    batches, next_cursor = pagination.page(rows, filters.limit)
    progress = services.batch_progress(batches)
    return {"items": [batch_out(b, progress[b.id]) for b in batches], "next_cursor": next_cursor}


@router.get("/batches/{batch_id}", auth=READ, response=BatchOut, openapi_extra=_doc(404))
def get_batch(request: HttpRequest, batch_id: UUID):
    """A batch with its jobs counted by state."""
    return batch_out(services.get_batch(batch_id, owner=request.auth.visible_owner))


@router.patch("/batches/{batch_id}", auth=OPERATE, response=BatchOut, openapi_extra=_doc(400, 404, 415))
def update_batch(request: HttpRequest, batch_id: UUID, body: BatchPatch):
    """Change a batch's `token_budget` (null removes it); jobs waiting on a spent budget run at once if it leaves room."""
    return batch_out(services.set_batch_budget(batch_id, body.token_budget, actor=request.auth.actor))


@router.get("/usage", auth=READ, response=UsageOut, openapi_extra=_doc())
def usage(request: HttpRequest):
    """Tokens used by what this API key submitted: in all, and per day for the last 30 days."""
    used = services.owner_usage(request.auth.owner)
    return {
        "owner": used.owner,
        **tokens_out(used.total),
        "requests": used.total.requests,
        "days": [{"day": day, "requests": u.requests, **tokens_out(u)} for day, u in used.days],
    }


# --- problem types -------------------------------------------------------


@router.get("/problems/{code}", response=ProblemType, openapi_extra={"responses": {404: _doc(404)["responses"][404]}})
def problem_type(request: HttpRequest, code: str):
    """What a problem `type` means (the `type` of every error points here)."""
    if code not in PROBLEMS:
        raise Problem("not-found", f"No problem type {code!r}.")
    status, title, description = PROBLEMS[code]
    return {"type": TYPE_BASE + code, "title": title, "status": status, "description": description}


# --- parsing helpers -----------------------------------------------------


def _idempotency_key(value: str | None) -> str | None:
    if value is not None and not 1 <= len(value) <= 255:
        raise Problem(
            "invalid-idempotency-key",
            f"The Idempotency-Key header must be 1-255 characters; it has {len(value)}.",
            errors=[{"field": "header.Idempotency-Key", "message": "must be 1-255 characters"}],
        )
    return value


def _selection(body: DeadSelection) -> dict[str, Any]:
    if body.ids is not None:
        return {"ids": body.ids}
    return body.filter.model_dump(exclude_none=True)


def _validate(model: type[pydantic.BaseModel], data: Any):
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise Problem("validation-error", "Some fields are invalid.", errors=pydantic_errors(exc.errors())) from None


def _csv_jobs(request: HttpRequest) -> tuple[BatchCsvForm, list[dict[str, Any]]]:
    """The form and jobs of a CSV batch upload."""
    check_length(request, limit=MAX_BATCH_BODY)  # files are streamed to disk, fields capped by Django
    fields = {name: request.POST[name] for name in request.POST if name != "file"}
    check_text(fields)
    form = _validate(BatchCsvForm, fields)
    upload = request.FILES.get("file")
    if upload is None:
        raise Problem("invalid-batch", "No CSV file.", errors=[{"field": "file", "message": "is required"}])
    try:
        text = upload.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise Problem(
            "invalid-batch",
            "The CSV file is not UTF-8 text.",
            errors=[{"field": "file", "message": "must be UTF-8 text without NUL characters"}],
        )
    template = None
    if form.payload_template is not None:
        try:
            template = loads(form.payload_template)
        except Problem:
            template = None
        if not isinstance(template, dict):
            raise Problem(
                "invalid-batch",
                "The payload template is not a JSON object.",
                errors=[{"field": "payload_template", "message": "must be a JSON object"}],
            )
    options = form.model_dump(include={"queue", "priority", "max_attempts"}, exclude_none=True)
    return form, services.jobs_from_csv(text, kind=form.kind, payload_template=template, **options)
