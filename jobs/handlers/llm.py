"""LLM job kinds: `llm.generate` and `content.page`. Both are `async def`, so
they run in the worker process's asyncio lane (jobs/lane.py): one worker
process keeps many provider calls in flight."""

from __future__ import annotations

import re
import string
from typing import Literal

from django.utils.text import slugify
from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobs.registry import Payload, handler

LLM_QUEUE = "llm"


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class GeneratePayload(Payload):
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=200)
    prompt: str | None = Field(default=None, min_length=1, max_length=200_000)
    model: str | None = Field(default=None, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=32_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    provider: str | None = Field(default=None, max_length=100)

    @model_validator(mode="after")
    def _one_input(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either 'messages' or 'prompt', not both and not neither")
        return self

    def chat_messages(self) -> list[dict]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


async def _generate(ctx, *, provider_name, messages, model, max_tokens, temperature) -> dict:
    from jobs.llm.client import chat
    from jobs.llm.providers import get_provider

    provider = get_provider(provider_name)
    received: list[str] = []
    budget = max_tokens or 512

    def on_delta(delta: str) -> None:
        received.append(delta)
        text = "".join(received)
        # ~4 characters a token: a rough but monotonic progress estimate.
        percent = min(99, int(100 * (len(text) / 4) / budget))
        ctx.report_progress(percent, f"streaming, {len(text)} characters", output=text)

    result = await chat(
        provider, messages=messages, model=model, max_tokens=max_tokens, temperature=temperature,
        stream=True, on_delta=on_delta,
    )
    ctx.output = result.text
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
        "latency_seconds": round(result.latency_seconds, 3),
        "model": result.model,
        "provider": provider.name,
        "simulated": provider.simulated,
    }


@handler("llm.generate", schema=GeneratePayload, queue=LLM_QUEUE, max_attempts=5, timeout=900)
async def generate(ctx, payload: GeneratePayload) -> dict:
    """One chat completion, streamed; partial output shows as progress."""
    return await _generate(
        ctx, provider_name=payload.provider, messages=payload.chat_messages(), model=payload.model,
        max_tokens=payload.max_tokens, temperature=payload.temperature,
    )


class PagePayload(Payload):
    template: str = Field(min_length=1, max_length=20_000, description="Prompt with {column} placeholders.")
    variables: dict[str, str | int | float | None] = Field(default_factory=dict)
    provider: str | None = Field(default=None, max_length=100)
    model: str | None = Field(default=None, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=32_000)

    @model_validator(mode="after")
    def _template_fits(self):
        missing = sorted(set(template_fields(self.template)) - set(self.variables))
        if missing:
            raise ValueError(f"template names {', '.join(missing)}, missing from variables")
        return self


def template_fields(template: str) -> list[str]:
    """The `{name}` placeholders of a prompt template (raises ValueError if malformed)."""
    names = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_ -]*", field):
            raise ValueError(f"placeholder {{{field}}} is not a column name")
        names.append(field)
    return names


def render_prompt(template: str, variables: dict) -> str:
    return template.format_map({k: "" if v is None else v for k, v in variables.items()})


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


@handler("content.page", schema=PagePayload, queue=LLM_QUEUE, max_attempts=5, timeout=900)
async def page(ctx, payload: PagePayload) -> dict:
    """A programmatic SEO page from a prompt template and one row of variables."""
    from jobs.models import Page

    prompt = render_prompt(payload.template, payload.variables)
    generated = await _generate(
        ctx, provider_name=payload.provider, messages=[{"role": "user", "content": prompt}], model=payload.model,
        max_tokens=payload.max_tokens, temperature=None,
    )
    keyword = str(payload.variables.get("keyword") or "")
    fields = page_from_text(generated["text"], keyword)
    slug = slugify(keyword or fields["title"])[:200] or f"page-{ctx.job_id}"
    usage = generated["usage"]

    def store() -> int:
        # Keyed by (batch, slug): a re-run of this job overwrites the same page.
        stored, _ = Page.objects.update_or_create(
            batch_id=ctx.batch_id, slug=slug,
            defaults={**fields, "job_id": ctx.job_id, "keyword": keyword, "simulated": generated["simulated"],
                      "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]},
        )
        return stored.pk

    page_id = await ctx.run_db(store)
    return {
        "page_id": page_id, "slug": slug, "title": fields["title"], "word_count": fields["word_count"],
        "usage": usage, "provider": generated["provider"], "simulated": generated["simulated"],
    }
