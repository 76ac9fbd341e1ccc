"""LLM job kinds: `llm.generate` and `content.page`. Both are `async def`, so
they run in the worker process's asyncio lane (jobs/worker/lane.py): one worker
process keeps many provider calls in flight."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
from typing import Literal

from django.utils.text import slugify
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from jobs.db.durability import engine_statements
from jobs.engine.registry import Payload, handler
from jobs.llm.limits import Permit
from jobs.llm.prompts import PromptTooLong, TemplateError, check_length, parse_template, render_prompt

log = logging.getLogger(__name__)

LLM_QUEUE = "llm"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class Fallback(BaseModel):
    """Another provider (and model) to call once the primary has failed `after` times
    with 429, 5xx, a timeout or a connection error."""

    model_config = ConfigDict(extra="forbid")
    provider: str = Field(min_length=1, max_length=100)
    model: str | None = Field(default=None, max_length=200)
    after: int = Field(ge=1, le=50)


class GeneratePayload(Payload):
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=200)
    prompt: str | None = Field(default=None, min_length=1, max_length=200_000)
    model: str | None = Field(default=None, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=32_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    provider: str | None = Field(default=None, max_length=100)
    fallback: Fallback | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either 'messages' or 'prompt', not both and not neither")
        return self

    def chat_messages(self) -> list[dict]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


# How long a job waits inside the lane for provider capacity before it hands its
# lane slot back and returns to `retrying` (uncounted) until capacity should free.
LIMIT_WAIT_SECONDS = 2.0
# The provider failures a fallback counts (attempts' error types; our own limits'
# ProviderBusy and the budget's wait are not the provider failing).
_PROVIDER_FAILURES = ("ProviderThrottled", "ProviderUnavailable")


def _bookkeeping(func):
    """`func` run as the engine's own statements (jobs.db.durability): the
    limits' slot and token rows, and the page a job stores just before its
    success, commit as the worker's transitions do, without each waiting for
    the WAL flush on the lane's one database thread. The order of the WAL
    keeps them safe: when the success that follows is durable, so are they;
    when both are lost, the job runs again and writes them again."""

    def run(*args, **kwargs):
        with engine_statements():
            return func(*args, **kwargs)

    return run


async def _permit(ctx, provider):
    """A permit for one call to `provider` (jobs.llm.limits), waiting a little in the
    lane; raises TokenBudgetExhausted or ProviderBusy (both retried, uncounted)."""
    from jobs.llm import limits

    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIMIT_WAIT_SECONDS
    pause = 0.05
    while True:
        outcome = await ctx.run_db(
            _bookkeeping(limits.acquire), provider, job_id=ctx.job_id, worker=ctx.worker, batch_id=ctx.batch_id
        )
        if isinstance(outcome, limits.Permit):
            return outcome
        if outcome.budget_spent:
            raise limits.TokenBudgetExhausted(outcome.used, outcome.budget)
        pause = max(pause, outcome.wait)
        if loop.time() + pause > deadline:
            # Jitter, so that jobs refused together do not all come back together.
            raise limits.ProviderBusy(outcome.reason, retry_after=outcome.wait + random.uniform(0.5, 2.0))
        ctx.check_cancelled()
        await asyncio.sleep(pause + random.uniform(0, pause / 2))
        pause = min(pause * 2, 0.5)


def _provider_failures(job_id) -> int:
    from jobs.models import Attempt

    return Attempt.objects.filter(
        job_id=job_id, outcome=Attempt.Outcome.FAILED, error_type__in=_PROVIDER_FAILURES
    ).count()


async def _generate(
    ctx, *, provider_name, messages, model, max_tokens, temperature, fallback=None, stream=True, hold=False
) -> tuple[dict, Permit | None]:
    """The call and its answer, and with `hold` the permit of a call that
    answered: its slot still held and its tokens not yet counted, for the
    caller to free and count with its own statement (`store_page`). Any
    other call's slot is freed here."""
    from jobs.llm import limits
    from jobs.llm.client import chat, estimate_tokens
    from jobs.llm.providers import get_provider

    on_fallback = fallback is not None and await ctx.run_db(_provider_failures, ctx.job_id) >= fallback.after
    if on_fallback:
        provider_name, model = fallback.provider, fallback.model
    provider = get_provider(provider_name)
    received: list[str] = []
    budget = max_tokens or 512

    def on_delta(delta: str) -> None:
        received.append(delta)
        text = "".join(received)
        # ~4 characters a token: a rough but monotonic progress estimate.
        percent = min(99, int(100 * (len(text) / 4) / budget))
        ctx.report_progress(percent, f"streaming, {len(text)} characters", output=text)

    permit = await _permit(ctx, provider)
    log.info("calling %s (model %s)%s", provider.name, model, ", the fallback" if on_fallback else "")
    result = None
    try:
        result = await chat(
            provider,
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            stream=stream,
            on_delta=on_delta if stream else None,
        )
    finally:
        # A call cut short still used the tokens it streamed (estimated, as the provider sent no usage).
        if result is not None:
            used = (result.prompt_tokens, result.completion_tokens)
        elif received:
            used = (estimate_tokens(m.get("content") or "" for m in messages), estimate_tokens(received))
        else:
            used = (0, 0)
        if result is None or not hold:
            await ctx.run_db(
                _bookkeeping(limits.release),
                permit,
                prompt_tokens=used[0],
                completion_tokens=used[1],
                account=any(used),
            )
    ctx.output = result.text
    log.info(
        "%s finished (%s): %d prompt + %d completion tokens in %.2f s",
        provider.name,
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
        result.latency_seconds,
    )
    answer = {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        "latency_seconds": round(result.latency_seconds, 3),
        "model": result.model,
        "provider": provider.name,
        "simulated": provider.simulated,
        "fallback": on_fallback,
    }
    return answer, (permit if hold else None)


@handler("llm.generate", schema=GeneratePayload, queue=LLM_QUEUE, max_attempts=5, timeout=900)
async def generate(ctx, payload: GeneratePayload) -> dict:
    """One chat completion, streamed; partial output shows as progress."""
    answer, _ = await _generate(
        ctx,
        provider_name=payload.provider,
        messages=payload.chat_messages(),
        model=payload.model,
        max_tokens=payload.max_tokens,
        temperature=payload.temperature,
        fallback=payload.fallback,
    )
    return answer


class PagePayload(Payload):
    template: str = Field(min_length=1, max_length=20_000, description="Prompt with {column} placeholders.")
    variables: dict[str, str | int | float | None] = Field(default_factory=dict)
    provider: str | None = Field(default=None, max_length=100)
    model: str | None = Field(default=None, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=32_000)
    fallback: Fallback | None = None

    @field_validator("template")
    @classmethod
    def _plain_placeholders(cls, template: str) -> str:
        try:
            parse_template(template)
        except TemplateError as exc:
            raise PydanticCustomError("template", str(exc)) from None
        return template

    @model_validator(mode="after")
    def _template_fits(self):
        pieces = parse_template(self.template)
        missing = sorted({field for _, field in pieces if field is not None} - set(self.variables))
        if missing:
            raise ValueError(f"template names {', '.join(missing)}, missing from variables")
        try:
            check_length(pieces, self.variables)
        except PromptTooLong as exc:
            raise PydanticCustomError("prompt_too_long", f"template and variables {exc}") from None
        return self


def page_from_text(text: str, keyword: str) -> dict:
    """Title, meta description and body from generated Markdown."""
    lines = [line.strip() for line in text.strip().splitlines()]
    heading = next((line.lstrip("#").strip() for line in lines if line), "") or keyword or "Untitled"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip() and not p.strip().startswith("#")]
    meta = (paragraphs[0] if paragraphs else text).replace("\n", " ")
    if len(meta) > 155:
        meta = meta[:152].rsplit(" ", 1)[0] + "…"
    body = text.strip()
    if not body.startswith("#"):
        body = f"# {heading}\n\n{body}"
    return {"title": heading[:300], "meta_description": meta, "body_markdown": body, "word_count": len(body.split())}


_STORE_PAGE = """
INSERT INTO jobs_page (batch_id, slug, job_id, keyword, title, meta_description, body_markdown, word_count,
                       prompt_tokens, completion_tokens, simulated, created_at, updated_at)
VALUES (%(batch)s, %(slug)s, %(job)s, %(keyword)s, %(title)s, %(meta_description)s, %(body_markdown)s,
        %(word_count)s, %(prompt_tokens)s, %(completion_tokens)s, %(simulated)s, now(), now())
ON CONFLICT ON CONSTRAINT page_unique_batch_slug DO UPDATE SET
    job_id = EXCLUDED.job_id, keyword = EXCLUDED.keyword, title = EXCLUDED.title,
    meta_description = EXCLUDED.meta_description, body_markdown = EXCLUDED.body_markdown,
    word_count = EXCLUDED.word_count, prompt_tokens = EXCLUDED.prompt_tokens,
    completion_tokens = EXCLUDED.completion_tokens, simulated = EXCLUDED.simulated, updated_at = EXCLUDED.updated_at
RETURNING id
"""


@functools.cache
def _store_page_releasing() -> str:
    from jobs.llm import limits

    return f"{limits.RELEASE_CTES}, page AS ({_STORE_PAGE}) SELECT (SELECT id FROM page)"


def store_page(batch_id, slug: str, *, release: tuple[Permit, int, int] | None = None, **values) -> int:
    """Write the page keyed by (batch, slug) in one statement: a re-run of the
    job overwrites the same row (created_at kept). Returns its id.

    `release`: (the call's permit, its prompt and completion tokens): the
    same statement frees the permit's slot and counts the tokens, as
    `limits.release` does (one round trip per page fewer; if it fails,
    neither happened and the caller releases the permit)."""
    from jobs.db import sql
    from jobs.llm import limits

    job_id = values.pop("job_id")
    params = {"batch": str(batch_id) if batch_id else None, "slug": slug, "job": str(job_id) if job_id else None}
    params.update(values)
    statement = _STORE_PAGE
    if release is not None:
        permit, prompt_tokens, completion_tokens = release
        if permit.job_id != job_id and str(permit.job_id) != str(job_id):
            raise ValueError("a page frees the slot of its own job's call only")
        params.update(limits.release_params(permit, prompt_tokens, completion_tokens))
        statement = _store_page_releasing()
    with sql.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


@handler("content.page", schema=PagePayload, queue=LLM_QUEUE, max_attempts=5, timeout=900)
async def page(ctx, payload: PagePayload) -> dict:
    """A programmatic SEO page from a prompt template and one row of variables."""
    from jobs.llm import limits

    prompt = render_prompt(payload.template, payload.variables)
    generated, permit = await _generate(
        ctx,
        provider_name=payload.provider,
        messages=[{"role": "user", "content": prompt}],
        model=payload.model,
        max_tokens=payload.max_tokens,
        temperature=None,
        fallback=payload.fallback,
        # A page is stored whole: streaming it would cost a progress write and
        # a job.output event per flush for text nobody watches in a batch of
        # thousands (the attempt keeps the text all the same).
        stream=False,
        # The slot is freed, and the tokens counted, by the page's statement.
        hold=True,
    )
    usage = generated["usage"]
    tokens = (usage["prompt_tokens"], usage["completion_tokens"])
    try:
        keyword = str(payload.variables.get("keyword") or "")
        fields = page_from_text(generated["text"], keyword)
        slug = slugify(keyword or fields["title"])[:200] or f"page-{ctx.job_id}"
        page_id = await ctx.run_db(
            _bookkeeping(store_page),
            ctx.batch_id,
            slug,
            release=(permit, *tokens),
            job_id=ctx.job_id,
            keyword=keyword,
            simulated=generated["simulated"],
            prompt_tokens=tokens[0],
            completion_tokens=tokens[1],
            **fields,
        )
    except asyncio.CancelledError:
        # The statement was handed to its thread (and then runs whole) or
        # never started: a slot whose job is no longer running frees itself.
        raise
    except BaseException:
        # Nothing of the statement happened: free the slot and count the tokens alone.
        await ctx.run_db(_bookkeeping(limits.release), permit, prompt_tokens=tokens[0], completion_tokens=tokens[1])
        raise
    return {
        "page_id": page_id,
        "slug": slug,
        "title": fields["title"],
        "word_count": fields["word_count"],
        "usage": usage,
        "provider": generated["provider"],
        "simulated": generated["simulated"],
    }
