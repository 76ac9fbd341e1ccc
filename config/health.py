from __future__ import annotations

import logging

from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.db.utils import Error as DatabaseError
from django.http import JsonResponse

from jobs.metrics import HEARTBEAT_SECONDS, cluster_heartbeats, configured_queues

log = logging.getLogger(__name__)


def healthz(request):
    """200 when this process is alive and the database answers, 503 otherwise."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return _database_unavailable(request, exc)
    return JsonResponse({"status": "ok"})


def readyz(request):
    """200 when the deployment can do its work: every migration is applied and
    each queue in CONVEYOR_QUEUES has a worker cluster whose heartbeat is at
    most HEARTBEAT_SECONDS old. Otherwise 503, the body saying what is wrong."""
    try:
        migrations = _migrations_check()
        queues = _queues_check()
    except DatabaseError as exc:
        return _database_unavailable(request, exc)
    ready = migrations["status"] == "ok" and all(q["status"] == "ok" for q in queues.values())
    body = {"status": "ok" if ready else "error", "migrations": migrations, "queues": queues}
    return JsonResponse(body, status=200 if ready else 503)


def _database_unavailable(request, exc: DatabaseError) -> JsonResponse:
    # The driver's text names hosts, socket paths, users and databases: it is
    # for the log, not for whoever can reach these unauthenticated URLs.
    log.warning("%s: the database check failed: %s", request.path, str(exc).strip())
    return JsonResponse({"status": "error", "database": "unavailable"}, status=503)


def _migrations_check() -> dict:
    executor = MigrationExecutor(connection)
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    unapplied = [f"{migration.app_label}.{migration.name}" for migration, _backwards in plan]
    if unapplied:
        return {
            "status": "error",
            "reason": "migrations are not applied (run manage.py migrate)",
            "unapplied": unapplied,
        }
    return {"status": "ok"}


def _queues_check() -> dict[str, dict]:
    beats = cluster_heartbeats()
    checks = {}
    for queue in configured_queues():
        mine = [beat for beat in beats if beat.queue == queue]
        if mine:
            checks[queue] = {
                "status": "ok",
                "clusters": len(mine),
                "workers": sum(beat.workers for beat in mine),
                "last_heartbeat_seconds_ago": round(min(beat.age_seconds for beat in mine), 3),
            }
        else:
            checks[queue] = {
                "status": "error",
                "reason": f"no worker cluster of this queue has reported in the last {HEARTBEAT_SECONDS} s"
                f" (start one: Q_CLUSTER_NAME={queue} manage.py qcluster)",
            }
    return checks
