"""The `Context` a sync handler gets besides its payload."""

from __future__ import annotations

import json
import threading

from jobs.db import events, sql
from jobs.db.durability import engine_statements
from jobs.errors import Cancelled, LeaseLost
from jobs.models import Job


class Context:
    """What a handler gets besides its payload: progress, cancellation, attempt."""

    def __init__(self, job: Job, worker: str) -> None:
        self.job_id = job.id
        self.kind = job.kind
        self.queue = job.queue
        self.attempt = job.attempts
        self.worker = worker
        self.lease_lost = threading.Event()

    def report_progress(self, percent: int, message: str = "") -> None:
        """Record progress (0-100) and a message; raises Cancelled if an
        operator cancelled the job, LeaseLost if it was taken from this worker."""
        percent = max(0, min(100, int(percent)))
        message = message[:500]
        # One statement: the progress, its event (unless a cancel is pending)
        # and the notification.
        with engine_statements(), sql.cursor() as cursor:
            cursor.execute(
                "WITH j AS (UPDATE jobs_job SET progress_percent = %s, progress_message = %s, updated_at = now()"
                " WHERE id = %s AND state = 'running' AND lease_owner = %s RETURNING id, queue, cancel_requested_at)"
                + events.ctes(when="cancel_requested_at IS NULL")
                + " SELECT j.cancel_requested_at, (SELECT count(*) FROM n) FROM j",
                [
                    percent,
                    message,
                    str(self.job_id),
                    self.worker,
                    "job.progress",
                    json.dumps({"percent": percent, "message": message}),
                    "job.progress",
                ],
            )
            row = cursor.fetchone()
        if row is None:
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
        if row[0] is not None:
            raise Cancelled("cancelled by an operator")

    def check_cancelled(self) -> None:
        """Raise Cancelled when an operator asked this job to stop."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
        with engine_statements():
            requested = Job.objects.filter(id=self.job_id).values_list("cancel_requested_at", flat=True).first()
        if requested is not None:
            raise Cancelled("cancelled by an operator")
