"""Admin for jobs, batches, API keys and webhooks: read-only records; changes
only through the actions, which call `jobs.services` like every other entry
point. Webhook and signing secrets are never among the fields shown."""

from __future__ import annotations

import uuid

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from jobs import services
from jobs.errors import ConveyorError
from jobs.models import (
    LIVE_TEXT_EVENTS,
    PROGRESS_EVENT,
    ApiKey,
    Attempt,
    Batch,
    Job,
    JobDependency,
    JobEvent,
    Schedule,
    TokenUsage,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class AttemptInline(ReadOnlyInline):
    model = Attempt
    fields = readonly_fields = (
        "number",
        "worker",
        "started_at",
        "finished_at",
        "outcome",
        "error_type",
        "error_message",
        "output_text",
        "log_lines",
    )

    @admin.display(description="output")
    def output_text(self, attempt: Attempt) -> str:
        return _folded(attempt.output, f"{len(attempt.output)} characters")

    @admin.display(description="logs")
    def log_lines(self, attempt: Attempt) -> str:
        return _folded(attempt.logs, f"{len(attempt.logs.splitlines())} lines")


def _folded(text: str, summary: str) -> str:
    if not text:
        return "–"
    return format_html('<details><summary>{}</summary><pre class="attempt-text">{}</pre></details>', summary, text)


class JobEventInline(ReadOnlyInline):
    model = JobEvent
    fields = readonly_fields = ("id", "type", "data", "created_at")
    ordering = ("id",)
    verbose_name_plural = "events (progress, output and log reports are on the job's live page)"

    def get_queryset(self, request):
        # A job may report progress thousands of times; its state changes are
        # bounded by its attempts.
        return super().get_queryset(request).exclude(type__in=[PROGRESS_EVENT, *LIVE_TEXT_EVENTS])


class DependencyInline(ReadOnlyInline):
    """The jobs this one waits for (workflows), with whether each has finished."""

    model = JobDependency
    fk_name = "job"
    fields = readonly_fields = ("depends_on", "resolved", "outcome", "cancelled_job")
    verbose_name_plural = "depends on"


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = (
        "short_id",
        "kind",
        "queue",
        "state",
        "attempts_display",
        "progress_percent",
        "created_at",
        "dashboard",
    )
    list_filter = ("state", "queue", "kind")
    search_fields = ("=idempotency_key",)
    search_help_text = "A job id (or its first characters) or an idempotency key."
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    list_per_page = 50
    show_full_result_count = False
    inlines = (DependencyInline, AttemptInline, JobEventInline)
    actions = ("retry_jobs", "cancel_jobs", "discard_jobs")

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Job._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False  # submit through the dashboard, the API or the CLI

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_operate_permission(self, request) -> bool:
        return request.user.is_staff and request.user.has_perm("jobs.operate_job")

    def get_search_results(self, request, queryset, search_term):
        queryset, duplicates = super().get_search_results(request, queryset, search_term)
        term = search_term.strip()
        try:
            queryset |= self.model.objects.filter(id=uuid.UUID(term))
        except ValueError:
            hex_part = term.replace("-", "").lower()
            if 4 <= len(hex_part) < 32 and all(c in "0123456789abcdef" for c in hex_part):
                # A prefix of the id is a range of the primary key.
                queryset |= self.model.objects.filter(
                    id__gte=uuid.UUID(hex_part.ljust(32, "0")), id__lte=uuid.UUID(hex_part.ljust(32, "f"))
                )
        return queryset, duplicates

    @admin.display(description="job", ordering="id")
    def short_id(self, job: Job) -> str:
        return str(job.id)[:8]

    @admin.display(description="attempts")
    def attempts_display(self, job: Job) -> str:
        return f"{job.attempts}/{job.max_attempts}"

    @admin.display(description="")
    def dashboard(self, job: Job) -> str:
        return format_html('<a href="{}">live page</a>', reverse("dashboard:job", args=[job.id]))

    @admin.action(description="Retry the selected dead or cancelled jobs", permissions=["operate"])
    def retry_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        moved = services.retry_jobs(ids=list(queryset.values_list("id", flat=True)), actor=request.user.get_username())
        self._report(request, moved, queryset.count(), "retried", "only dead or cancelled jobs can be retried")

    @admin.action(description="Discard the selected dead jobs", permissions=["operate"])
    def discard_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        moved = services.discard_jobs(
            ids=list(queryset.values_list("id", flat=True)), actor=request.user.get_username()
        )
        self._report(request, moved, queryset.count(), "discarded", "only dead jobs can be discarded")

    @admin.action(description="Cancel the selected jobs", permissions=["operate"])
    def cancel_jobs(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        moved = 0
        for job_id in queryset.values_list("id", flat=True):
            try:
                services.cancel_job(job_id, actor=request.user.get_username())
            except ConveyorError:
                continue
            moved += 1
        self._report(
            request, moved, queryset.count(), "cancelled (or asked to stop)", "finished jobs cannot be cancelled"
        )

    def _report(self, request: HttpRequest, moved: int, selected: int, done: str, why: str) -> None:
        self.message_user(
            request, f"{moved} of {selected} selected job(s) {done}.", messages.SUCCESS if moved else messages.WARNING
        )
        if moved < selected:
            self.message_user(request, f"{selected - moved} left as they were: {why}.", messages.WARNING)


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin):
    list_display = ("name", "owner", "total", "tokens_used", "token_budget", "created_at", "finished_at", "dashboard")
    search_fields = ("name", "owner")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Batch._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="")
    def dashboard(self, batch: Batch) -> str:
        return format_html('<a href="{}">live page</a>', reverse("dashboard:batch", args=[batch.id]))


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created with `manage.py createapikey` (the key is shown once);
    here they are listed and revoked."""

    list_display = ("name", "key_prefix", "scopes", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "prefix")
    ordering = ("-created_at",)
    fields = readonly_fields = ("name", "key_prefix", "scopes", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke_keys",)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="key")
    def key_prefix(self, api_key: ApiKey) -> str:
        return f"cvk_{api_key.prefix}…"

    @admin.action(description="Revoke the selected keys", permissions=["delete"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for api_key in queryset:
            services.revoke_api_key(api_key.prefix)
        self.message_user(request, f"{queryset.count()} key(s) revoked.", messages.SUCCESS)


# --- webhooks --------------------------------------------------------------------


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    """Endpoints are registered through the API or the dashboard, where their
    secret is shown once. Here they are listed and switched; the secrets are
    never shown nor editable (they are not among the fields at all)."""

    list_display = ("url", "owner", "events", "enabled", "created_at", "dashboard")
    list_filter = (("disabled_at", admin.EmptyFieldListFilter),)
    search_fields = ("url", "owner", "description")
    ordering = ("-created_at",)
    fields = readonly_fields = (
        "id",
        "url",
        "owner",
        "description",
        "event_types",
        "created_at",
        "rotated_at",
        "previous_secret_expires_at",
        "disabled_at",
        "disabled_reason",
    )
    actions = ("enable_endpoints", "disable_endpoints", "rotate_secrets")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_operate_permission(self, request) -> bool:
        return request.user.is_staff and request.user.has_perm("jobs.operate_job")

    def delete_model(self, request, obj: WebhookEndpoint) -> None:
        services.delete_endpoint(obj.id)

    def delete_queryset(self, request, queryset: QuerySet[WebhookEndpoint]) -> None:
        for endpoint_id in queryset.values_list("id", flat=True):
            services.delete_endpoint(endpoint_id)

    @admin.display(description="event types")
    def events(self, endpoint: WebhookEndpoint) -> str:
        return ", ".join(endpoint.event_types)

    @admin.display(description="enabled", boolean=True, ordering="disabled_at")
    def enabled(self, endpoint: WebhookEndpoint) -> bool:
        return endpoint.disabled_at is None

    @admin.display(description="")
    def dashboard(self, endpoint: WebhookEndpoint) -> str:
        return format_html('<a href="{}">deliveries</a>', reverse("dashboard:webhook", args=[endpoint.id]))

    @admin.action(description="Enable the selected endpoints", permissions=["operate"])
    def enable_endpoints(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        for endpoint_id in queryset.values_list("id", flat=True):
            services.enable_endpoint(endpoint_id)
        self.message_user(request, f"{queryset.count()} endpoint(s) enabled.", messages.SUCCESS)

    @admin.action(description="Disable the selected endpoints", permissions=["operate"])
    def disable_endpoints(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        reason = f"disabled by {request.user.get_username()} (admin)"
        for endpoint_id in queryset.values_list("id", flat=True):
            services.disable_endpoint(endpoint_id, reason=reason)
        self.message_user(request, f"{queryset.count()} endpoint(s) disabled.", messages.SUCCESS)

    @admin.action(description="Rotate the secrets of the selected endpoints", permissions=["operate"])
    def rotate_secrets(self, request: HttpRequest, queryset: QuerySet[WebhookEndpoint]) -> None:
        for endpoint_id in queryset.values_list("id", flat=True):
            services.rotate_endpoint_secret(endpoint_id)
        self.message_user(
            request,
            f"{queryset.count()} secret(s) rotated; the old ones keep signing for 24 hours. New secrets are "
            "never shown here: an endpoint's owner reads one by rotating in the dashboard or the API.",
            messages.SUCCESS,
        )


class WebhookAttemptInline(ReadOnlyInline):
    model = WebhookAttempt
    fk_name = "delivery"
    fields = readonly_fields = ("number", "started_at", "status_code", "latency_ms", "response_body", "error")


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ("message_id", "event_type", "url", "status", "about", "created_at")
    list_filter = ("event_type",)
    search_fields = ("=message_id", "url")
    ordering = ("-created_at",)
    date_hierarchy = "created_at"
    list_select_related = ("deliver_job",)
    show_full_result_count = False
    inlines = (WebhookAttemptInline,)
    actions = ("redeliver",)

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in WebhookDelivery._meta.fields] + ["status"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # the delivery history goes with its job, batch or endpoint

    def has_operate_permission(self, request) -> bool:
        return request.user.is_staff and request.user.has_perm("jobs.operate_job")

    @admin.display(description="status")
    def status(self, delivery: WebhookDelivery) -> str:
        return services.delivery_status(delivery)

    @admin.display(description="about")
    def about(self, delivery: WebhookDelivery) -> str:
        if delivery.job_id:
            return format_html(
                '<a href="{}">job {}</a>', reverse("dashboard:job", args=[delivery.job_id]), str(delivery.job_id)[:8]
            )
        return format_html(
            '<a href="{}">batch {}</a>',
            reverse("dashboard:batch", args=[delivery.batch_id]),
            str(delivery.batch_id)[:8],
        )

    @admin.action(description="Redeliver the selected messages (same webhook-id)", permissions=["operate"])
    def redeliver(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        sent, refused = 0, []
        for delivery_id in queryset.values_list("id", flat=True):
            try:
                services.redeliver(delivery_id)
            except ConveyorError as exc:
                refused.append(str(exc))
                continue
            sent += 1
        self.message_user(request, f"{sent} message(s) sent again.", messages.SUCCESS if sent else messages.WARNING)
        for reason in refused:
            self.message_user(request, reason, messages.WARNING)


@admin.register(TokenUsage)
class TokenUsageAdmin(admin.ModelAdmin):
    """Tokens per owner and day, written by the workers (jobs.llm.limits): read only."""

    list_display = ("day", "owner", "requests", "prompt_tokens", "completion_tokens")
    list_filter = ("owner",)
    date_hierarchy = "day"
    fields = readonly_fields = ("owner", "day", "requests", "prompt_tokens", "completion_tokens")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


# --- schedules -------------------------------------------------------------------


class ScheduleAdminForm(forms.ModelForm):
    """Validated as the API and the dashboard validate (cron, zone, kind, payload)."""

    class Meta:
        model = Schedule
        fields = services.SCHEDULE_FIELDS

    def clean(self):
        data = super().clean()
        name = self.instance.name if self.instance.pk else data.get("name")
        try:
            self.cleaned_schedule = services.validate_schedule({**data, "name": name})
        except services.InvalidSchedule as exc:
            for error in exc.errors:
                field = error["field"].split(".", 1)[0]
                self.add_error(field if field in self.fields else None, f"{error['field']}: {error['message']}")
        return data


@admin.register(Schedule)
class ScheduleAdmin(admin.ModelAdmin):
    """Saving and deleting go through `jobs.services` (which wake the clusters'
    loops and compute the next tick)."""

    form = ScheduleAdminForm
    list_display = ("name", "kind", "expression", "timezone", "enabled", "next_run_at", "last_job", "skipped", "owner")
    list_filter = ("enabled", "source", "kind")
    search_fields = ("name", "kind", "owner")
    readonly_fields = ("owner", "source", "next_run_at", "last_run_at", "last_job", "last_error", "skipped")
    readonly_fields += ("last_skipped_at", "created_at", "updated_at")
    actions = ["run_now"]

    def get_readonly_fields(self, request, obj=None):
        return (*self.readonly_fields, "name") if obj else self.readonly_fields

    def save_model(self, request, obj, form, change) -> None:
        fields = dict(form.cleaned_schedule)
        if change:
            fields.pop("name")
            saved = services.update_schedule(obj.name, **fields)
        else:
            saved = services.create_schedule(owner=f"user:{request.user.pk}", **fields)
        obj.pk = saved.pk
        obj.refresh_from_db()

    def delete_model(self, request, obj) -> None:
        services.delete_schedule(obj.name)

    def delete_queryset(self, request, queryset: QuerySet) -> None:
        for schedule in queryset:
            services.delete_schedule(schedule.name)

    @admin.action(description="Run the selected schedules now", permissions=["change"])
    def run_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        for schedule in queryset:
            try:
                job = services.run_now(schedule.name)
            except ConveyorError as exc:
                self.message_user(request, f"{schedule.name}: {exc.message}", messages.ERROR)
            else:
                self.message_user(request, f"{schedule.name}: submitted job {job.id}")
