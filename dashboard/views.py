"""The dashboard's pages and actions.

Each page view renders the whole page, or, for htmx, the partial it was asked
for; the same partials are what the SSE streams send (dashboard/streams.py).
Actions are POSTs that call one `jobs.services` function each.
"""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode
from uuid import UUID

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

from dashboard import charts, queries
from dashboard.forms import OptionsForm, payload_form
from dashboard.permissions import can_operate, can_submit, owner_of
from dashboard.waiting import waiting_reason
from jobs import services
from jobs.errors import IdempotencyKeyReused, InvalidJob, InvalidState, JobNotFound
from jobs.models import Batch, State


def events_url(path: str, **params) -> str:
    """The URL of an SSE stream (routed by config/asgi.py, not Django's URLconf)."""
    params = {k: v for k, v in params.items() if v not in (None, "")}
    return f"/events/{path}" + (f"?{urlencode(params)}" if params else "")


def _page(
    request: HttpRequest, template: str, context: dict, *, title: str, nav: str, stream: str | None
) -> HttpResponse:
    queues = context.get("queues")
    context = {
        "page_title": title,
        "nav": nav,
        "stream_url": stream,
        "dead_count": queries.dead_total(queues) if queues is not None else queries.dead_total(),
        "can_operate": can_operate(request.user),
        **context,
    }
    return render(request, template, context)


# --- pages -------------------------------------------------------------------


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    # The cursor before the reads: the page is at least as new as its stream's start.
    cursor = queries.latest_event_id()
    queues = services.queue_stats(always=["default"])
    history = queries.stats_history()
    context = {
        "queues": queues,
        "backlog": charts.backlog_warnings(history),
        "charts": charts.overview_charts(history),
        "clusters": queries.clusters_online(),
        "horizon": queries.horizon(with_query=request.user.is_staff or request.user.is_superuser),
    }
    return _page(
        request,
        "dashboard/overview.html",
        context,
        title="Overview",
        nav="overview",
        stream=events_url("overview", after=cursor),
    )


@login_required
def jobs(request: HttpRequest) -> HttpResponse:
    filters = queries.JobFilters.from_query(request.GET)
    cursor = queries.latest_event_id()
    page = queries.find_jobs(filters, before=request.GET.get("before"), after=request.GET.get("after"))
    jobs = page.object_list
    context = {
        "page": page,
        "jobs": jobs,
        "filters": filters,
        "states": State.values,
        "queues_known": queries.known_queues(),
        "kinds": services.known_kinds(),
        "can_operate": can_operate(request.user),
    }
    if request.htmx:
        return render(request, "dashboard/jobs.html#job-table", context)
    if can_operate(request.user):
        context["bulk"] = queries.bulk_counts(filters)
        context["query"] = request.GET.urlencode()
    stream = events_url(
        "jobs",
        after=cursor,
        ids=",".join(str(j.id) for j in jobs),
        state=filters.state,
        queue=filters.queue,
        kind=filters.kind,
        batch=filters.batch,
        q=filters.q,
    )
    return _page(request, "dashboard/jobs.html", context, title="Jobs", nav="jobs", stream=stream)


@login_required
def job(request: HttpRequest, job_id: UUID) -> HttpResponse:
    # The timeline (and so the stream's cursor) first, the job second: the job
    # is then at least as new as the cursor, and the stream replays from there.
    events, hidden = queries.job_timeline(job_id)
    cursor = events[-1].id if events else 0
    try:
        job = services.get_job(job_id)
    except JobNotFound:
        raise Http404("no such job") from None
    attempts = list(job.attempt_set.all())
    latest = max(attempts, key=lambda a: a.number) if attempts else None
    context = {
        "job": job,
        "events": events,
        "hidden_events": hidden,
        "attempts": attempts,
        "latest": latest,
        "log_next": queries.next_log_line(job.id, latest.number) if latest else 0,
        "waiting": _waiting(job),
        "deliveries": services.job_deliveries(job.id),
        "workflow": services.workflow_of(job.id),
    }
    if request.htmx:
        return render(
            request, "dashboard/partials/job.html#job-summary", context | {"can_operate": can_operate(request.user)}
        )
    return _page(
        request,
        "dashboard/job.html",
        context,
        title=f"Job {str(job.id)[:8]}",
        nav="jobs",
        stream=events_url(f"jobs/{job.id}", after=cursor),
    )


def _waiting(job):
    if job.is_finished or job.state == State.RUNNING and not job.cancel_requested_at:
        return None
    stats = {q["queue"]: q for q in services.queue_stats(always=[job.queue])}
    return waiting_reason(job, clusters=queries.clusters_online(), queue=stats.get(job.queue))


@login_required
def dead_letter(request: HttpRequest) -> HttpResponse:
    cursor = queries.latest_event_id()
    context = {"groups": queries.dead_letter_groups()}
    if request.htmx:
        return render(
            request,
            "dashboard/partials/dead_letter.html#dead-letter",
            context | {"can_operate": can_operate(request.user)},
        )
    return _page(
        request,
        "dashboard/dead_letter.html",
        context,
        title="Dead letter",
        nav="dead-letter",
        stream=events_url("dead-letter", after=cursor),
    )


@login_required
def batches(request: HttpRequest) -> HttpResponse:
    cursor = queries.latest_event_id()
    page, progress = queries.batch_page(page=request.GET.get("page"))
    ids = ",".join(str(p.batch.id) for p in progress)
    return _page(
        request,
        "dashboard/batches.html",
        {"page": page, "batches": progress},
        title="Batches",
        nav="batches",
        stream=events_url("batches", after=cursor, ids=ids),
    )


@login_required
def batch(request: HttpRequest, batch_id: UUID) -> HttpResponse:
    batch = get_object_or_404(Batch, id=batch_id)
    cursor = queries.latest_event_id()
    progress = queries.batch_progress([batch])[0]
    filters = queries.JobFilters(
        batch=str(batch.id), state=request.GET.get("state", "") if request.GET.get("state") in State.values else ""
    )
    page = queries.find_jobs(filters, before=request.GET.get("before"), after=request.GET.get("after"))
    return _page(
        request,
        "dashboard/batch.html",
        {
            "progress": progress,
            "page": page,
            "jobs": page.object_list,
            "filters": filters,
            "deliveries": services.batch_deliveries(batch.id),
            "budget_waiting": services.waiting_on_budget(batch.id),
        },
        title=f"Batch {str(batch.id)[:8]}",
        nav="batches",
        stream=events_url(f"batches/{batch.id}", after=cursor),
    )


# --- submit ------------------------------------------------------------------


@login_required
def submit(request: HttpRequest) -> HttpResponse:
    kind = request.POST.get("kind") or request.GET.get("kind") or ""
    handler, status = None, 200
    if kind:
        try:
            handler = services.submittable_handler(kind)
        except InvalidJob as exc:
            messages.error(request, exc.errors[0]["message"])
            status = 422
    context = {"handlers": services.client_handlers(), "handler": handler}
    if handler is None:
        response = _page(request, "dashboard/submit.html", context, title="Submit", nav="submit", stream=None)
        response.status_code = status
        return response

    schema = handler.schema.model_json_schema()
    if request.method == "POST":
        if not can_submit(request.user):
            raise PermissionDenied("You may look, not submit: submitting jobs needs the jobs.add_job permission.")
        form = payload_form(schema, data=request.POST)
        options = OptionsForm(request.POST, prefix="options")
        if form.is_valid() and options.is_valid():
            try:
                submitted = services.submit_job(
                    handler.kind,
                    form.payload(),
                    owner=owner_of(request.user),
                    **options.submit_options(),
                )
            except InvalidJob as exc:
                _attach_errors(exc.errors, form, options)
            except IdempotencyKeyReused as exc:
                options.add_error("idempotency_key", exc.message)
            else:
                job = submitted.job
                if not submitted.created:
                    messages.info(request, "A job with this idempotency key already exists: here it is.")
                return redirect("dashboard:job", job_id=job.id)
        status = 422
    else:
        form = payload_form(schema)
        options = OptionsForm(prefix="options", initial={"queue": handler.queue, "max_attempts": handler.max_attempts})
        status = 200
    context |= {"form": form, "options": options, "schema": schema}
    response = _page(
        request, "dashboard/submit.html", context, title=f"Submit {handler.kind}", nav="submit", stream=None
    )
    response.status_code = status
    return response


def _attach_errors(errors: list[dict[str, str]], form, options) -> None:
    """Put the engine's per-field errors next to the fields they name."""
    for error in errors:
        field, message = error["field"], error["message"]
        if field.startswith("payload."):
            name = field.removeprefix("payload.").split(".")[0]
            form.add_error(name if name in form.fields else None, message)
        elif field in options.fields:
            options.add_error(field, message)
        else:
            form.add_error(None, f"{field}: {message}")


# --- actions -------------------------------------------------------------------


def _operator(request: HttpRequest) -> str:
    if not can_operate(request.user):
        raise PermissionDenied("You may look, not act: operating jobs needs the jobs.operate_job permission.")
    return request.user.get_username()


def _notice(text: str, *, level: str = "info") -> str:
    return render_to_string("dashboard/partials/chrome.html#notice", {"notice": text, "level": level, "oob": True})


@login_required
@require_POST
def cancel_job(request: HttpRequest, job_id: UUID) -> HttpResponse:
    return _job_action(request, job_id, services.cancel_job, "Cancelled")


@login_required
@require_POST
def retry_job(request: HttpRequest, job_id: UUID) -> HttpResponse:
    return _job_action(request, job_id, services.retry_job, "Queued again")


def _job_action(request: HttpRequest, job_id: UUID, action, done: str) -> HttpResponse:
    actor = _operator(request)
    level = "info"
    try:
        job = action(job_id, actor=actor)
        text = f"{done}: job {str(job_id)[:8]} is {job.state}."
        if job.state == State.RUNNING:
            text = f"Cancel requested: job {str(job_id)[:8]} stops at its next progress report."
    except JobNotFound:
        raise Http404("no such job") from None
    except InvalidState as exc:
        text, level = exc.message, "error"
    if not request.htmx:
        messages.add_message(request, messages.ERROR if level == "error" else messages.INFO, text)
        return redirect("dashboard:job", job_id=job_id)
    # Only the notice: the page's stream brings the job's new state. A summary
    # rendered here could reach the browser after a newer one from the stream.
    return HttpResponse(_notice(text, level=level))


@login_required
@require_POST
def dead_letter_action(request: HttpRequest, action: str) -> HttpResponse:
    """Retry or discard dead jobs: one (`job`), a selection (`ids`) or a whole
    kind + error type group (`group`)."""
    actor = _operator(request)
    many = services.retry_jobs if action == "retry" else services.discard_jobs
    verb = "Retried" if action == "retry" else "Discarded"
    if request.POST.get("job"):
        ids = [request.POST["job"]]
    elif request.POST.get("group"):
        kind, _, error_type = request.POST["group"].partition("|")
        ids = None
    else:
        ids = request.POST.getlist("ids")
    try:
        if ids is None and error_type:
            moved = many(actor=actor, kind=kind, error_type=error_type)
        elif ids is None:
            # An empty error type would filter nothing: name the group's jobs.
            ids = [
                str(j.id) for g in queries.dead_letter_groups(per_group=10_000) if g.key == f"{kind}|" for j in g.jobs
            ]
            moved = many(ids=ids, actor=actor)
        else:
            ids = [i for i in ids if queries.as_uuid(i) is not None]
            moved = many(ids=ids, actor=actor) if ids else 0
    except ValueError as exc:
        return HttpResponse(str(exc), status=400)
    if moved:
        text = f"{verb} {moved} job{'s' if moved != 1 else ''}."
    else:
        text = "Nothing to do: no dead job was selected (or another operator was faster)."
    if not request.htmx:
        messages.info(request, text)
        return redirect("dashboard:dead-letter")
    # As for a single job: the stream re-renders the list (a list rendered here
    # could arrive after a newer one and hide a job that has died since).
    return HttpResponse(_notice(text))


@login_required
def charts_page(request: HttpRequest) -> HttpResponse:
    """Throughput and run time over 1 h, 24 h or 7 days, for one queue or all,
    and the per-kind table of the last hour and day, from the per-minute rollup."""
    range_name = request.GET.get("range") or "1h"
    queue = request.GET.get("queue") or None
    errors = []
    if range_name not in services.RANGES:
        errors.append(f"range: {range_name!r} is not a range; choose one of {', '.join(services.RANGES)}.")
        range_name = "1h"
    if queue is not None and len(queue) > 100:
        errors.append("queue: at most 100 characters.")
        queue = None
    points = services.series(range_name, queue=queue)
    step = points[1].at - points[0].at
    context = {
        "range": range_name,
        "ranges": list(services.RANGES),
        "queue": queue or "",
        "queues_known": sorted(
            {*settings.CONVEYOR_QUEUES, *(q["queue"] for q in services.queue_stats(always=["default"]))}
        ),
        "charts": charts.rollup_charts(points, range_name, step),
        "tables": [
            ("last hour", services.kind_table(timedelta(hours=1), queue=queue)),
            ("last 24 hours", services.kind_table(timedelta(hours=24), queue=queue)),
        ],
        "rolled_until": services.rolled_until(),
        "errors": errors,
    }
    status = 422 if errors else 200
    if request.htmx:
        return render(request, "dashboard/charts.html#rollup", context, status=status)
    response = _page(request, "dashboard/charts.html", context, title="Charts", nav="charts", stream=None)
    response.status_code = status
    return response
