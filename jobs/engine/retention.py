"""Deleting finished history older than the retention period.

Dead jobs (the dead-letter queue) are kept for their own, longer period: an
operator may still retry them. A job with a webhook message still to deliver
is never deleted, however old: deleting it would delete the message with it
(and the delivery job's retry would find nothing to send).
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from jobs.models import ACTIVE_STATES, FINISHED_STATES, Job, JobEvent, State, WebhookDelivery

# A delivery job in one of these states may still send its message: waiting or
# running, or dead (an operator can retry it from the dead-letter queue).
_STILL_DELIVERING = (*ACTIVE_STATES, State.DEAD)


def purge_finished(
    *, older_than_days: int | None = None, dead_older_than_days: int | None = None, chunk: int = 5000
) -> dict:
    """Delete finished jobs (with their attempts and events) and job-less events
    older than the cutoffs, in chunks so no transaction grows large. Returns
    {"jobs": n, "events": n, "by_state": {state: n}}."""
    conveyor = settings.CONVEYOR
    now = timezone.now()
    cutoff = now - timedelta(days=conveyor["RETENTION_DAYS"] if older_than_days is None else older_than_days)
    dead_days = conveyor["DEAD_RETENTION_DAYS"] if dead_older_than_days is None else dead_older_than_days
    dead_cutoff = now - timedelta(days=dead_days)
    undelivered = WebhookDelivery.objects.filter(
        job=OuterRef("pk"), delivered_at__isnull=True, deliver_job__state__in=_STILL_DELIVERING
    )
    due = (
        Job.objects.filter(
            Q(state__in=[s for s in FINISHED_STATES if s != State.DEAD], finished_at__lt=cutoff)
            | Q(state=State.DEAD, finished_at__lt=dead_cutoff)
        )
        .exclude(Exists(undelivered))
        .order_by()
    )
    by_state: Counter[str] = Counter()
    while True:
        with transaction.atomic():
            # Locked, so that a dead job an operator retries meanwhile is
            # either retried (and skipped here) or deleted, never both.
            rows = list(due.select_for_update(skip_locked=True, of=("self",)).values_list("id", "state")[:chunk])
            if not rows:
                break
            Job.objects.filter(id__in=[job_id for job_id, _ in rows]).delete()
        by_state.update(state for _, state in rows)
    orphan_events, _ = JobEvent.objects.filter(job__isnull=True, created_at__lt=cutoff).delete()
    # In the order of the lifecycle, for a stable report.
    ordered = {state.value: by_state[state] for state in FINISHED_STATES if by_state[state]}
    return {"jobs": sum(by_state.values()), "events": orphan_events, "by_state": ordered}
