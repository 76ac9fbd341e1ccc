"""Why a job that has not finished is not running (or not stopping) yet."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from jobs.models import Job, State

# Error types (or messages) that mean "the provider asked us to slow down".
_THROTTLE_MARKERS = ("ratelimit", "rate_limit", "throttl", "toomanyrequests", "429", "quota")
# A queue with due jobs, none running and a job this old is not being served.
UNSERVED_AFTER_SECONDS = 30


@dataclass(frozen=True)
class Waiting:
    reason: str  # dependencies, scheduled, backoff, throttled, paused, limited, no-worker, unserved, busy, cancelling
    message: str
    until: datetime | None = None


def waiting_reason(job: Job, *, clusters: list[dict] | None, queue: dict | None) -> Waiting | None:
    """`clusters` are the Django-Q2 clusters online and `queue` the statistics
    of the job's queue (both from the latest `queue.stats` event or read fresh);
    None when the job is not waiting."""
    now = timezone.now()
    if job.state == State.RUNNING and job.cancel_requested_at:
        return Waiting("cancelling", "Cancel requested: the handler stops at its next progress report.")
    if job.state == State.WAITING:
        pending = job.pending_dependencies
        return Waiting(
            "dependencies",
            f"Waiting for {pending} job{'s' if pending != 1 else ''} it depends on to finish (listed below)",
        )
    if job.state == State.SCHEDULED or (job.state == State.QUEUED and job.run_after and job.run_after > now):
        return Waiting("scheduled", "Scheduled to run", job.run_after)
    if job.state == State.RETRYING:
        error = job.error_type or "an error"
        if _throttled(job):
            return Waiting("throttled", f"Throttled by a rate limit ({error}); it runs again", job.run_after)
        return Waiting(
            "backoff", f"Attempt {job.attempts} failed with {error}; backing off, it runs again", job.run_after
        )
    if job.state != State.QUEUED:
        return None
    if queue and queue.get("paused"):
        return Waiting("paused", f"Queue “{job.queue}” is paused by an operator; it runs once the queue is resumed.")
    if queue and queue.get("max_running") and queue.get("running", 0) >= queue["max_running"]:
        return Waiting(
            "limited",
            f"Queue “{job.queue}” runs at most {queue['max_running']} jobs at once; all its places are taken.",
        )
    if clusters is not None and not clusters:
        return Waiting(
            "no-worker", f"No worker is online: start a cluster for queue “{job.queue}” (manage.py qcluster)."
        )
    if queue and not queue.get("running") and (queue.get("oldest_queued_age_seconds") or 0) > UNSERVED_AFTER_SECONDS:
        return Waiting(
            "unserved",
            f"Workers are online but none has taken a job from queue “{job.queue}”: "
            f"is a cluster running with Q_CLUSTER_NAME={job.queue}?",
        )
    return Waiting("busy", f"Waiting for a free worker of queue “{job.queue}”.")


def _throttled(job: Job) -> bool:
    text = f"{job.error_type} {job.error_message[:200]}".lower().replace(" ", "")
    return any(marker in text for marker in _THROTTLE_MARKERS)
