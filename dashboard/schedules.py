"""The dashboard's Schedules page: the list (with each schedule's last job and
its state, refreshed every few seconds), a form to create and edit one (the
next five ticks previewed as the expression is typed), and Enable, Disable,
Run now and Delete.

Everyone signed in may look; changes need `jobs.operate_job` (as for jobs).
The dashboard sees every owner's schedules; what it creates is owned by the
signed-in user ("user:<pk>"), as on the API.
"""

from __future__ import annotations

import json
from typing import Any
from zoneinfo import ZoneInfo

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from dashboard import queries
from dashboard.permissions import can_operate, owner_of
from jobs import services
from jobs.errors import InvalidJob
from jobs.models import Schedule

PREVIEW_COUNT = 5


class ScheduleForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="Unique: letters, digits, '_', '.', ':', '-'.")
    kind = forms.ChoiceField(choices=())
    payload = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "class": "mono", "placeholder": "{}"}),
        help_text="A JSON object, checked against the kind's schema.",
    )
    cron = forms.CharField(
        required=False,
        max_length=200,
        widget=forms.TextInput(attrs={"placeholder": "0 3 * * *", "class": "mono"}),
        help_text="Five fields (minute hour day month weekday), or @hourly, @daily, @weekly, @monthly.",
    )
    interval_seconds = forms.IntegerField(
        required=False, label="or every … seconds", help_text="Instead of a cron expression."
    )
    timezone = forms.CharField(max_length=64, initial="UTC", help_text="IANA name, e.g. Europe/Berlin.")
    overlap = forms.ChoiceField(
        choices=[("skip", "skip a tick while the previous job is unfinished"), ("allow", "allow overlapping jobs")]
    )
    queue = forms.CharField(required=False, max_length=100, help_text="Empty: the kind's queue.")
    priority = forms.IntegerField(initial=0)
    max_attempts = forms.IntegerField(required=False, help_text="Empty: the kind's.")
    enabled = forms.BooleanField(required=False, initial=True)

    def __init__(self, *args: Any, editing: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["kind"].choices = [(h.kind, h.kind) for h in services.client_handlers()]
        if editing:
            self.fields["name"].disabled = True

    def clean_payload(self) -> dict[str, Any]:
        text = (self.cleaned_data.get("payload") or "").strip() or "{}"
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise forms.ValidationError(f"is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(value, dict):
            raise forms.ValidationError("must be a JSON object")
        return value

    def engine_fields(self) -> dict[str, Any]:
        data = dict(self.cleaned_data)
        data["cron"] = data.get("cron") or ""
        data["queue"] = data.get("queue") or ""
        return data

    def add_engine_errors(self, errors: list[dict[str, str]]) -> None:
        """Put the engine's errors next to the fields they name ("payload.seconds" on payload)."""
        for error in errors:
            name = error["field"].split(".", 1)[0]
            message = error["message"] if name == error["field"] else f"{error['field']}: {error['message']}"
            self.add_error(name if name in self.fields else None, message)


def initial_of(schedule: Schedule) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "kind": schedule.kind,
        "payload": json.dumps(schedule.payload),
        "cron": schedule.cron,
        "interval_seconds": schedule.interval_seconds,
        "timezone": schedule.timezone,
        "overlap": schedule.overlap,
        "queue": schedule.queue,
        "priority": schedule.priority,
        "max_attempts": schedule.max_attempts,
        "enabled": schedule.enabled,
    }


# --- pages -------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def schedule_list(request: HttpRequest) -> HttpResponse:
    """The schedules; operators create one here (POST)."""
    form = ScheduleForm()
    if request.method == "POST":
        _operator(request)
        form = ScheduleForm(request.POST)
        if form.is_valid():
            try:
                created = services.create_schedule(owner=owner_of(request.user), **form.engine_fields())
            except services.InvalidSchedule as exc:
                form.add_engine_errors(exc.errors)
            else:
                messages.info(request, f"Created the schedule {created.name}; its first tick is {_when(created)}.")
                return redirect("dashboard:schedules")
    response = _page(request, "dashboard/schedules.html", {"form": form, "schedules": services.list_schedules()})
    if form.errors:
        response.status_code = 422
    return response


@login_required
@require_http_methods(["GET", "POST"])
def schedule_detail(request: HttpRequest, name: str) -> HttpResponse:
    """A schedule's edit form (POST saves it, for operators)."""
    schedule = _get(name)
    form = ScheduleForm(initial=initial_of(schedule), editing=True)
    if request.method == "POST":
        _operator(request)
        form = ScheduleForm(request.POST, initial=initial_of(schedule), editing=True)
        if form.is_valid():
            fields = form.engine_fields()
            fields.pop("name", None)
            try:
                services.update_schedule(schedule.name, **fields)
            except services.InvalidSchedule as exc:
                form.add_engine_errors(exc.errors)
            else:
                messages.info(request, f"Saved the schedule {schedule.name}.")
                return redirect("dashboard:schedules")
    response = _page(request, "dashboard/schedule.html", {"form": form, "schedule": schedule})
    if form.errors:
        response.status_code = 422
    return response


@login_required
@require_GET
def schedule_rows(request: HttpRequest) -> HttpResponse:
    """The table's rows (the page refreshes them: last job, its state, next tick)."""
    context = {"schedules": services.list_schedules(), "can_operate": can_operate(request.user)}
    return render(request, "dashboard/partials/schedules.html#rows", context)


@login_required
@require_GET
def preview(request: HttpRequest) -> HttpResponse:
    """The next five ticks of the expression being typed, or why it is refused."""
    cron = request.GET.get("cron", "").strip()
    interval = request.GET.get("interval_seconds", "").strip()
    tz = request.GET.get("timezone", "").strip() or "UTC"
    error, ticks = "", []
    if cron and interval:
        error = "Give either a cron expression or an interval, not both."
    elif cron:
        error = services.cron_error(cron) or ""
        error = f"The expression {error}." if error else ""
    elif interval:
        error = "" if interval.isdigit() and 1 <= int(interval) <= services.MAX_INTERVAL else "The interval must be"
        error = f"{error} a whole number of seconds from 1 to {services.MAX_INTERVAL}." if error else ""
    else:
        context = {"hint": "Type a cron expression or an interval to see its next runs."}
        return render(request, "dashboard/partials/schedules.html#preview", context)
    zone_problem = services.zone_error(tz)
    if not error and zone_problem:
        error = f"The time zone {zone_problem}."
    if not error:
        every = int(interval) if interval else None
        ticks = services.upcoming(cron=cron, interval_seconds=every, tz=tz, after=timezone.now(), count=PREVIEW_COUNT)
    # Formatted here: the template's date filter would show them in the server's zone.
    local = [(t, t.astimezone(ZoneInfo(tz)).strftime("%a %Y-%m-%d %H:%M:%S %Z")) for t in ticks]
    context = {"error": error, "ticks": local, "tz": tz}
    return render(request, "dashboard/partials/schedules.html#preview", context)


# --- actions ---------------------------------------------------------------------


@login_required
@require_POST
def set_enabled(request: HttpRequest, name: str, *, enabled: bool) -> HttpResponse:
    _operator(request)
    schedule = services.set_enabled(_get(name).name, enabled)
    text = f"Enabled {schedule.name}: next tick {_when(schedule)}." if enabled else f"Disabled {schedule.name}."
    return _done(request, text)


@login_required
@require_POST
def run_now(request: HttpRequest, name: str) -> HttpResponse:
    _operator(request)
    schedule = _get(name)
    try:
        job = services.run_now(schedule.name)
    except InvalidJob as exc:
        return _done(request, f"{schedule.name} was not run: {exc.message}", level="error")
    return _done(request, f"Submitted {schedule.name}'s job {job.id} now.")


@login_required
@require_POST
def delete(request: HttpRequest, name: str) -> HttpResponse:
    _operator(request)
    schedule = _get(name)
    services.delete_schedule(schedule.name)
    extra = " It comes back at the next start while it is declared in code." if schedule.source == "code" else ""
    return _done(request, f"Deleted the schedule {schedule.name}.{extra}")


# --- helpers ---------------------------------------------------------------------


def _done(request: HttpRequest, text: str, *, level: str = "info") -> HttpResponse:
    messages.add_message(request, messages.ERROR if level == "error" else messages.INFO, text)
    return redirect("dashboard:schedules")


def _page(request: HttpRequest, template: str, context: dict) -> HttpResponse:
    context = {
        "page_title": "Schedules",
        "nav": "schedules",
        "stream_url": None,
        "dead_count": queries.dead_total(),
        "can_operate": can_operate(request.user),
        "preview_count": PREVIEW_COUNT,
        **context,
    }
    return render(request, template, context)


def _operator(request: HttpRequest) -> None:
    if not can_operate(request.user):
        raise PermissionDenied("You may look, not act: changing schedules needs the jobs.operate_job permission.")


def _get(name: str) -> Schedule:
    try:
        return services.get_schedule(name)
    except services.ScheduleNotFound:
        raise Http404("no such schedule") from None


def _when(schedule: Schedule) -> str:
    return schedule.next_run_at.strftime("%Y-%m-%d %H:%M:%S UTC") if schedule.next_run_at else "none (disabled)"
