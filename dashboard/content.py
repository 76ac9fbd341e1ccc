"""Content batches on the dashboard: the upload form with its preview, the
pages/failures/exports section of a batch's page, a page's Markdown, exports,
and retrying a batch's failed jobs.

Every check of an upload is `jobs.content.service.plan_content`'s; these views parse
the form, call it (or `submit_content`) and render.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from dashboard.forms import ContentBatchForm
from dashboard.permissions import can_operate, can_submit, owner_of
from dashboard.views import _notice, _operator, _page
from jobs.content import service as content
from jobs.engine.batches import InvalidBatch
from jobs.errors import InvalidState, JobNotFound
from jobs.llm.providers import all_providers
from jobs.models import Batch

PAGES_PER_PAGE = 50
# A no-JS preview keeps an uploaded file's text in the form (browsers drop a
# file input's choice on every page load) when it is small enough to post back
# as a plain field (Django caps those at DATA_UPLOAD_MAX_MEMORY_SIZE, 2.5 MiB).
KEEP_TEXT_UP_TO = 1024 * 1024


# --- the upload form -------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def new_content_batch(request: HttpRequest) -> HttpResponse:
    """GET: the form. POST: preview (the `preview` button) or submit."""
    if request.method != "POST":
        form = _form()
        return _render_form(request, form, None)
    form = _form(request)
    if "preview" not in request.POST and not can_submit(request.user):
        raise PermissionDenied("Submitting needs the jobs.add_job permission or operator rights.")
    plan = _plan(form)
    if "preview" in request.POST:
        if plan is not None and form.cleaned_data.get("file") is not None:
            form = _keep_text(request, form)
        return _render_form(request, form, plan, status=200 if plan else 422)
    if plan is not None and not form.cleaned_data["name"].strip():
        form.add_error("name", "is required to submit")
    if plan is not None and not form.errors:
        try:
            submitted = content.submit_content(
                form.cleaned_data["name"],
                form.csv_data(),
                form.cleaned_data["template"],
                provider=form.cleaned_data["provider"],
                model=form.cleaned_data["model"],
                owner=owner_of(request.user),
                callback_url=form.cleaned_data["callback_url"],
            )
        except InvalidBatch as exc:
            form.add_plan_errors(exc.errors)
        else:
            batch = submitted.batch
            messages.info(
                request, f"Queued {batch.total} page{'s' if batch.total != 1 else ''} in batch {batch.name!r}."
            )
            return redirect("dashboard:batch", batch_id=batch.id)
    return _render_form(request, form, plan, status=422)


@login_required
@require_POST
def preview_content_batch(request: HttpRequest) -> HttpResponse:
    """htmx: the preview, and every field's errors swapped in next to it (out of band)."""
    form = _form(request)
    plan = _plan(form)
    return render(request, "dashboard/content_new.html#content-preview", {"form": form, "plan": plan, "oob": True})


def _form(request: HttpRequest | None = None) -> ContentBatchForm:
    providers = [p.name for p in all_providers()]
    if request is None:
        return ContentBatchForm(providers=providers)
    return ContentBatchForm(request.POST, request.FILES, providers=providers)


def _plan(form: ContentBatchForm) -> content.ContentPlan | None:
    if not form.is_valid():
        return None
    try:
        return content.plan_content(
            form.csv_data(),
            form.cleaned_data["template"],
            provider=form.cleaned_data["provider"],
            model=form.cleaned_data["model"],
        )
    except InvalidBatch as exc:
        form.add_plan_errors(exc.errors)
        return None


def _keep_text(request: HttpRequest, form: ContentBatchForm) -> ContentBatchForm:
    """The same form with the uploaded file's text in `csv_text` (when small)."""
    text = form.csv_data().decode("utf-8-sig")
    if len(text.encode()) > KEEP_TEXT_UP_TO:
        return form
    data = request.POST.copy()
    data["csv_text"] = text
    kept = ContentBatchForm(data, providers=[p.name for p in all_providers()])
    kept.is_valid()
    return kept


def _render_form(
    request: HttpRequest, form: ContentBatchForm, plan: content.ContentPlan | None, *, status: int = 200
) -> HttpResponse:
    context = {"form": form, "plan": plan, "max_pages": content.MAX_PAGES}
    response = _page(
        request, "dashboard/content_new.html", context, title="New content batch", nav="batches", stream=None
    )
    response.status_code = status
    return response


# --- a batch's pages, failures and exports -------------------------------------------


def batch_content_context(request: HttpRequest, batch: Batch) -> dict[str, Any]:
    """What the batch page's content section shows (also its live refresh)."""
    summary = content.content_summary(batch)
    return {
        "batch": batch,
        "summary": summary,
        "pages": Paginator(content.batch_pages(batch.id), PAGES_PER_PAGE).get_page(request.GET.get("pages")),
        "failed": content.failed_jobs(batch.id),
        "can_operate": can_operate(request.user),
        "formats": list(content.EXPORT_FORMATS),
    }


@login_required
@require_GET
def batch_content(request: HttpRequest, batch_id: UUID) -> HttpResponse:
    batch = get_object_or_404(Batch, id=batch_id)
    return render(request, "dashboard/batch_content.html#batch-content", batch_content_context(request, batch))


@login_required
@require_GET
def batch_page(request: HttpRequest, batch_id: UUID, slug: str) -> HttpResponse:
    batch = get_object_or_404(Batch, id=batch_id)
    try:
        page = content.get_page(batch.id, slug)
    except content.PageNotFound:
        raise Http404("no such page") from None
    if request.GET.get("format") == "md":
        response = HttpResponse(content.page_markdown(page), content_type="text/markdown; charset=utf-8")
        response["Content-Disposition"] = f'inline; filename="{page.slug}.md"'
        return response
    return _page(
        request,
        "dashboard/batch_page.html",
        {"batch": batch, "page": page, "markdown": content.page_markdown(page)},
        title=page.title,
        nav="batches",
        stream=None,
    )


@login_required
@require_GET
def export_batch(request: HttpRequest, batch_id: UUID, fmt: str) -> HttpResponse:
    batch = get_object_or_404(Batch, id=batch_id)
    if fmt not in content.EXPORT_FORMATS:
        raise Http404("no such export format")
    return content.streaming_response(request, content.export_pages(batch, fmt))


@login_required
@require_POST
def retry_batch_jobs(request: HttpRequest, batch_id: UUID) -> HttpResponse:
    """Retry one failed job of the batch (`job`), or all of them."""
    actor = _operator(request)
    batch = get_object_or_404(Batch, id=batch_id)
    level = "info"
    job_id = request.POST.get("job")
    if job_id:
        try:
            content.retry_batch_job(batch.id, job_id, actor=actor)
            text = f"Queued job {job_id[:8]} again."
        except JobNotFound:
            raise Http404("no such job in this batch") from None
        except InvalidState as exc:
            text, level = exc.message, "error"
    else:
        moved = content.retry_failed(batch.id, actor=actor)
        text = f"Queued {moved} failed job{'s' if moved != 1 else ''} again." if moved else "No failed job to retry."
    if not request.htmx:
        messages.add_message(request, messages.ERROR if level == "error" else messages.INFO, text)
        return redirect("dashboard:batch", batch_id=batch.id)
    response = HttpResponse(_notice(text, level=level))
    # The content section reloads itself; the progress comes over the page's stream.
    response["HX-Trigger"] = "batch-content-changed"
    return response
