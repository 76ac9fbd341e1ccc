"""What a running job writes while it runs, for sync jobs (`Context`, the lease
thread) and async ones (the lane) alike: its progress and its lease renewal,
each one statement for any number of jobs."""

from __future__ import annotations

import json
from typing import NamedTuple
from uuid import UUID

from jobs.db import events, sql
from jobs.db.durability import engine_statements
from jobs.models import LOG_EVENT, OUTPUT_EVENT, PROGRESS_EVENT


class Progress(NamedTuple):
    """One job's latest report. `output`: the text streamed so far ('' for
    none); `delta`: the part of it not yet sent as a `job.output` event,
    starting at `offset` of attempt `attempt`; `logs`: the attempt's log
    lines so far (None: unchanged) and `lines`, those not yet sent as a
    `job.log` event, the first of them the `first`-th line of the attempt."""

    percent: int
    message: str
    worker: str
    output: str = ""
    attempt: int = 0
    offset: int = 0
    delta: str = ""
    logs: str | None = None
    lines: tuple[str, ...] = ()
    first: int = 0
    report: bool = True  # False: only output or logs changed, no `job.progress` event


_OUTPUT_DATA = "jsonb_build_object('attempt', j.attempts, 'offset', j.out_offset, 'text', j.delta)"
_LOG_DATA = "jsonb_build_object('attempt', j.attempts, 'first', j.first, 'lines', j.lines)"

_PROGRESS = (
    "WITH p AS (SELECT * FROM jsonb_to_recordset(%s::jsonb) AS x(id uuid, percent int, message text, worker text,"
    " output text, out_offset int, delta text, logs text, lines jsonb, first int, report boolean)),"
    " j AS (UPDATE jobs_job SET progress_percent = p.percent, progress_message = p.message, updated_at = now()"
    f"  FROM p WHERE jobs_job.id = p.id AND {sql.by_id('jobs_job.state')} = 'running'"
    "  AND jobs_job.lease_owner = p.worker"
    "  RETURNING jobs_job.id, jobs_job.queue, jobs_job.cancel_requested_at, jobs_job.attempts, p.percent, p.message,"
    "  p.output, p.out_offset, p.delta, p.logs, p.lines, p.first, p.report),"
    # Only the attempt this worker holds: a lost (re-claimed) attempt's late
    # flush matches no row of j, so it cannot overwrite the new attempt's text.
    " o AS (UPDATE jobs_attempt a SET output = CASE WHEN j.output <> '' THEN j.output ELSE a.output END,"
    "  logs = coalesce(j.logs, a.logs) FROM j"
    "  WHERE a.job_id = j.id AND a.number = j.attempts AND a.finished_at IS NULL"
    "  AND (j.output <> '' OR j.logs IS NOT NULL))"
    + events.ctes(
        data_sql="jsonb_build_object('percent', j.percent, 'message', j.message)",
        when="cancel_requested_at IS NULL AND j.report",
    )
    + events.ctes(data_sql=_OUTPUT_DATA, when="j.delta <> ''", prefix="out_")
    + events.ctes(data_sql=_LOG_DATA, when="jsonb_array_length(j.lines) > 0", prefix="log_")
    # Referencing the n CTEs makes their pg_notify calls run.
    + " SELECT j.id, j.cancel_requested_at IS NOT NULL FROM j,"
    " (SELECT count(*) FROM n) AS notified, (SELECT count(*) FROM out_n) AS output_notified,"
    " (SELECT count(*) FROM log_n) AS log_notified"
)


def record_progress(reports: dict[UUID, Progress]) -> dict[UUID, bool]:
    """Write each job's progress (and its attempt's output and logs so far),
    with a `job.progress` event unless a cancel is pending, a `job.output`
    event with the new text and a `job.log` event with the new lines, in one
    statement. Returns, for each job still running under its worker, whether
    an operator asked it to stop; a job missing from the answer is no longer
    its worker's (and nothing of its report was written)."""
    rows = [
        {
            "id": str(job_id),
            "percent": p.percent,
            "message": p.message,
            "worker": p.worker,
            "output": p.output,
            "out_offset": p.offset,
            "delta": p.delta,
            "logs": p.logs,
            "lines": list(p.lines),
            "first": p.first,
            "report": p.report,
        }
        for job_id, p in reports.items()
    ]
    types = [PROGRESS_EVENT, PROGRESS_EVENT, OUTPUT_EVENT, OUTPUT_EVENT, LOG_EVENT, LOG_EVENT]
    with engine_statements(), sql.cursor() as cursor:
        cursor.execute(_PROGRESS, [json.dumps(rows), *types])
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
            f" WHERE id = ANY(%s::uuid[]) AND {sql.by_id('state')} = 'running' AND lease_owner = ANY(%s) RETURNING id",
            [seconds, ids, workers],
        )
        renewed = {row[0] for row in cursor.fetchall()}
    return [job_id for job_id in owned if job_id not in renewed]
