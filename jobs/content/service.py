"""Content batches: a CSV of keywords and a prompt template become a batch of
`content.page` jobs; the pages they store are read back and exported.

Everything about the upload is checked before anything is queued (`plan_content`):
the file (UTF-8, a `keyword` column, at most MAX_PAGES rows, one slug per
page) and the template (every `{column}` it names is in the file). Entry points
call `plan_content` for a preview and `submit_content` to create the batch.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.core.handlers.asgi import ASGIRequest
from django.db.models import Count, Q, QuerySet, Sum
from django.http import HttpRequest, StreamingHttpResponse
from django.utils.http import content_disposition_header
from django.utils.text import slugify

from jobs.engine.batches import MAX_ERRORS, MAX_JOBS, BatchSubmitted, InvalidBatch, submit_batch
from jobs.engine.deadletter import retry_job, retry_jobs
from jobs.errors import ConveyorError, JobNotFound
from jobs.llm.prompts import Pieces, PromptTooLong, TemplateError, check_length, parse_template, render_prompt
from jobs.llm.providers import UnknownProvider, get_provider
from jobs.models import FINISHED_STATES, Batch, Job, Page, State

KIND = "content.page"
KEYWORD = "keyword"
MAX_PAGES = MAX_JOBS  # one job per page: the batch limit
MAX_CSV_BYTES = 20 * 1024 * 1024
MAX_TEMPLATE = 20_000  # PagePayload.template's limit
MAX_KEYWORD = 300  # Page.keyword's length
EXPORT_FORMATS = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "zip": "application/zip",
}
# Cells a spreadsheet would read as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CHUNK = 500  # pages read per query while exporting
_FLUSH = 64 * 1024  # bytes gathered before a chunk of an export is sent


class PageNotFound(ConveyorError):
    code = "page-not-found"


@dataclass(frozen=True)
class ContentPlan:
    """What a CSV + template would submit; nothing is written."""

    columns: list[str]  # as in the file's header
    fields: list[str]  # the template's placeholders, each once, in order
    rows: list[dict[str, str]]  # each page's variables: keyword + the template's fields
    slugs: list[str]
    template: str
    provider: str | None
    model: str | None

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def unused_columns(self) -> list[str]:
        return [c for c in self.columns if c != KEYWORD and c not in self.fields]

    @property
    def first_prompt(self) -> str:
        return render_prompt(self.template, self.rows[0])

    def jobs(self) -> list[dict[str, Any]]:
        options = {k: v for k, v in (("provider", self.provider), ("model", self.model)) if v}
        return [
            {"kind": KIND, "payload": {"template": self.template, "variables": row, **options}} for row in self.rows
        ]


def page_slug(keyword: str) -> str:
    """The slug the `content.page` handler stores a keyword's page under."""
    return slugify(keyword)[:200]


def plan_content(
    data: bytes | str | None, template: str | None, *, provider: str | None = None, model: str | None = None
) -> ContentPlan:
    """Check a content upload and say what it would submit.

    1. The template: 1-20,000 characters, well-formed, naming at least one column.
    2. The provider (when named) must be configured; the model is at most 200 characters.
    3. The file: UTF-8 CSV, a header naming each column once, a `keyword`
       column and every column the template names, 1 to MAX_PAGES rows of
       as many cells as the header, and each keyword giving its own slug.

    Raises InvalidBatch; each error names its field (`file`, `template`,
    `provider`, `model`) or its row (`rows[3].keyword`, rows[1] being the
    first row after the header).
    """
    errors: list[dict[str, str]] = []
    pieces = _template_pieces(template, errors)
    fields = None if pieces is None else list(dict.fromkeys(f for _, f in pieces if f is not None))
    provider = (provider or "").strip() or None
    model = (model or "").strip() or None
    if provider is not None:
        try:
            get_provider(provider)
        except UnknownProvider as exc:
            errors.append({"field": "provider", "message": f"is not configured; known: {', '.join(exc.known)}"})
    if model is not None and len(model) > 200:
        errors.append({"field": "model", "message": "must be at most 200 characters"})
    columns, rows = _read_csv(data, errors)
    if columns is not None and fields is not None:
        missing = [f for f in fields if f not in columns]
        if missing:
            names = ", ".join(f"{{{f}}}" for f in missing)
            what = "not a column" if len(missing) == 1 else "not columns"
            errors.append(
                {
                    "field": "template",
                    "message": f"names {names}, {what} of the file (its columns: {', '.join(columns)})",
                }
            )
        elif pieces is not None and rows is not None:
            _check_prompt_lengths(pieces, rows, errors)
    slugs = _slugs(rows, errors) if rows is not None else []
    if errors:
        raise InvalidBatch(errors[:MAX_ERRORS])
    assert columns is not None and fields is not None and rows is not None
    wanted = [KEYWORD, *(f for f in fields if f != KEYWORD)]
    variables = [{name: row[name] for name in wanted} for row in rows]
    return ContentPlan(columns, fields, variables, slugs, template or "", provider, model)


def submit_content(
    name: str,
    data: bytes | str | None,
    template: str | None,
    *,
    provider: str | None = None,
    model: str | None = None,
    owner: str = "",
    callback_url: str = "",
    idempotency_key: str | None = None,
) -> BatchSubmitted:
    """Create a batch of one `content.page` job per row: all, or none (InvalidBatch)."""
    plan = plan_content(data, template, provider=provider, model=model)
    return submit_batch(
        name,
        plan.jobs(),
        owner=owner,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
        label=lambda index: f"rows[{index + 1}]",
    )


def _template_pieces(template: str | None, errors: list[dict[str, str]]) -> Pieces | None:
    if not template or not template.strip():
        errors.append({"field": "template", "message": "is required"})
        return None
    if len(template) > MAX_TEMPLATE:
        errors.append({"field": "template", "message": f"must be at most {MAX_TEMPLATE:,} characters"})
        return None
    try:
        pieces = parse_template(template)
    except TemplateError as exc:
        errors.append({"field": "template", "message": str(exc)})
        return None
    if all(field is None for _, field in pieces):
        errors.append(
            {"field": "template", "message": "names no column, so every page would get the same prompt; use {keyword}"}
        )
        return None
    return pieces


def _check_prompt_lengths(pieces: Pieces, rows: list[dict[str, str]], errors: list[dict[str, str]]) -> None:
    for number, row in enumerate(rows, start=1):
        try:
            check_length(pieces, row)
        except PromptTooLong as exc:
            errors.append({"field": f"rows[{number}]", "message": str(exc)})


def _read_csv(data: bytes | str | None, errors: list[dict[str, str]]):
    """(columns, rows as dicts), or (None, None) with the file's errors added."""
    if data is None:
        errors.append({"field": "file", "message": "is required: a CSV with a keyword column, one row per page"})
        return None, None
    if len(data) == 0:
        errors.append({"field": "file", "message": "is empty; upload a CSV whose first row names the columns"})
        return None, None
    if len(data) > MAX_CSV_BYTES:
        errors.append({"field": "file", "message": f"is over {MAX_CSV_BYTES // (1024 * 1024)} MiB"})
        return None, None
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            errors.append(
                {
                    "field": "file",
                    "message": f"is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); "
                    "save it as “CSV UTF-8”",
                }
            )
            return None, None
    if "\x00" in data:
        errors.append({"field": "file", "message": "contains a NUL character: it is not a text CSV file"})
        return None, None
    reader = csv.reader(io.StringIO(data, newline=""))
    row_errors: list[dict[str, str]] = []
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            errors.append({"field": "file", "message": "is empty; its first row must name the columns"})
            return None, None
        header = [name.strip() for name in header]
        if "" in header:
            errors.append({"field": "file", "message": f"column {header.index('') + 1} of the header row has no name"})
            return None, None
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            errors.append({"field": "file", "message": f"the header names {', '.join(repeated)} more than once"})
            return None, None
        if KEYWORD not in header:
            near = [name for name in header if name.lower() == KEYWORD]
            hint = f" (found {near[0]!r}: names are case-sensitive)" if near else f" (its columns: {', '.join(header)})"
            errors.append({"field": "file", "message": f"has no {KEYWORD!r} column{hint}"})
            return None, None
        rows = []
        for number, row in enumerate((row for row in reader if any(cell.strip() for cell in row)), start=1):
            if number > MAX_PAGES:
                errors.append({"field": "file", "message": f"has more than {MAX_PAGES:,} rows (one page each)"})
                return None, None
            if len(row) != len(header):
                row_errors.append(
                    {"field": f"rows[{number}]", "message": f"has {len(row)} cells; the header has {len(header)}"}
                )
                continue
            rows.append(dict(zip(header, (cell.strip() for cell in row), strict=True)))
    except csv.Error as exc:
        errors.append({"field": "file", "message": f"is not valid CSV: {exc}"})
        return None, None
    if row_errors:
        errors.extend(row_errors)
        return None, None
    if not rows:
        errors.append({"field": "file", "message": "has a header but no rows; add one row per page"})
        return None, None
    return header, rows


def _slugs(rows: list[dict[str, str]], errors: list[dict[str, str]]) -> list[str]:
    slugs: list[str] = []
    first_row: dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        keyword = row[KEYWORD]
        slug = page_slug(keyword)
        field = f"rows[{number}].{KEYWORD}"
        if not keyword:
            errors.append({"field": field, "message": "is empty"})
        elif len(keyword) > MAX_KEYWORD:
            errors.append({"field": field, "message": f"has {len(keyword)} characters; at most {MAX_KEYWORD}"})
        elif not slug:
            errors.append({"field": field, "message": f"{keyword!r} gives an empty slug: it needs a letter or digit"})
        elif slug in first_row:
            errors.append(
                {
                    "field": field,
                    "message": f"{keyword!r} gives the slug {slug!r}, as rows[{first_row[slug]}] does; "
                    "each page needs its own slug",
                }
            )
        else:
            first_row[slug] = number
        slugs.append(slug)
    return slugs


# --- a batch's pages ------------------------------------------------------------


@dataclass(frozen=True)
class ContentSummary:
    pages: int
    words: int
    failed: int  # dead jobs
    active: bool  # some job has not finished
    is_content: bool  # the batch has content.page jobs (or pages)


def content_summary(batch: Batch) -> ContentSummary:
    totals = Page.objects.filter(batch=batch).aggregate(n=Count("id"), words=Sum("word_count"))
    jobs = Job.objects.filter(batch=batch).aggregate(
        content=Count("id", filter=Q(kind=KIND)),
        failed=Count("id", filter=Q(state=State.DEAD)),
        active=Count("id", filter=~Q(state__in=FINISHED_STATES)),
    )
    pages = totals["n"] or 0
    return ContentSummary(
        pages, totals["words"] or 0, jobs["failed"], bool(jobs["active"]), bool(pages or jobs["content"])
    )


def batch_pages(batch_id: UUID | str) -> QuerySet[Page]:
    """The batch's pages by slug, without their bodies (for a listing)."""
    return Page.objects.filter(batch_id=batch_id).defer("body_markdown").order_by("slug")


def get_page(batch_id: UUID | str, slug: str) -> Page:
    """Raises PageNotFound."""
    page = Page.objects.filter(batch_id=batch_id, slug=slug).first()
    if page is None:
        raise PageNotFound(f"no page {slug!r} in batch {batch_id}")
    return page


def failed_jobs(batch_id: UUID | str, *, limit: int = 50) -> list[Job]:
    """The batch's dead jobs, most recent failure first."""
    return list(Job.objects.filter(batch_id=batch_id, state=State.DEAD).order_by("-finished_at", "-id")[:limit])


def retry_batch_job(batch_id: UUID | str, job_id: UUID | str, *, actor: str = "") -> Job:
    """Queue one dead job of the batch again. Raises JobNotFound (also for a
    job of another batch) or InvalidState."""
    try:
        in_batch = Job.objects.filter(id=job_id, batch_id=batch_id).exists()
    except (ValidationError, ValueError):
        in_batch = False
    if not in_batch:
        raise JobNotFound(f"no job {job_id} in batch {batch_id}")
    return retry_job(job_id, actor=actor)


def retry_failed(batch_id: UUID | str, *, actor: str = "") -> int:
    """Queue every dead job of the batch again; returns how many moved."""
    ids = list(Job.objects.filter(batch_id=batch_id, state=State.DEAD).values_list("id", flat=True))
    return retry_jobs(ids=ids, actor=actor) if ids else 0


def iter_pages(batch_id: UUID | str) -> Iterator[Page]:
    """Every page of the batch by slug, read _CHUNK at a time (keyset on the
    unique slug): a 10,000-page export never holds them all."""
    after = None
    while True:
        query = Page.objects.filter(batch_id=batch_id).order_by("slug")
        if after is not None:
            query = query.filter(slug__gt=after)
        chunk = list(query[:_CHUNK])
        yield from chunk
        if len(chunk) < _CHUNK:
            return
        after = chunk[-1].slug


# --- exports ---------------------------------------------------------------------


CSV_COLUMNS = ["slug", "keyword", "title", "description", "word_count", "markdown", "simulated", "updated_at"]


@dataclass(frozen=True)
class Export:
    chunks: Iterator[bytes]
    content_type: str
    filename: str


def export_pages(batch: Batch, fmt: str) -> Export:
    """The batch's pages as CSV, JSON or a ZIP of Markdown files, produced as
    they are read. Raises ValueError for another format."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use {', '.join(EXPORT_FORMATS)}")
    encode = {"csv": _csv_chunks, "json": _json_chunks, "zip": _zip_chunks}[fmt]
    stem = slugify(batch.name)[:60] or "batch"
    return Export(
        _gathered(encode(iter_pages(batch.id))), EXPORT_FORMATS[fmt], f"{stem}-{str(batch.id)[:8]}-pages.{fmt}"
    )


def streaming_response(request: HttpRequest, export: Export) -> StreamingHttpResponse:
    """Stream an export. Under ASGI (Daphne) the iterator must be asynchronous,
    or Django reads it all into memory first; under WSGI it must be synchronous."""
    chunks = _in_thread(export.chunks) if isinstance(request, ASGIRequest) else export.chunks
    response = StreamingHttpResponse(chunks, content_type=export.content_type)
    response["Content-Disposition"] = content_disposition_header(True, export.filename)
    response["Cache-Control"] = "no-store"
    return response


def page_record(page: Page) -> dict[str, Any]:
    return {
        "slug": page.slug,
        "keyword": page.keyword,
        "title": page.title,
        "description": page.meta_description,
        "word_count": page.word_count,
        "markdown": page.body_markdown,
        "simulated": page.simulated,
        "updated_at": page.updated_at,
    }


def page_markdown(page: Page) -> str:
    """The page as a Markdown file with a front-matter header. JSON strings are
    valid YAML double-quoted scalars, so any title is quoted safely."""
    header = "\n".join(
        f"{key}: {json.dumps(value, ensure_ascii=False)}"
        for key, value in (
            ("title", page.title),
            ("description", page.meta_description),
            ("slug", page.slug),
            ("keyword", page.keyword),
        )
    )
    return f"---\n{header}\n---\n\n{page.body_markdown.strip()}\n"


def csv_safe(value: Any) -> Any:
    """A cell a spreadsheet shows as text, never evaluates."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv_chunks(pages: Iterable[Page]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for page in pages:
        record = page_record(page)
        record["updated_at"] = record["updated_at"].isoformat()
        writer.writerow([csv_safe(record[column]) for column in CSV_COLUMNS])
        yield buffer.getvalue().encode()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue().encode()


def _json_chunks(pages: Iterable[Page]) -> Iterator[bytes]:
    yield b"["
    for index, page in enumerate(pages):
        record = page_record(page)
        record["updated_at"] = record["updated_at"].isoformat()
        text = json.dumps(record, ensure_ascii=False)
        yield (",\n" if index else "\n").encode() + text.encode()
    yield b"\n]\n"


class _Sink(io.RawIOBase):
    """Where ZipFile writes: it cannot seek, so ZipFile writes each entry's
    sizes after its data, and the bytes can leave as soon as they are written."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def _zip_chunks(pages: Iterable[Page]) -> Iterator[bytes]:
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for page in pages:
            info = zipfile.ZipInfo(f"{page.slug}.md", date_time=page.updated_at.timetuple()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, page_markdown(page).encode())
            yield sink.take()
    yield sink.take()


def _gathered(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Chunks of about _FLUSH bytes: fewer, larger writes to the client."""
    pending: list[bytes] = []
    size = 0
    for chunk in chunks:
        pending.append(chunk)
        size += len(chunk)
        if size >= _FLUSH:
            yield b"".join(pending)
            pending, size = [], 0
    if pending:
        yield b"".join(pending)


async def _in_thread(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    # thread_sensitive: every step runs on the same thread, so the database
    # connection the generator uses is the same from one chunk to the next.
    done = object()
    while True:
        chunk = await sync_to_async(next, thread_sensitive=True)(chunks, done)
        if chunk is done:
            return
        yield chunk
