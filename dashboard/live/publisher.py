"""Queue statistics, published as `queue.stats` events like any other event.

Every Daphne process whose hub runs calls `publish_queue_stats` once a
second; the advisory lock and the age of the newest `queue.stats` event make
sure that, across all processes, the statistics are computed at most once a
second, by one process at a time, and not once per viewer.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from jobs import services
from jobs.db import events
from jobs.models import Job, State

log = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key: "cnvystat" read as a 64-bit integer.
LOCK_KEY = int.from_bytes(b"cnvystat", "big") & 0x7FFF_FFFF_FFFF_FFFF
# Publish unchanged statistics this often anyway, so the chart keeps moving
# and a newly opened page has a recent sample.
HEARTBEAT_SECONDS = 15.0

_LAST_PUBLISHED = """
SELECT extract(epoch FROM now() - created_at), data
FROM jobs_jobevent
WHERE job_id IS NULL AND type = 'queue.stats'
ORDER BY id DESC
LIMIT 1
"""


def publish_queue_stats(*, min_interval: float = 1.0, heartbeat: float = HEARTBEAT_SECONDS) -> int | None:
    """Record a `queue.stats` event unless another process is doing it or did
    less than `min_interval` seconds ago; returns the event id or None.

    1. Try a transaction-scoped advisory lock without waiting: if another
       process holds it, that process is publishing right now.
    2. Skip when the newest `queue.stats` event is younger than `min_interval`
       (both times read from the database clock).
    3. Compute the statistics; skip when nothing changed since the last event
       and it is younger than `heartbeat`.
    4. Record the event: its row and its pg_notify commit together.
    """
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [LOCK_KEY])
            if not cursor.fetchone()[0]:
                return None
            cursor.execute(_LAST_PUBLISHED)
            last = cursor.fetchone()
        age = float(last[0]) if last else None
        if age is not None and age < min_interval:
            return None
        data = snapshot()
        # Django's connection hands jsonb over as text.
        previous = json.loads(last[1]) if last and isinstance(last[1], str) else (last[1] if last else None)
        if previous is not None and age < heartbeat and _same(previous, data):
            return None
        return events.record(None, "queue.stats", data)


def snapshot() -> dict[str, Any]:
    """What a `queue.stats` event carries: per-queue statistics, the clusters
    online, the dead-letter total and the horizon warning."""
    queues = services.queue_stats(always=["default"])
    return {"queues": queues, "clusters": clusters_online(), "dead": dead_total(queues), "horizon": horizon()}


def horizon(*, with_query: bool = False) -> dict[str, Any] | None:
    """The oldest open transaction of the database when it has been open for
    CONVEYOR_HORIZON_WARNING_SECONDS or more, else None. Its query only
    `with_query` (staff): the event this goes into reaches every viewer and
    API client, so it never carries the query."""
    oldest = services.oldest_transaction()
    if oldest["pid"] is None or oldest["age_seconds"] < settings.CONVEYOR_HORIZON_WARNING_SECONDS:
        return None
    shown = ("age_seconds", "pid", "application_name", "state", *(("query",) if with_query else ()))
    return {key: oldest[key] for key in shown}


def _same(previous: dict, current: dict) -> bool:
    """Equal but for the clusters' uptimes and the open transaction's age,
    which change every second."""

    def stable(data: dict) -> dict:
        clusters = [{k: v for k, v in c.items() if k != "uptime_seconds"} for c in data.get("clusters", [])]
        held = data.get("horizon")
        return {**data, "clusters": clusters, "horizon": held and {**held, "age_seconds": None}}

    return stable(previous) == stable(current)


def cluster_stats() -> list:
    """Django-Q2's `Stat` of every cluster that reported in the last few
    seconds; none when the cache cannot be read."""
    from django_q.status import Stat

    try:
        return Stat.get_all()
    except Exception:  # noqa: BLE001 - a broken cache must not break the dashboard
        log.exception("reading Django-Q2 cluster stats failed")
        return []


def clusters_online() -> list[dict[str, Any]]:
    """The Django-Q2 clusters that reported in the last few seconds (their
    stats live in the database cache, so every process sees every cluster)."""
    now = timezone.now()
    clusters = []
    for stat in cluster_stats():
        tob = getattr(stat, "tob", None)
        clusters.append(
            {
                "id": str(stat.cluster_id),
                "host": stat.host,
                "pid": stat.pid,
                "status": str(stat.status),
                "workers": len(stat.workers or []),
                "uptime_seconds": round((now - tob).total_seconds()) if tob else None,
            }
        )
    clusters.sort(key=lambda c: (c["host"], c["pid"]))
    return clusters


def dead_total(queues: list[dict] | None = None) -> int:
    if queues is not None:
        return sum(q["dead"] for q in queues)
    return Job.objects.filter(state=State.DEAD).count()
