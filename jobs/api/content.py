"""Content batches over /api/v1/: a CSV of keywords + a prompt template become a
batch of `content.page` jobs (preview first if you like), and a batch's pages
come back as CSV, JSON or a ZIP of Markdown files."""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

import pydantic
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from ninja import Field, Query, Router, Schema, Status
from pydantic import BaseModel, ConfigDict

from jobs import services
from jobs.api.auth import require
from jobs.api.parsing import MAX_BATCH_BODY, check_length, check_text, require_media_type
from jobs.api.problems import Problem, pydantic_errors
from jobs.api.schemas import BatchOut
from jobs.api.views import IdempotencyKey, KeyText, _doc, _idempotency_key, batch_out
from jobs.content import service as content

router = Router(tags=["content"])

READ, SUBMIT = require("read"), require("submit")


class ContentForm(BaseModel):
    """multipart/form-data fields of a content batch (the CSV is `file`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=200, description="Required to submit; not for a preview.")
    template: str = Field(
        "", description="Prompt with {column} placeholders, filled from each row (e.g. `Write about {keyword}`)."
    )
    provider: str | None = Field(None, max_length=100, description="A configured provider; default: the default one.")
    model: str | None = Field(None, max_length=200)
    callback_url: str = Field("", max_length=2000, description="http(s) URL called when the batch finishes.")


class ContentPreviewOut(Schema):
    rows: int = Field(description="Pages the batch would have: one per data row.")
    columns: list[str] = Field(description="The file's columns, as in its header.")
    fields: list[str] = Field(description="The columns the template names.")
    unused_columns: list[str] = Field(description="Columns neither the template nor the slug uses.")
    first_prompt: str = Field(description="The template filled from the first row.")
    first_slug: str


class PageOut(Schema):
    slug: str
    keyword: str
    title: str
    description: str
    word_count: int
    markdown: str
    simulated: bool
    updated_at: Any


_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                **ContentForm.model_json_schema(),
                "title": "ContentBatchUpload",
                "required": ["file", "template"],  # checked by plan_content, with the rest
                "properties": {
                    "file": {
                        "type": "string",
                        "format": "binary",
                        "description": f"UTF-8 CSV, one row per page: a `keyword` column and every column the "
                        f"template names; at most {content.MAX_PAGES:,} rows.",
                    },
                    **ContentForm.model_json_schema()["properties"],
                },
            }
        }
    },
}


@router.post(
    "/batches/content",
    auth=SUBMIT,
    response={202: BatchOut, 200: BatchOut},
    openapi_extra=_doc(400, 413, 415, created=True, body=_UPLOAD),
)
def submit_content_batch(
    request: HttpRequest, response: HttpResponse, idempotency_key: KeyText | None = IdempotencyKey
):
    """Submit a content batch: one `content.page` job per CSV row, all or none.

    Everything is checked before anything is queued: 422 `invalid-batch` names
    each problem (`file`, `template`, `rows[3].keyword`, …).
    """
    key = _idempotency_key(idempotency_key)
    form, data = _upload(request)
    if not form.name.strip():
        raise Problem(
            "validation-error", "Some fields are invalid.", errors=[{"field": "name", "message": "is required"}]
        )
    submitted = content.submit_content(
        form.name,
        data,
        form.template,
        provider=form.provider,
        model=form.model,
        owner=request.auth.owner,
        callback_url=form.callback_url,
        idempotency_key=key,
    )
    batch = submitted.batch
    response["Location"] = reverse("api-v1:get_batch", args=[batch.id])
    if not submitted.created:
        response["Idempotent-Replayed"] = "true"
    return Status(202 if submitted.created else 200, batch_out(batch))


@router.post(
    "/batches/content/preview",
    auth=SUBMIT,
    response=ContentPreviewOut,
    openapi_extra=_doc(400, 413, 415, body=_UPLOAD),
)
def preview_content_batch(request: HttpRequest):
    """What the same upload to /batches/content would submit, with the first prompt rendered. Creates nothing."""
    form, data = _upload(request)
    plan = content.plan_content(data, form.template, provider=form.provider, model=form.model)
    return {
        "rows": plan.count,
        "columns": plan.columns,
        "fields": plan.fields,
        "unused_columns": plan.unused_columns,
        "first_prompt": plan.first_prompt,
        "first_slug": plan.slugs[0],
    }


_EXPORT_DOC = _doc(404)
_EXPORT_DOC["responses"][200] = {
    "description": "The pages, streamed, as an attachment (Content-Disposition names the file).",
    "content": {
        "text/csv": {"schema": {"type": "string"}},
        "application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/PageOut"}}},
        "application/zip": {"schema": {"type": "string", "format": "binary"}},
    },
}


@router.get("/batches/{batch_id}/pages", auth=READ, openapi_extra=_EXPORT_DOC)
def export_pages(request: HttpRequest, batch_id: UUID, format: Query[Literal["csv", "json", "zip"]] = "json"):
    """The batch's generated pages, streamed: `csv` (cells that would start a
    spreadsheet formula get a leading '), `json` (an array), or `zip` (one
    `<slug>.md` per page with a front-matter header)."""
    batch = services.get_batch(batch_id, owner=request.auth.visible_owner)
    return content.streaming_response(request, content.export_pages(batch, format))


@router.get("/batches/{batch_id}/pages/{slug}", auth=READ, response=PageOut, openapi_extra=_doc(404))
def get_page(request: HttpRequest, batch_id: UUID, slug: str):
    """One generated page."""
    # Another owner's batch answers as GET /batches/{id} does, so ids do not leak.
    batch = services.get_batch(batch_id, owner=request.auth.visible_owner)
    try:
        return content.page_record(content.get_page(batch.id, slug))
    except content.PageNotFound as exc:
        raise Problem("not-found", exc.message) from None


def _upload(request: HttpRequest) -> tuple[ContentForm, bytes | None]:
    require_media_type(request, "multipart/form-data")
    check_length(request, limit=MAX_BATCH_BODY)  # files are streamed to disk, fields capped by Django
    fields = {name: request.POST[name] for name in request.POST}
    check_text(fields)
    try:
        form = ContentForm.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise Problem("validation-error", "Some fields are invalid.", errors=pydantic_errors(exc.errors())) from None
    upload = request.FILES.get("file")
    return form, upload.read() if upload is not None else None
