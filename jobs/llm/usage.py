"""Token accounting and batch token budgets: what entry points read and change.

The counting itself happens where a provider call ends (`jobs.llm.limits.release`
adds the call's tokens to its job, the job's batch and its owner's daily row, in
one statement); the budget is checked where a call starts (`limits.acquire`).
A job of a batch whose budget is spent waits in `retrying`, its attempt not
counted, with the error "token budget exhausted…" as its visible reason, and
looks again after an hour; `set_batch_budget` wakes the batch's waiting jobs at
once when the new budget leaves room (or is removed). Calls already in flight
when the budget runs out finish, so a batch can overshoot by what they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta
from uuid import UUID

from django.db.models import Sum
from django.db.models.functions import Now
from django.utils import timezone

from jobs.engine import states
from jobs.engine.batches import check_budget, get_batch
from jobs.models import Batch, Job, State, TokenUsage

BUDGET_ERROR_TYPE = "TokenBudgetExhausted"  # the error type of a job waiting on its batch's budget


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class OwnerUsage:
    owner: str
    total: Usage
    days: list[tuple[date, Usage]]  # newest first


def set_batch_budget(batch_id: UUID | str, token_budget: int | None, *, actor: str = "") -> Batch:
    """Set (or remove, with None) a batch's token budget; if it now leaves room, the
    jobs waiting on it become due at once. Raises BatchNotFound or InvalidBatch."""
    token_budget = check_budget(token_budget)
    batch = get_batch(batch_id)
    Batch.objects.filter(id=batch.id).update(token_budget=token_budget)
    batch.refresh_from_db()
    if token_budget is None or batch.tokens_used < token_budget:
        reason = f"token budget {'removed' if token_budget is None else f'raised to {token_budget}'}"
        states.resume_waiting(
            batch_id=batch.id, error_type=BUDGET_ERROR_TYPE, reason=reason + (f" by {actor}" if actor else "")
        )
    return batch


def waiting_on_budget(batch_id: UUID | str) -> int:
    """How many of the batch's jobs wait for its token budget to be raised (not yet woken)."""
    return Job.objects.filter(
        batch_id=batch_id, state=State.RETRYING, error_type=BUDGET_ERROR_TYPE, run_after__gt=Now()
    ).count()


def owner_usage(owner: str, *, days: int = 30) -> OwnerUsage:
    """Tokens used by an owner (an API key's `apikey:<id>`): in all, and per day for the last `days`."""
    rows = TokenUsage.objects.filter(owner=owner)
    total = rows.aggregate(p=Sum("prompt_tokens"), c=Sum("completion_tokens"), r=Sum("requests"))
    since = timezone.now().date() - timedelta(days=days - 1)
    recent = [
        (row.day, Usage(row.prompt_tokens, row.completion_tokens, row.requests))
        for row in rows.filter(day__gte=since).order_by("-day")
    ]
    return OwnerUsage(owner, Usage(total["p"] or 0, total["c"] or 0, total["r"] or 0), recent)
