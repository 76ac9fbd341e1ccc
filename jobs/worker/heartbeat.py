"""What a running job writes while it runs, for sync jobs (`Context`, the lease
thread) and async ones (the lane) alike: its progress and its lease renewal,
each one statement for any number of jobs."""

from __future__ import annotations

import json
from typing import NamedTuple
from uuid import UUID

from jobs.db import events, sql
from jobs.db.durability import engine_statements


class Progress(NamedTuple):
    """One job's latest report: `output`, the text streamed so far ('' for none)."""

    percent: int
    message: str
    worker: str
    output: str = ""


_PROGRESS = (
    "WITH p AS (SELECT * FROM jsonb_to_recordset(%s::jsonb)"
    " AS x(id uuid, percent int, message text, worker text, output text)),"
    " o AS (UPDATE jobs_attempt a SET output = p.output FROM p"
    "  WHERE a.job_id = p.id AND a.finished_at IS NULL AND p.output <> ''),"
    " j AS (UPDATE jobs_job SET progress_percent = p.percent, progress_message = p.message, updated_at = now()"
    "  FROM p WHERE jobs_job.id = p.id AND jobs_job.state = 'running' AND jobs_job.lease_owner = p.worker"
    "  RETURNING jobs_job.id, jobs_job.queue, jobs_job.cancel_requested_at, p.percent, p.message)"
    + events.ctes(
        data_sql="jsonb_build_object('percent', j.percent, 'message', j.message)",
        when="cancel_requested_at IS NULL",
    )
    # Referencing n makes its pg_notify calls run.
    + " SELECT j.id, j.cancel_requested_at IS NOT NULL FROM j, (SELECT count(*) FROM n) AS notified"
)


def record_progress(reports: dict[UUID, Progress]) -> dict[UUID, bool]:
    """Write each job's progress (and its attempt's output so far), with a
    `job.progress` event unless a cancel is pending, in one statement. Returns,
    for each job still running under its worker, whether an operator asked it
    to stop; a job missing from the answer is no longer its worker's."""
    rows = [
        {"id": str(job_id), "percent": p.percent, "message": p.message, "worker": p.worker, "output": p.output}
        for job_id, p in reports.items()
    ]
    with engine_statements(), sql.cursor() as cursor:
        cursor.execute(_PROGRESS, [json.dumps(rows), "job.progress", "job.progress"])
        return dict(cursor.fetchall())


def renew_leases(owned: dict[UUID, str], seconds: float) -> list[UUID]:
    """Renew the lease of every job in `owned` (job id -> the worker holding
    it) in one UPDATE, by `seconds` from now; return the jobs not renewed
    (no longer running under that worker)."""
    ids = [str(job_id) for job_id in owned]
    workers = list(set(owned.values()))
    with sql.cursor() as cursor:
        cursor.execute(
            "UPDATE jobs_job SET lease_expires_at = now() + make_interval(secs => %s)"
            " WHERE id = ANY(%s::uuid[]) AND state = 'running' AND lease_owner = ANY(%s) RETURNING id",
            [seconds, ids, workers],
        )
        renewed = {row[0] for row in cursor.fetchall()}
    return [job_id for job_id in owned if job_id not in renewed]
