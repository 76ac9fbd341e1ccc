"""Operator controls on the dashboard: pause, resume and limit a queue; run a
waiting job now; cancel a batch; cancel or retry every job a filter of the jobs
list matches; API keys (staff). Each action is a POST calling one
`jobs.services` function; the overview's queue cards and the job and batch
pages show the result through their streams."""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from dashboard import queries
from dashboard.views import _notice, _operator, _page
from jobs import services
from jobs.errors import InvalidState, JobNotFound
from jobs.models import ApiKey


def _done(request: HttpRequest, text: str, *, to: str, level: str = "info") -> HttpResponse:
    if not request.htmx:
        messages.add_message(request, messages.ERROR if level == "error" else messages.INFO, text)
        return redirect(to)
    return HttpResponse(_notice(text, level=level))


# --- queues ------------------------------------------------------------------


@login_required
@require_POST
def queue_control(request: HttpRequest, queue: str, action: str) -> HttpResponse:
    """Pause, resume, or set the limit (`max_running`, empty: none) of a queue."""
    _operator(request)
    try:
        if action == "pause":
            services.pause_queue(queue)
            text = f"Queue {queue} paused: nothing of it starts until it is resumed."
        elif action == "resume":
            services.resume_queue(queue)
            text = f"Queue {queue} resumed."
        else:
            raw = request.POST.get("max_running", "").strip()
            if raw and not raw.isdigit():
                raise services.QueueError("max_running must be an integer of at least 1", field="max_running")
            limit = int(raw) if raw else None
            services.set_max_running(queue, limit)
            text = f"Queue {queue}: at most {limit} running at once." if limit else f"Queue {queue}: no limit."
    except services.QueueError as exc:
        if not request.htmx:
            messages.error(request, str(exc))
            return redirect("dashboard:overview")
        return HttpResponse(_notice(str(exc), level="error"), status=422)
    return _done(request, text, to=reverse("dashboard:overview"))


# --- jobs --------------------------------------------------------------------


@login_required
@require_POST
def run_now(request: HttpRequest, job_id: UUID) -> HttpResponse:
    actor = _operator(request)
    try:
        services.run_job_now(job_id, actor=actor)
    except JobNotFound:
        raise Http404("no such job") from None
    except InvalidState as exc:
        return _done(request, exc.message, to=reverse("dashboard:job", args=[job_id]), level="error")
    return _done(request, f"Job {str(job_id)[:8]} runs now.", to=reverse("dashboard:job", args=[job_id]))


@login_required
@require_POST
def cancel_batch(request: HttpRequest, batch_id: UUID) -> HttpResponse:
    actor = _operator(request)
    try:
        count = services.cancel_batch(batch_id, actor=actor)
    except services.BatchNotFound:
        raise Http404("no such batch") from None
    text = f"Cancelled {count} job{'s' if count != 1 else ''} of the batch."
    return _done(request, text, to=reverse("dashboard:batch", args=[batch_id]))


@login_required
@require_POST
def bulk_jobs(request: HttpRequest, action: str) -> HttpResponse:
    """Cancel the selected jobs (`ids`), or cancel / retry every job the
    filters match (`all`)."""
    actor = _operator(request)
    filters = queries.JobFilters.from_query(request.POST)
    back = reverse("dashboard:jobs") + "?" + request.POST.get("query", "")
    ids = [i for i in request.POST.getlist("ids") if queries.as_uuid(i) is not None]
    if ids and action == "cancel":
        selection = services.Selection(ids=[queries.as_uuid(i) for i in ids])
    else:
        selection = queries.selection_of(filters)
        if selection is None or request.POST.get("all") != "1":
            return _done(request, "Nothing selected.", to=back, level="error")
    moved = (services.cancel_matching if action == "cancel" else services.retry_matching)(selection, actor=actor)
    verb = "Cancelled" if action == "cancel" else "Queued again"
    return _done(request, f"{verb}: {moved} job{'s' if moved != 1 else ''}.", to=back)


# --- API keys (staff) ----------------------------------------------------------


def _staff(request: HttpRequest) -> None:
    if not (request.user.is_staff and request.user.is_active):
        raise PermissionDenied("API keys are for staff.")


@login_required
def api_keys(request: HttpRequest) -> HttpResponse:
    """List the keys; create one (its key is shown once, on this answer)."""
    _staff(request)
    created, error = None, ""
    if request.method == "POST":
        scopes = request.POST.getlist("scopes")
        try:
            created = services.create_api_key(request.POST.get("name", ""), scopes=scopes)
        except ValueError as exc:
            error = str(exc)
    keys = ApiKey.objects.order_by("-created_at")
    context = {"keys": keys, "created": created, "error": error, "scopes": ApiKey.Scope.values}
    response = _page(request, "dashboard/api_keys.html", context, title="API keys", nav="api-keys", stream=None)
    if error:
        response.status_code = 422
    return response


@login_required
@require_POST
def revoke_api_key(request: HttpRequest, key_id: int) -> HttpResponse:
    _staff(request)
    api_key = ApiKey.objects.filter(pk=key_id).first()
    if api_key is None:
        raise Http404("no such key")
    services.revoke_api_key(api_key.prefix)
    messages.info(request, f"Key {api_key.name} revoked.")
    return redirect("dashboard:api-keys")
