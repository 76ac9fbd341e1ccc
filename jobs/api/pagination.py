"""Opaque page cursors: the position (created_at, id) of a page's last row.

A keyset position rather than an offset: pages stay stable while new jobs
arrive, and a deep page costs what the first does.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from uuid import UUID

from jobs.api.problems import Problem


def encode(created_at: datetime, row_id: UUID) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None) -> tuple[datetime, UUID] | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, row_id = raw.partition("|")
        position = datetime.fromisoformat(created), UUID(row_id)
    except (ValueError, OverflowError, binascii.Error):
        position = None
    if position is None or position[0].tzinfo is None:
        raise Problem(
            "validation-error",
            "The cursor is not one this API gave.",
            errors=[{"field": "query.cursor", "message": "is not a cursor from next_cursor"}],
        )
    return position


def page(rows: list, limit: int) -> tuple[list, str | None]:
    """The first `limit` rows and the cursor after them (rows holds up to limit + 1)."""
    if len(rows) <= limit:
        return rows, None
    rows = rows[:limit]
    return rows, encode(rows[-1].created_at, rows[-1].id)
