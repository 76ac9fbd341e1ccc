"""What a job and a batch look like from outside: the REST API shows them so
(GET /api/v1/jobs/{id}, /batches/{id}) and webhook messages carry them, so
both jobs.api and jobs.webhooks take them from here."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from ninja import Field, Schema

from jobs.engine.batches import BatchProgress, batch_progress
from jobs.models import Attempt, Batch, Job, State


class Progress(Schema):
    percent: int
    message: str


class ErrorOut(Schema):
    type: str
    message: str


class AttemptOut(Schema):
    number: int
    outcome: str = Field(description="succeeded, failed, lost, cancelled, or running.")
    started_at: datetime
    finished_at: datetime | None
    error: ErrorOut | None


class AttemptDetailOut(AttemptOut):
    output: str = Field(description="Text the attempt streamed: so far while it runs; kept when it failed or was lost.")
    logs: list[str] = Field(description="Lines its handler logged (the last 1,000 lines, at most 64 KiB).")


class TokensOut(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class JobOut(Schema):
    id: UUID
    kind: str
    queue: str
    state: State
    priority: int
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    progress: Progress
    result: Any = Field(description="What the handler returned (any JSON), once it succeeded.")
    error: ErrorOut | None
    idempotency_key: str | None
    callback_url: str | None
    batch: UUID | None
    run_after: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt_history: list[AttemptOut]
    usage: TokensOut = Field(description="Tokens of every provider call the job made, failed attempts included.")


class JobDetailOut(JobOut):
    """A job as `GET /jobs/{id}` shows it: with the text and log lines of its attempts."""

    output: str = Field(description="The latest attempt's text: so far while it streams, else its final text.")
    attempt_history: list[AttemptDetailOut]


class BatchOut(Schema):
    id: UUID
    name: str
    total: int
    counts: dict[str, int] = Field(description="Jobs by state; every state is present.")
    done: bool = Field(description="Every job has finished.")
    callback_url: str | None
    created_at: datetime
    finished_at: datetime | None
    tokens_used: int = Field(description="Prompt and completion tokens of the batch's provider calls.")
    usage: TokensOut
    token_budget: int | None
    budget_exhausted: bool = Field(description="The budget is used up: the batch's remaining jobs wait.")


# --- rendering -----------------------------------------------------------


def job_out(job: Job, *, attempts: list[Attempt] | None = None) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": job.kind,
        "queue": job.queue,
        "state": job.state,
        "priority": job.priority,
        "payload": job.payload,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "progress": {"percent": job.progress_percent, "message": job.progress_message},
        "result": job.result,
        "error": error_out(job.error_type, job.error_message),
        "idempotency_key": job.idempotency_key,
        "callback_url": job.callback_url or None,
        "batch": job.batch_id,
        "run_after": job.run_after,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "attempt_history": [attempt_out(a) for a in (job.attempt_set.all() if attempts is None else attempts)],
        "usage": tokens_out(job),
    }


def job_detail_out(job: Job, *, attempts: list[Attempt] | None = None) -> dict[str, Any]:
    """`job_out` with each attempt's output and logs, and the latest attempt's output."""
    attempts = sorted(job.attempt_set.all() if attempts is None else attempts, key=lambda a: a.number)
    body = job_out(job, attempts=attempts)
    body["attempt_history"] = [
        {**attempt_out(a), "output": a.output, "logs": a.logs.splitlines() if a.logs else []} for a in attempts
    ]
    body["output"] = attempts[-1].output if attempts else ""
    return body


def batch_out(batch: Batch, progress: BatchProgress | None = None) -> dict[str, Any]:
    progress = progress or batch_progress([batch])[batch.id]
    return {
        "id": batch.id,
        "name": batch.name,
        "total": batch.total,
        "counts": progress.counts,
        "done": progress.done,
        "callback_url": batch.callback_url or None,
        "created_at": batch.created_at,
        "finished_at": progress.finished_at,
        "tokens_used": batch.tokens_used,
        "usage": tokens_out(batch),
        "token_budget": batch.token_budget,
        "budget_exhausted": batch.token_budget is not None and batch.tokens_used >= batch.token_budget,
    }


def tokens_out(used: Any) -> dict[str, int]:
    return {
        "prompt_tokens": used.prompt_tokens,
        "completion_tokens": used.completion_tokens,
        "total_tokens": used.prompt_tokens + used.completion_tokens,
    }


def attempt_out(attempt: Attempt) -> dict[str, Any]:
    return {
        "number": attempt.number,
        "outcome": attempt.outcome or "running",
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
        "error": error_out(attempt.error_type, attempt.error_message),
    }


def error_out(error_type: str, message: str) -> dict[str, str] | None:
    return {"type": error_type, "message": message} if error_type or message else None
