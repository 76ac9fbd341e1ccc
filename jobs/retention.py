"""Deleting finished history older than the retention period."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.models import FINISHED_STATES, Job, JobEvent


def purge_finished(*, older_than_days: int | None = None, chunk: int = 5000) -> dict[str, int]:
    """Delete finished jobs (with their attempts and events) and job-less events
    older than the cutoff, in chunks so no transaction grows large."""
    days = settings.CONVEYOR["RETENTION_DAYS"] if older_than_days is None else older_than_days
    cutoff = timezone.now() - timedelta(days=days)
    jobs = 0
    while True:
        ids = list(
            Job.objects.filter(state__in=FINISHED_STATES, finished_at__lt=cutoff).values_list("id", flat=True)[:chunk]
        )
        if not ids:
            break
        with transaction.atomic():
            Job.objects.filter(id__in=ids).delete()
        jobs += len(ids)
    orphan_events, _ = JobEvent.objects.filter(job__isnull=True, created_at__lt=cutoff).delete()
    return {"jobs": jobs, "events": orphan_events}
