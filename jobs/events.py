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


def record(job_id: UUID | str | None, type: str, data: dict[str, Any] | None = None, *, queue: str = "") -> int:
    """Append an event; call inside the transaction that makes the change it describes."""
    job = str(job_id) if job_id else None
    with connection.cursor() as cursor:
        cursor.execute(_RECORD, [job, type, json.dumps(data or {}), job, type, queue])
        return cursor.fetchone()[0]
