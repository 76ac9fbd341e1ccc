"""Per-provider limits that hold across every worker on every host, kept in Postgres.

- **Concurrency**: a provider has `max_concurrency` rows in `jobs_providerslot`. A
  call holds one while it runs. A slot is free when nobody holds it, when its hard
  expiry (the provider's total timeout plus a margin) has passed, or when the job
  holding it is no longer running under the same worker's live lease: a killed
  worker's slots free themselves as soon as its jobs' leases expire, with no sweep.
- **Requests per minute**: a token bucket in `jobs_providerrate`, refilled at
  `requests_per_minute / 60` tokens a second and holding at most one second's worth
  (at least one token), so calls are spread evenly rather than sent in bursts.
- **Token budget** of the job's batch: no call starts once the batch has used it.

`acquire` checks all three and takes a slot and a request token in one statement
(one round trip): the slot is taken only with the token, the token only with the
slot. The slot row is locked `FOR UPDATE SKIP LOCKED`, and the bucket's UPDATE
re-checks its condition against the row a concurrent call committed, so two
workers never share a slot or a token. `release` frees the slot and adds the
call's tokens to the job, its batch and its owner's daily usage, also in one
statement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from uuid import UUID

from django.db import connection

from jobs.db import sql
from jobs.errors import RetryableError
from jobs.llm.providers import Provider

# A slot outlives the longest possible call by this much before it frees itself
# regardless of its holder (calls without a job: tests, shells).
HOLD_MARGIN_SECONDS = 60


@dataclass(frozen=True)
class Permit:
    provider: str
    slot: int
    job_id: UUID | None
    worker: str


@dataclass(frozen=True)
class Refusal:
    """No call now. `budget_spent`: the batch's token budget is used up (with `used`
    and `budget`); otherwise the provider is at a limit and `wait` seconds is the
    estimate of when capacity frees (`reason` says which limit)."""

    reason: str
    wait: float = 0.0
    budget_spent: bool = False
    used: int = 0
    budget: int | None = None


_FREE = """
(s.expires_at IS NULL OR s.expires_at <= now() OR (s.job_id IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM jobs_job j WHERE j.id = s.job_id AND j.state = 'running'
    AND j.lease_owner = s.worker AND j.lease_expires_at > now())))
"""

_REFILLED = "least(%(burst)s, tokens + greatest(0, extract(epoch FROM statement_timestamp() - refilled_at)) * %(rate)s)"

_ACQUIRE = f"""
WITH budget AS (
    SELECT token_budget IS NOT NULL AND prompt_tokens + completion_tokens >= token_budget AS spent,
           prompt_tokens + completion_tokens AS used, token_budget
    FROM jobs_batch WHERE id = %(batch)s
), idle AS (
    -- A slot nobody holds first: found without looking at the jobs of the
    -- held ones, which with hundreds held was most of each call's cost.
    SELECT s.id FROM jobs_providerslot s
    WHERE s.provider = %(provider)s AND s.slot < %(slots)s AND s.expires_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM budget WHERE spent)
    ORDER BY s.slot LIMIT 1 FOR UPDATE SKIP LOCKED
), stale AS (
    -- Only when none is idle: a hold that expired or whose holder is gone.
    SELECT s.id FROM jobs_providerslot s
    WHERE NOT EXISTS (SELECT 1 FROM idle)
      AND s.provider = %(provider)s AND s.slot < %(slots)s AND {_FREE}
      AND NOT EXISTS (SELECT 1 FROM budget WHERE spent)
    ORDER BY s.slot LIMIT 1 FOR UPDATE SKIP LOCKED
), free AS (
    SELECT id FROM idle UNION ALL SELECT id FROM stale
), bucket AS (
    UPDATE jobs_providerrate SET tokens = {_REFILLED} - 1, refilled_at = greatest(refilled_at, statement_timestamp())
    WHERE provider = %(provider)s AND %(rpm)s > 0 AND EXISTS (SELECT 1 FROM free) AND {_REFILLED} >= 1
    RETURNING provider
), taken AS (
    UPDATE jobs_providerslot s
    SET job_id = %(job)s, worker = %(worker)s, expires_at = now() + make_interval(secs => %(hold)s)
    FROM free WHERE s.id = free.id AND (%(rpm)s = 0 OR EXISTS (SELECT 1 FROM bucket))
    RETURNING s.slot
)
SELECT (SELECT slot FROM taken),
       coalesce((SELECT spent FROM budget), false), (SELECT used FROM budget), (SELECT token_budget FROM budget),
       EXISTS (SELECT 1 FROM free),
       -- What a refusal reports and the check for missing rows (see acquire),
       -- only without a slot: counting the slots read all of them each call,
       -- about half of a granted acquire's execution with 450 held.
       (SELECT {_REFILLED} FROM jobs_providerrate WHERE provider = %(provider)s AND NOT EXISTS (SELECT 1 FROM taken)),
       (SELECT count(*) FROM jobs_providerslot
        WHERE provider = %(provider)s AND slot < %(slots)s AND NOT EXISTS (SELECT 1 FROM taken))
"""

# The provider's slot rows and bucket, created on first use (and when its limit grows).
_ENSURE = """
WITH slots AS (
    INSERT INTO jobs_providerslot (provider, slot, job_id, worker, expires_at)
    SELECT %(provider)s, n, NULL, '', NULL FROM generate_series(0, %(slots)s - 1) AS n
    ON CONFLICT (provider, slot) DO NOTHING RETURNING 1
), bucket AS (
    INSERT INTO jobs_providerrate (provider, tokens, refilled_at) VALUES (%(provider)s, %(burst)s, statement_timestamp())
    ON CONFLICT (provider) DO NOTHING RETURNING 1
)
SELECT (SELECT count(*) FROM slots), (SELECT count(*) FROM bucket)
"""

# The release's statements (r: the slot freed; j, b, u: the tokens counted),
# also the head of the statement that stores a page and frees its call's slot
# (jobs.llm.handler.store_page).
RELEASE_CTES = """
WITH r AS (
    UPDATE jobs_providerslot SET job_id = NULL, worker = '', expires_at = NULL
    WHERE provider = %(provider)s AND slot = %(slot)s AND worker = %(worker)s
      AND job_id IS NOT DISTINCT FROM %(job)s::uuid
    RETURNING 1
), j AS (
    UPDATE jobs_job SET prompt_tokens = prompt_tokens + %(prompt)s, completion_tokens = completion_tokens + %(completion)s
    WHERE id = %(job)s::uuid AND %(account)s
    RETURNING owner, batch_id
), b AS (
    UPDATE jobs_batch SET prompt_tokens = jobs_batch.prompt_tokens + %(prompt)s,
                          completion_tokens = jobs_batch.completion_tokens + %(completion)s
    FROM j WHERE jobs_batch.id = j.batch_id
    RETURNING 1
), u AS (
    INSERT INTO jobs_tokenusage (owner, day, requests, prompt_tokens, completion_tokens)
    SELECT owner, (now() AT TIME ZONE 'UTC')::date, 1, %(prompt)s, %(completion)s FROM j
    ON CONFLICT (owner, day) DO UPDATE SET requests = jobs_tokenusage.requests + 1,
        prompt_tokens = jobs_tokenusage.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = jobs_tokenusage.completion_tokens + EXCLUDED.completion_tokens
    RETURNING 1
)"""

_RELEASE = RELEASE_CTES + " SELECT (SELECT count(*) FROM r), (SELECT count(*) FROM b), (SELECT count(*) FROM u)"


def rate_of(provider: Provider) -> tuple[float, float]:
    """(tokens a second, bucket size) of the provider's requests-per-minute limit."""
    rpm = provider.requests_per_minute
    if rpm <= 0:
        return 0.0, 1.0
    return rpm / 60, max(1.0, math.floor(rpm / 60))


def acquire(
    provider: Provider, *, job_id: UUID | str | None = None, worker: str = "", batch_id: UUID | str | None = None
) -> Permit | Refusal:
    """A slot and a request token of `provider` for one call, or why not (see the
    module docstring). Synchronous: async handlers call it through `ctx.run_db`."""
    rate, burst = rate_of(provider)
    params = {
        "provider": provider.name,
        "slots": provider.max_concurrency,
        "rpm": provider.requests_per_minute,
        "rate": rate,
        "burst": burst,
        "batch": str(batch_id) if batch_id else None,
        "job": str(job_id) if job_id else None,
        "worker": worker,
        "hold": provider.total_timeout + HOLD_MARGIN_SECONDS,
    }
    for _ in range(2):
        with sql.cursor() as cursor:
            cursor.execute(_ACQUIRE, params)
            slot, spent, used, budget, had_free, tokens, known = cursor.fetchone()
        if slot is not None:
            return Permit(provider.name, slot, UUID(str(job_id)) if job_id else None, worker)
        if spent:
            return Refusal("token budget exhausted", budget_spent=True, used=used, budget=budget)
        if known < provider.max_concurrency or (provider.requests_per_minute > 0 and tokens is None):
            with connection.cursor() as cursor:
                cursor.execute(_ENSURE, params)
            continue
        break
    if had_free:  # a slot was free, the bucket was empty
        return Refusal(
            f"{provider.name}: {provider.requests_per_minute} requests a minute reached",
            wait=max(0.0, (1 - (tokens or 0)) / rate) if rate else 1.0,
        )
    return Refusal(f"{provider.name}: all {provider.max_concurrency} concurrent calls in use", wait=0.0)


def release(permit: Permit, *, prompt_tokens: int = 0, completion_tokens: int = 0, account: bool = True) -> bool:
    """Free the permit's slot and add the call's tokens to its job, the job's batch and
    the owner's daily usage (`account=False`: the call used none worth counting).
    False if the slot was no longer the permit's (it had expired and been taken)."""
    with sql.cursor() as cursor:
        cursor.execute(_RELEASE, release_params(permit, prompt_tokens, completion_tokens, account=account))
        released, _, _ = cursor.fetchone()
    return bool(released)


def release_params(permit: Permit, prompt_tokens: int, completion_tokens: int, *, account: bool = True) -> dict:
    """The parameters of RELEASE_CTES for `release`."""
    return {
        "provider": permit.provider,
        "slot": permit.slot,
        "worker": permit.worker,
        "job": str(permit.job_id) if permit.job_id else None,
        "prompt": int(prompt_tokens),
        "completion": int(completion_tokens),
        "account": bool(account) and permit.job_id is not None,
    }


def in_use(provider_name: str) -> int:
    """How many of the provider's slots are held right now (for the dashboard and tests)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(*) FROM jobs_providerslot s WHERE s.provider = %s AND NOT {_FREE}", [provider_name]
        )
        return cursor.fetchone()[0]


# --- what a job does when refused -------------------------------------------

# A job whose batch has spent its budget waits this long before looking again,
# unless an operator raises the budget first (jobs.llm.usage.set_batch_budget wakes it).
BUDGET_RECHECK_SECONDS = 3600.0


class ProviderBusy(RetryableError):
    """The provider is at its concurrency or requests-per-minute limit: the job
    goes back to waiting until about when capacity frees; the attempt does not count."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, count_attempt=False)


class TokenBudgetExhausted(RetryableError):
    """The job's batch has used its token budget: the job waits (uncounted) until an
    operator raises the budget or cancels it. (Its class name is the error type
    `jobs.llm.usage.BUDGET_ERROR_TYPE` finds waiting jobs by.)"""

    MESSAGE = "token budget exhausted"

    def __init__(self, used: int, budget: int | None) -> None:
        super().__init__(
            f"{self.MESSAGE}: the batch has used {used} of its {budget} tokens; raise the budget or cancel the job",
            retry_after=BUDGET_RECHECK_SECONDS,
            count_attempt=False,
        )
