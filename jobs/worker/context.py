"""The `Context` a sync handler gets besides its payload."""

from __future__ import annotations

import logging
import threading
from typing import Any

from jobs.db.durability import engine_statements
from jobs.engine import dependencies
from jobs.errors import Cancelled, LeaseLost
from jobs.models import Job
from jobs.worker.heartbeat import Progress, record_progress
from jobs.worker.joblogs import JobLog


class Context:
    """What a handler gets besides its payload: progress, cancellation, attempt."""

    def __init__(self, job: Job, worker: str) -> None:
        self.job_id = job.id
        self.kind = job.kind
        self.queue = job.queue
        self.attempt = job.attempts
        self.worker = worker
        self.lease_lost = threading.Event()
        self.joblog = JobLog()  # what the job logs (jobs/worker/joblogs.py)
        self.percent = job.progress_percent
        self.message = job.progress_message

    def report_progress(self, percent: int, message: str = "") -> None:
        """Record progress (0-100) and a message; raises Cancelled if an
        operator cancelled the job, LeaseLost if it was taken from this worker."""
        self.percent, self.message = max(0, min(100, int(percent))), message[:500]
        answer = self._write(report=True)
        if self.job_id not in answer:
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
        if answer[self.job_id]:
            raise Cancelled("cancelled by an operator")

    def log(self, message: str, level: int = logging.INFO) -> None:
        """A line for the job's log, written with the next progress report."""
        self.joblog.log(message, level)

    def flush_logs(self) -> None:
        """Write log lines not yet written (the runner, when the handler returns)."""
        if self.joblog.changed:
            self._write(report=False)

    def _write(self, *, report: bool) -> dict:
        logs, lines, first = self.joblog.take()
        progress = Progress(
            self.percent, self.message, self.worker, attempt=self.attempt, logs=logs, lines=lines, first=first
        )
        return record_progress({self.job_id: progress._replace(report=report)})

    def check_cancelled(self) -> None:
        """Raise Cancelled when an operator asked this job to stop."""
        if self.lease_lost.is_set():
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")
        with engine_statements():
            requested = Job.objects.filter(id=self.job_id).values_list("cancel_requested_at", flat=True).first()
        if requested is not None:
            raise Cancelled("cancelled by an operator")

    def dependency_results(self) -> dict[str, Any]:
        """{dependency job id: its result} of the jobs this one depended on
        (`depends_on`); None for one that did not succeed."""
        with engine_statements():
            return dependencies.dependency_results(self.job_id)

    def batch_counts(self) -> dict[str, Any] | None:
        """For a batch's `then` job: {"id", "total", "succeeded", "dead",
        "cancelled", "discarded"} of the batch; None for any other job."""
        with engine_statements():
            return dependencies.batch_counts(self.job_id)
