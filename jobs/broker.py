"""Everything Django-Q2 sees: the broker rows that make workers run jobs.

Django-Q2 is transport; the Job row is the truth. A broker row only says
"look at job X": the runner decides what that means. Rows are written with the
Django connection, so they commit (or roll back) with the job change that
caused them.

Delayed delivery uses the ORM broker's visibility time: a row whose `lock` is
in the future is invisible until then, so a retry or a scheduled job becomes
runnable at its time without anyone polling the jobs table.
"""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from django.utils import timezone
from django_q.humanhash import uuid as task_uuid
from django_q.models import OrmQ
from django_q.signing import SignedPackage

RUN_JOB = "jobs.runner.run_job"


def cluster_for_queue(queue: str) -> str:
    """The Django-Q2 cluster (broker list key) that serves `queue`."""
    return queue


def enqueue(job_id: UUID | str, *, queue: str, timeout: int, run_at: datetime | None = None) -> int:
    """Insert a broker row asking a worker of `queue`'s cluster to look at the job
    at `run_at` (now when None). Call inside the transaction of the job change."""
    name, task_id = task_uuid()
    now = timezone.now()
    task = {
        "id": task_id,
        "name": f"job:{job_id}",
        "func": RUN_JOB,
        "args": (str(job_id),),
        "kwargs": {},
        "started": now,
        # Django-Q2 kills a worker that runs past this; leave room for the
        # runner to record the outcome.
        "timeout": timeout + 30,
        "ack_failure": True,
        "save": False,
    }
    row = OrmQ.objects.create(
        key=cluster_for_queue(queue), payload=SignedPackage.dumps(task), lock=max(run_at or now, now)
    )
    return row.pk
