"""Admin for jobs and batches: read-only records; state changes only through
the actions, which call `jobs.services` like every other entry point."""

from __future__ import annotations

import uuid

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from jobs import services
from jobs.errors import ConveyorError
from jobs.models import ApiKey, Attempt, Batch, Job, JobEvent, TokenUsage


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
    )


class JobEventInline(ReadOnlyInline):
    model = JobEvent
    fields = readonly_fields = ("id", "type", "data", "created_at")
    ordering = ("id",)
    verbose_name_plural = "events (progress reports are on the job's live page)"

    def get_queryset(self, request):
        # A job may report progress thousands of times; its state changes are
        # bounded by its attempts.
        return super().get_queryset(request).exclude(type="job.progress")


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
    inlines = (AttemptInline, JobEventInline)
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
