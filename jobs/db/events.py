"""The event log: every state change and progress report appends a JobEvent row
and announces it with pg_notify in the same transaction (delivered at commit)."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

from django.db import connection

CHANNEL = "conveyor_events"

# One round trip: the row and its notification. NOTIFY payloads are capped at
# 8000 bytes, so the notification carries only ids; listeners read the row.
_RECORD = f"""
WITH e AS (
    INSERT INTO jobs_jobevent (job_id, type, data, created_at)
    VALUES (%s, %s, %s::jsonb, now())
    RETURNING id
)
SELECT id, pg_notify('{CHANNEL}', json_build_object(
    'id', id, 'job', %s::text, 'type', %s::text, 'queue', %s::text)::text)
FROM e
"""


def ctes(*, data_sql: str = "%s::jsonb", when: str = "true", source: str = "j", prefix: str = "") -> str:
    """SQL that appends the event (and its notification) for the job row(s) an
    earlier CTE named `source` returned, to splice into a `WITH j AS (...)`
    statement. Its CTEs are `{prefix}e` and `{prefix}n`; the statement must
    reference `{prefix}n` (its pg_notify calls only run when read).

    Parameters, in order: the event type, those of `data_sql`, the event type.
    """
    e, n, j = f"{prefix}e", f"{prefix}n", source
    return (
        f", {e} AS (INSERT INTO jobs_jobevent (job_id, type, data, created_at)"
        f" SELECT id, %s, {data_sql}, now() FROM {j} WHERE {when} RETURNING id, job_id)"
        f", {n} AS (SELECT pg_notify('{CHANNEL}', json_build_object("
        f"'id', {e}.id, 'job', {e}.job_id::text, 'type', %s::text, 'queue', {j}.queue)::text)"
        f" FROM {e} JOIN {j} ON {j}.id = {e}.job_id)"
    )


def record(job_id: UUID | str | None, type: str, data: dict[str, Any] | None = None, *, queue: str = "") -> int:
    """Append an event; call inside the transaction that makes the change it describes."""
    job = str(job_id) if job_id else None
    with connection.cursor() as cursor:
        cursor.execute(_RECORD, [job, type, json.dumps(data or {}), job, type, queue])
        return cursor.fetchone()[0]
