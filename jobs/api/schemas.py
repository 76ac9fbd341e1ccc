"""What the API accepts and returns (they make the OpenAPI document).

Inputs are plain pydantic models: django-ninja's Schema adds a getter for
reading ORM objects, which only outputs need and which is costly when a
large batch is validated. Input rules repeat the engine's (`jobs.engine.submission.prepare_job`) so that the
contract says them; the engine still checks everything, and has the last word
on what depends on the kind (the payload) or on the clock (run_after).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from ninja import Field, Schema
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, model_validator

from jobs.engine.batches import MAX_JOBS
from jobs.engine.representation import (  # noqa: F401 - the API's names for the representation's schemas
    AttemptDetailOut,
    AttemptOut,
    BatchOut,
    ErrorOut,
    JobDetailOut,
    JobOut,
    Progress,
    TokensOut,
)
from jobs.engine.submission import MAX_BACKOFF, QUEUE_NAME
from jobs.models import State


def _utc(value: datetime) -> datetime:
    # A time Postgres stores but Python cannot read back (before year 1 in
    # UTC) would break every later read of the job.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


StrictInt = Annotated[int, Field(strict=True)]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
Seconds = Annotated[float, Field(strict=True, gt=0, le=MAX_BACKOFF)]
QueueName = Annotated[str, Field(pattern=QUEUE_NAME.pattern)]
Kind = Annotated[str, Field(min_length=1, max_length=100)]


class FieldError(Schema):
    field: str
    message: str


class ProblemOut(Schema):
    """RFC 9457 problem details."""

    type: str = Field(description="Ends with the problem's code, e.g. `/api/v1/problems/idempotency-key-reused`.")
    title: str
    status: int
    detail: str
    errors: list[FieldError] = Field(description="Each invalid field with its path, e.g. `jobs[3].payload.seconds`.")


# --- jobs ----------------------------------------------------------------


class JobIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"kind": "demo.sleep", "payload": {"seconds": 1}, "priority": 5}]},
    )

    kind: Kind
    payload: dict[str, Any] = Field(description="Checked against the kind's payload schema.")
    queue: QueueName | None = Field(None, description="Default: the kind's queue.")
    priority: StrictInt = Field(0, ge=-1000, le=1000, description="Higher runs first.")
    run_after: UtcDatetime | None = Field(None, description="Not before this time (at most a year ahead).")
    max_attempts: StrictInt | None = Field(None, ge=1, le=50, description="Default: the kind's.")
    backoff_base: Seconds | None = Field(None, description="Seconds before the first retry (default 2).")
    backoff_max: Seconds | None = Field(None, description="Upper bound of a retry delay (default 600).")
    callback_url: str = Field("", max_length=2000, description="http(s) URL called when the job finishes.")

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `submit_job` and `prepare_job` this body gives."""
        return {
            "queue": self.queue,
            "priority": self.priority,
            "run_after": self.run_after,
            "max_attempts": self.max_attempts,
            "backoff_base": self.backoff_base,
            "backoff_max": self.backoff_max,
            "callback_url": self.callback_url,
        }


class SubmitJobIn(JobIn):
    """A single job's submission: a job and, for workflows, what it waits for.
    (The fast intake ahead of Django takes only plain `JobIn` bodies.)"""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"kind": "demo.sleep", "payload": {"seconds": 1}, "depends_on": []}]},
    )

    depends_on: list[str] = Field(
        default_factory=list,
        max_length=10_000,
        description="Ids of jobs this one waits for: it is created `waiting` and queued when the last has finished.",
    )
    on_dependency_failure: Literal["cancel", "run"] = Field(
        "cancel", description="When a dependency ends dead, cancelled or discarded: cancel this job, or run it anyway."
    )

    def workflow(self) -> dict[str, Any]:
        return {"depends_on": self.depends_on, "on_dependency_failure": self.on_dependency_failure}


class JobPage(Schema):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last one.")


class Page(Schema):
    limit: int = Field(50, ge=1, le=500)
    cursor: str | None = Field(None, max_length=200, description="`next_cursor` of the previous page.")


class JobFilters(Page):
    state: State | None = None
    queue: str | None = Field(None, max_length=100)
    kind: str | None = Field(None, max_length=100)
    batch: UUID | None = None


class DeadFilters(Page):
    queue: str | None = Field(None, max_length=100)
    kind: str | None = Field(None, max_length=100)
    error_type: str | None = Field(None, max_length=200)


class EventOut(Schema):
    id: int
    type: str
    data: dict[str, Any]
    created_at: datetime


class EventFilters(Schema):
    after: int = Field(0, ge=0, le=2**63 - 1, description="Only events with a larger id.")


# --- dead-letter queue ---------------------------------------------------


class DeadFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue: str | None = Field(None, max_length=100)
    kind: str | None = Field(None, max_length=100)
    error_type: str | None = Field(None, max_length=200)


class DeadSelection(BaseModel):
    """Either `ids` or `filter` (`{}` selects every dead job)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[UUID] | None = Field(None, max_length=MAX_JOBS)
    filter: DeadFilter | None = None

    @model_validator(mode="after")
    def _one_of(self) -> DeadSelection:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give either ids or filter")
        return self


class Count(Schema):
    count: int


class QueueStatsOut(Schema):
    queue: str
    waiting: int = Field(description="Jobs waiting on their dependencies (`depends_on`).")
    queued: int
    scheduled: int
    running: int
    retrying: int
    dead: int
    oldest_queued_age_seconds: float | None
    succeeded_last_minute: int
    failed_last_minute: int
    paused: bool = Field(description="Nothing of the queue is claimed; running jobs finish, submissions wait.")
    max_running: int | None = Field(description="At most this many of its jobs run at once; null: no limit.")


# --- batches -------------------------------------------------------------


_BUDGET = (
    "Tokens the batch's LLM calls may use; once used, its remaining jobs wait (retrying, "
    'error "token budget exhausted") until the budget is raised. Null: no limit.'
)
TokenBudget = Annotated[int, Field(strict=True, ge=1, le=10**15)]


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    callback_url: str = Field("", max_length=2000)
    jobs: list[JobIn] = Field(min_length=1, max_length=MAX_JOBS)
    token_budget: TokenBudget | None = Field(None, description=_BUDGET)
    then: JobIn | None = Field(
        None,
        description="A job queued once every job of the batch has finished (whatever their outcome);"
        " its handler reads the batch's counts with `ctx.batch_counts()`.",
    )


class BatchCsvForm(BaseModel):
    """multipart/form-data fields of a CSV batch (the file is `file`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    kind: Kind
    payload_template: str | None = Field(
        None,
        description='JSON object; "{column}" in its strings is filled from each row. '
        "Without it, each row is the payload ({column: cell}).",
    )
    queue: QueueName | None = None
    priority: int = Field(0, ge=-1000, le=1000)
    max_attempts: int | None = Field(None, ge=1, le=50)
    callback_url: str = Field("", max_length=2000)


class BatchPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token_budget: TokenBudget | None = Field(description=_BUDGET)


class DayUsageOut(Schema):
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageOut(Schema):
    owner: str = Field(description='Whose usage: "apikey:<id>" for an API key.')
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    days: list[DayUsageOut] = Field(description="The last 30 days with any usage, newest first.")


class BatchPage(Schema):
    items: list[BatchOut]
    next_cursor: str | None


class ProblemType(Schema):
    type: str
    title: str
    status: int
    description: str


# --- operator controls -----------------------------------------------------


class QueuePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_running: int | None = Field(
        ...,
        ge=1,
        strict=True,
        description="At most this many jobs of the queue at once, on every cluster; null: no limit.",
    )


class JobSelectionFilter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: State | None = None
    kind: str | None = Field(None, max_length=100)
    queue: str | None = Field(None, max_length=100)
    batch: UUID | None = None
    since: datetime | None = Field(None, description="Jobs whose last change is at or after this time.")


class JobSelection(BaseModel):
    """Either `ids` or `filter` (`{}` selects every job the caller may act on)."""

    model_config = ConfigDict(extra="forbid")

    ids: list[UUID] | None = Field(None, max_length=MAX_JOBS)
    filter: JobSelectionFilter | None = None

    @model_validator(mode="after")
    def _one_of(self) -> JobSelection:
        if (self.ids is None) == (self.filter is None):
            raise ValueError("give either ids or filter")
        return self


class RetrySelection(BaseModel):
    """A filter of dead jobs to queue again."""

    model_config = ConfigDict(extra="forbid")

    filter: JobSelectionFilter
