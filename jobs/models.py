"""Jobs, their attempts and their event log: fields, constraints, read helpers.

Nothing here changes a job's state: that is `jobs.engine.states.transition`.
"""

from __future__ import annotations

import uuid

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q


class State(models.TextChoices):
    WAITING = "waiting"  # on its dependencies (jobs.engine.dependencies)
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"
    DISCARDED = "discarded"


ACTIVE_STATES = (State.WAITING, State.QUEUED, State.SCHEDULED, State.RUNNING, State.RETRYING)
FINISHED_STATES = (State.SUCCEEDED, State.DEAD, State.CANCELLED, State.DISCARDED)


class Batch(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    owner = models.CharField(max_length=100, blank=True, default="")
    total = models.PositiveIntegerField(default=0)
    callback_url = models.URLField(max_length=2000, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # Tokens its jobs' provider calls used (jobs.llm.usage), and the optional cap.
    prompt_tokens = models.BigIntegerField(default=0, db_default=0)
    completion_tokens = models.BigIntegerField(default=0, db_default=0)
    token_budget = models.BigIntegerField(
        null=True, blank=True, help_text="Jobs wait once the batch has used this many tokens; empty: no limit."
    )
    # The job submitted `waiting` with the batch, queued once every job of the batch has finished.
    then_job = models.OneToOneField(
        "Job",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        db_constraint=False,  # see Job: references to a job
        related_name="then_of",
        help_text="Runs after the batch.",
    )

    class Meta:
        verbose_name_plural = "batches"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.total})"

    @property
    def tokens_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# References to a job (or an attempt) carry no foreign-key constraint in the
# database (`db_constraint=False`, migration 0021): with one, every deleted job
# fired one check per referencing table, most of a purge's time. Django still
# cascades (or sets NULL) on `delete()` as `on_delete` says; the purge follows
# the same rules set-based (jobs/engine/retention.py RELATIONS); and every
# writer of a reference holds the job's row (a transition's UPDATE, a
# submission's lock on its dependencies), which the purge skips. Each column
# keeps its index. docs/ARCHITECTURE.md, "Referential integrity".
class Job(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=100)
    queue = models.CharField(max_length=100, default="default")
    payload = models.JSONField(default=dict)
    state = models.CharField(max_length=20, choices=State.choices, default=State.QUEUED)
    priority = models.SmallIntegerField(default=0, help_text="Higher runs first.")

    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=5)
    backoff_base = models.FloatField(default=2.0, help_text="Seconds before the first retry.")
    backoff_max = models.FloatField(default=600.0, help_text="Upper bound of any retry delay, seconds.")
    timeout = models.PositiveIntegerField(default=600, help_text="Seconds an attempt may run.")
    run_after = models.DateTimeField(null=True, blank=True)

    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)

    progress_percent = models.PositiveSmallIntegerField(default=0)
    progress_message = models.CharField(max_length=500, blank=True, default="")
    result = models.JSONField(null=True, blank=True)
    # Tokens of every provider call the job made, failed attempts included (jobs.llm.usage).
    prompt_tokens = models.BigIntegerField(default=0, db_default=0)
    completion_tokens = models.BigIntegerField(default=0, db_default=0)

    error_type = models.CharField(max_length=200, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    error_traceback = models.TextField(blank=True, default="")

    owner = models.CharField(max_length=100, blank=True, default="", help_text="Who submitted it.")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    request_fingerprint = models.CharField(max_length=64, blank=True, default="")
    callback_url = models.URLField(max_length=2000, blank=True, default="")
    batch = models.ForeignKey(Batch, null=True, blank=True, on_delete=models.CASCADE, related_name="jobs")

    # Workflows (jobs.engine.dependencies): a job some `waiting` job depends on
    # has `has_dependents` (its finish goes through the finish hook); a waiting
    # job counts its dependencies not yet finished.
    has_dependents = models.BooleanField(default=False, db_default=False)
    pending_dependencies = models.PositiveIntegerField(default=0, db_default=0)
    on_dependency_failure = models.CharField(
        max_length=10,
        choices=[("cancel", "cancel"), ("run", "run")],
        default="cancel",
        db_default="cancel",
        help_text="When a dependency ends dead, cancelled or discarded: cancel this job, or run it anyway.",
    )

    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("operate_job", "Can cancel, retry and discard jobs")]
        constraints = [
            # The idempotency guarantee: a second insert with the same key
            # fails in the database, however the two requests interleave.
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="job_unique_idempotency_key",
            ),
            models.CheckConstraint(
                condition=Q(max_attempts__gte=1, max_attempts__lte=50), name="job_max_attempts_range"
            ),
            models.CheckConstraint(condition=Q(progress_percent__lte=100), name="job_progress_range"),
        ]
        indexes = [
            # Queue statistics only ever look at active jobs; a partial index
            # keeps them fast with millions of finished rows.
            models.Index(
                fields=["queue", "state", "created_at"],
                condition=Q(state__in=["queued", "scheduled", "running", "retrying"]),
                name="job_active_by_queue",
            ),
            models.Index(fields=["lease_expires_at"], condition=Q(state="running"), name="job_running_lease"),
            models.Index(fields=["queue", "kind", "error_type"], condition=Q(state="dead"), name="job_dead"),
            models.Index(fields=["finished_at"], condition=Q(finished_at__isnull=False), name="job_finished_at"),
            models.Index(fields=["-created_at"], name="job_created_at"),
            models.Index(fields=["state", "-created_at"], name="job_state_created_at"),
            # Read with millions of finished jobs (bench/history.py, migration 0020): the
            # dead-letter queue's groups and their newest jobs; a batch's counts by
            # state (index-only) and its jobs, newest first.
            models.Index(
                fields=["kind", "error_type", "-finished_at", "-id"], condition=Q(state="dead"), name="job_dead_group"
            ),
            models.Index(fields=["batch", "state"], condition=Q(batch__isnull=False), name="job_batch_state"),
            models.Index(
                fields=["batch", "-created_at", "-id"], condition=Q(batch__isnull=False), name="job_batch_created_at"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def tokens_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class JobDependency(models.Model):
    """An edge of a workflow: `job` waits for `depends_on` to finish.
    `resolved`: the dependency has finished (in `outcome`); `cancelled_job`:
    that outcome cancelled the job (a retry of the dependency re-arms it)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="dependency_edges", db_constraint=False)
    depends_on = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="dependent_edges", db_constraint=False)
    resolved = models.BooleanField(default=False)
    outcome = models.CharField(max_length=20, blank=True, default="")
    cancelled_job = models.BooleanField(default=False)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["depends_on", "job"], name="jobdependency_unique")]

    def __str__(self) -> str:
        return f"{self.job_id} after {self.depends_on_id}"


class Attempt(models.Model):
    class Outcome(models.TextChoices):
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        LOST = "lost"
        CANCELLED = "cancelled"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempt_set", db_constraint=False)
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=200, blank=True, default="")
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=20, choices=Outcome.choices, blank=True, default="")
    error_type = models.CharField(max_length=200, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")
    output = models.TextField(
        blank=True, default="", help_text="Text a streaming handler produced (kept if it failed)."
    )
    logs = models.TextField(
        blank=True, default="", help_text="Lines the handler logged (the last 1,000 lines or 64 KiB)."
    )

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["finished_at"], name="attempt_finished_at")]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.job_id}: {self.outcome or 'running'}"


# Events a running job sends many of (every flush, ~4 a second): the live
# view's, not the job's history (timelines and the admin leave them out).
PROGRESS_EVENT = "job.progress"
OUTPUT_EVENT = "job.output"  # {"attempt", "offset", "text"}: the attempt's new text from `offset`
LOG_EVENT = "job.log"  # {"attempt", "first", "lines"}: new log lines, the first the `first`-th of the attempt
LIVE_TEXT_EVENTS = frozenset({OUTPUT_EVENT, LOG_EVENT})


class JobEvent(models.Model):
    id = models.BigAutoField(primary_key=True)
    # No index of its own: jobevent_job_id (job, id) serves every lookup by
    # job, and every job writes at least three events (one index write each).
    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.CASCADE, related_name="events", db_index=False, db_constraint=False
    )
    type = models.CharField(max_length=50)
    data = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["job", "id"], name="jobevent_job_id")]

    def __str__(self) -> str:
        return f"{self.id} {self.type}"


class ApiKey(models.Model):
    """A key for the REST API. The key itself is shown once, at creation; only
    its SHA-256 digest is kept (see `jobs.engine.apikeys`)."""

    class Scope(models.TextChoices):
        SUBMIT = "submit"
        READ = "read"
        OPERATE = "operate"

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, help_text="The key's first characters, to find it.")
    hashed_key = models.CharField(max_length=64)
    scopes = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} (cvk_{self.prefix}…)"

    @property
    def owner(self) -> str:
        """The owner string of what this key submits (idempotency keys are per owner)."""
        return f"apikey:{self.pk}"


class BatchIdempotencyKey(models.Model):
    """The Idempotency-Key a batch was submitted with (jobs keep theirs on the Job row)."""

    batch = models.OneToOneField(Batch, on_delete=models.CASCADE, related_name="idempotency")
    owner = models.CharField(max_length=100, blank=True, default="")
    key = models.CharField(max_length=255)
    request_fingerprint = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            # As for jobs: a second batch with the same key fails in the database.
            models.UniqueConstraint(fields=["owner", "key"], name="batch_unique_idempotency_key"),
        ]

    def __str__(self) -> str:
        return f"{self.owner} {self.key}"


class Page(models.Model):
    """A generated content page (kind `content.page`). Keyed by (batch, slug):
    a re-run of the job overwrites the same row."""

    batch = models.ForeignKey(Batch, null=True, blank=True, on_delete=models.CASCADE, related_name="pages")
    slug = models.SlugField(max_length=200)
    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="pages", db_constraint=False
    )
    keyword = models.CharField(max_length=300, blank=True, default="")
    title = models.CharField(max_length=300)
    meta_description = models.CharField(max_length=320, blank=True, default="")
    body_markdown = models.TextField()
    word_count = models.PositiveIntegerField(default=0)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    simulated = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "slug"], nulls_distinct=False, name="page_unique_batch_slug"),
        ]

    def __str__(self) -> str:
        return self.slug


# --- Webhooks (jobs/webhooks/) --------------------------------------------------------


class WebhookEndpoint(models.Model):
    """A URL that receives signed messages of the event types it subscribes to,
    about every job and batch. Its secret is shown once, at creation; while a
    rotation's overlap lasts, messages carry a signature by each secret."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.CharField(max_length=100, blank=True, default="", help_text='"apikey:<id>" or "user:<id>".')
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=200, blank=True, default="")
    event_types = models.JSONField(default=list, help_text="e.g. job.succeeded, job.dead, batch.completed")
    # HMAC keys: they must be readable to sign with, so they are kept as they are.
    secret = models.CharField(max_length=100)
    previous_secret = models.CharField(max_length=100, blank=True, default="")
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    rotated_at = models.DateTimeField(null=True, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    disabled_reason = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"], name="webhookendpoint_owner")]

    def __str__(self) -> str:
        return self.url


class SigningSecret(models.Model):
    """The secret that signs messages to the `callback_url` of what an owner
    submits: one per API key (owner "apikey:<id>"), and the project's default
    (owner "") for jobs submitted from the dashboard, the admin or the CLI."""

    owner = models.CharField(max_length=100, unique=True, blank=True)
    secret = models.CharField(max_length=100)
    previous_secret = models.CharField(max_length=100, blank=True, default="")
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    rotated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.owner or "(project default)"


class WebhookDelivery(models.Model):
    """One message to one URL: what is sent (the body, signed anew at each
    attempt) and under which `webhook-id`, the same on every retry and
    redelivery. A `webhook.deliver` job carries it; `deliver_job` is the latest."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    message_id = models.CharField(max_length=40, unique=True)
    event_type = models.CharField(max_length=50)
    body = models.TextField(help_text="The JSON body exactly as signed.")
    url = models.URLField(max_length=2000)
    endpoint = models.ForeignKey(
        WebhookEndpoint, null=True, blank=True, on_delete=models.CASCADE, related_name="deliveries"
    )
    signing_owner = models.CharField(
        max_length=100, blank=True, default="", help_text="Whose signing secret (callback_url messages)."
    )
    job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.CASCADE, related_name="webhook_deliveries", db_constraint=False
    )
    batch = models.ForeignKey(Batch, null=True, blank=True, on_delete=models.CASCADE, related_name="webhook_deliveries")
    deliver_job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "webhook deliveries"

    def __str__(self) -> str:
        return f"{self.event_type} {self.message_id} -> {self.url}"


class WebhookAttempt(models.Model):
    """One HTTP request of a delivery: its answer, latency and the first KiB of the response."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="attempts")
    deliver_job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    # Keyed by the engine's attempt row: a rerun of one attempt writes once,
    # and a dead delivery retried from the dead-letter queue (its attempts
    # numbered from 1 again) keeps the history of the first round.
    job_attempt = models.OneToOneField(
        Attempt, null=True, blank=True, on_delete=models.SET_NULL, related_name="webhook_attempt", db_constraint=False
    )
    number = models.PositiveIntegerField(help_text="The delivery job's attempt number.")
    started_at = models.DateTimeField()
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    response_body = models.TextField(blank=True, default="", help_text="The first 1 KiB of the response.")
    error = models.TextField(blank=True, default="", help_text="Timeout, refused address, connection error.")

    class Meta:
        ordering = ["started_at", "id"]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.delivery_id}: {self.status_code or self.error[:40]}"


# --- LLM providers: shared limits and token accounting (jobs/llm/limits.py, jobs/llm/usage.py) ---


class ProviderSlot(models.Model):
    """One of a provider's `max_concurrency` call slots, shared by every worker
    on every host. Held while `job_id` is running under `worker`'s lease and
    `expires_at` is ahead; anything else makes it free (a killed worker's slot
    frees itself when its job's lease expires)."""

    provider = models.CharField(max_length=100)
    slot = models.PositiveIntegerField()
    job_id = models.UUIDField(null=True, blank=True)
    worker = models.CharField(max_length=200, blank=True, default="")
    expires_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["provider", "slot"], name="providerslot_unique")]

    def __str__(self) -> str:
        return f"{self.provider}#{self.slot}"


class ProviderRate(models.Model):
    """A provider's requests-per-minute token bucket, shared by every worker."""

    provider = models.CharField(max_length=100, primary_key=True)
    tokens = models.FloatField(default=0)
    refilled_at = models.DateTimeField()

    def __str__(self) -> str:
        return self.provider


class TokenUsage(models.Model):
    """Tokens used per owner (an API key, "apikey:<id>", or "" for the dashboard) per day."""

    owner = models.CharField(max_length=100, blank=True, default="")
    day = models.DateField()
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)

    class Meta:
        ordering = ["-day", "owner"]
        verbose_name_plural = "token usage"
        constraints = [models.UniqueConstraint(fields=["owner", "day"], name="tokenusage_unique_owner_day")]

    def __str__(self) -> str:
        return f"{self.owner or '(dashboard)'} {self.day}"


class MinuteRollup(models.Model):
    """Finished attempts of one minute, queue and kind (jobs/engine/rollup.py):
    counts, and run and wait times as sparse histograms (`*_buckets[i]` holds
    `*_counts[i]` values; bucket b covers (2^((b-1)/4), 2^(b/4)] ms)."""

    minute = models.DateTimeField()
    queue = models.CharField(max_length=100)
    kind = models.CharField(max_length=100)
    succeeded = models.IntegerField(default=0)
    failed = models.IntegerField(default=0, help_text="Failed and lost attempts.")
    cancelled = models.IntegerField(default=0)
    run_count = models.IntegerField(default=0)
    run_ms_sum = models.BigIntegerField(default=0)
    run_buckets = ArrayField(models.SmallIntegerField(), default=list)
    run_counts = ArrayField(models.IntegerField(), default=list)
    wait_count = models.IntegerField(default=0, help_text="First attempts: from submission to start.")
    wait_buckets = ArrayField(models.SmallIntegerField(), default=list)
    wait_counts = ArrayField(models.IntegerField(), default=list)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["minute", "queue", "kind"], name="minuterollup_unique_minute_queue_kind")
        ]

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M} {self.queue} {self.kind}"


class RollupCursor(models.Model):
    """One row: the rollup covers every minute before `rolled_until`."""

    id = models.SmallIntegerField(primary_key=True, default=1)
    rolled_until = models.DateTimeField()

    def __str__(self) -> str:
        return f"rolled until {self.rolled_until:%Y-%m-%d %H:%M}"


# --- Recurring schedules (jobs/engine/scheduling.py) ----------------------------------


class Schedule(models.Model):
    """A job submitted again and again: on a cron expression or every N seconds,
    in a time zone. `next_run_at` is the next tick; the cluster that moves it
    forward (a conditional UPDATE) is the one that submits the tick's job."""

    class Overlap(models.TextChoices):
        SKIP = "skip"  # a tick while the previous job is unfinished submits nothing
        ALLOW = "allow"

    class Source(models.TextChoices):
        CODE = "code"  # declared with jobs.schedule() or @handler(schedule=...), synced at start
        RUNTIME = "runtime"  # created through the API, the dashboard or the admin

    name = models.CharField(max_length=100, unique=True)
    owner = models.CharField(max_length=100, blank=True, default="", help_text='"apikey:<id>", "user:<id>" or "".')
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.RUNTIME)
    kind = models.CharField(max_length=100)
    payload = models.JSONField(default=dict, blank=True)
    cron = models.CharField(max_length=200, blank=True, default="", help_text="Five fields, or @hourly/@daily/…")
    interval_seconds = models.PositiveIntegerField(null=True, blank=True)
    timezone = models.CharField(max_length=64, default="UTC", help_text="IANA name, e.g. Europe/Berlin.")
    enabled = models.BooleanField(default=True)
    overlap = models.CharField(max_length=10, choices=Overlap.choices, default=Overlap.SKIP)
    queue = models.CharField(max_length=100, blank=True, default="", help_text="Empty: the kind's queue.")
    priority = models.SmallIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: the kind's.")

    next_run_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_constraint=False
    )
    last_error = models.TextField(blank=True, default="")
    skipped = models.PositiveIntegerField(default=0, help_text="Ticks skipped while the previous job was unfinished.")
    last_skipped_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(cron="") & Q(interval_seconds__isnull=False))
                | (~Q(cron="") & Q(interval_seconds__isnull=True)),
                name="schedule_cron_xor_interval",
            ),
        ]
        indexes = [models.Index(fields=["next_run_at"], condition=Q(enabled=True), name="schedule_due")]

    def __str__(self) -> str:
        return self.name

    @property
    def expression(self) -> str:
        return self.cron or f"every {self.interval_seconds} s"


# --- Operator controls of a queue (jobs/engine/queues.py) ---------------------


class QueueControl(models.Model):
    """An operator's settings for one queue: `paused` (nothing of it is
    claimed; running jobs finish) and `max_running` (at most this many of its
    jobs run at once across every cluster; NULL: no limit). A queue without a
    row runs freely."""

    name = models.CharField(max_length=100, primary_key=True)
    paused = models.BooleanField(default=False)
    max_running = models.PositiveIntegerField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(max_running__isnull=True) | Q(max_running__gte=1), name="queuecontrol_max_running_min"
            )
        ]

    def __str__(self) -> str:
        return self.name


class QueueSlot(models.Model):
    """One of a limited queue's `max_running` places, taken by the claim of one
    of its jobs (in the claim's statement). Held while that job runs under a
    live lease; a finished, released or lease-expired job frees it, with no
    sweep (see `jobs.engine.queues.SLOT_FREE`)."""

    queue = models.CharField(max_length=100)
    slot = models.PositiveIntegerField()
    job_id = models.UUIDField(null=True, blank=True)
    taken_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["queue", "slot"], name="queueslot_unique")]

    def __str__(self) -> str:
        return f"{self.queue}#{self.slot}"
