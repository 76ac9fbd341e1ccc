"""The workers page: each Django-Q2 cluster (host, pid, queue, started,
heartbeat age) and each of its workers (pid, memory, the jobs it runs).

Read from the clusters' heartbeats (the `Stat` each saves every half second in
the database cache; jobs/djangoq/cluster.py adds the queue and each worker's
RSS/PSS to it) and, for the jobs, from their leases: a claimed job's
`lease_owner` is "host:pid" of the worker running it, written by the claim.
A worker may run several jobs at once (a chain, the asyncio lane), which is
why the jobs are joined from the leases rather than carried in the heartbeat.

Staff only: the page names every tenant's job ids and kinds. The page polls
its own partial (htmx, every POLL_SECONDS): the heartbeats change every half
second without an event to push.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from dashboard.live.publisher import cluster_stats
from dashboard.views import _page
from jobs.models import Job, State

POLL_SECONDS = 2
RUNNING_SHOWN = 20  # per worker; the rest are counted


@dataclass
class Worker:
    pid: int
    rss: int | None
    pss: int | None
    jobs: list[dict] = field(default_factory=list)
    more: int = 0


@dataclass
class Cluster:
    id: str
    host: str
    pid: int
    queue: str
    status: str
    started: datetime | None
    heartbeat_age: float
    reincarnations: int
    workers: list[Worker]


def clusters() -> list[Cluster]:
    """Every cluster with a live heartbeat, its workers and their running jobs."""
    stats = cluster_stats()
    now = timezone.now()
    owners = {f"{stat.host}:{pid}" for stat in stats for pid in stat.workers or ()}
    running: dict[str, list[dict]] = defaultdict(list)
    for job in (
        Job.objects.filter(state=State.RUNNING, lease_owner__in=owners)
        .order_by("started_at")
        .values("id", "kind", "queue", "lease_owner", "started_at", "progress_percent")
    ):
        running[job["lease_owner"]].append(job)
    found = []
    for stat in stats:
        memory = getattr(stat, "conveyor_memory", None) or {}
        workers = []
        for pid in stat.workers or ():
            rss, pss = memory.get(pid, (None, None))
            jobs = running.get(f"{stat.host}:{pid}", [])
            workers.append(Worker(pid, rss, pss, jobs[:RUNNING_SHOWN], max(0, len(jobs) - RUNNING_SHOWN)))
        found.append(
            Cluster(
                id=str(stat.cluster_id),
                host=stat.host,
                pid=stat.pid,
                queue=getattr(stat, "queue", None) or "?",
                status=str(stat.status),
                started=getattr(stat, "tob", None),
                heartbeat_age=max(0.0, (now - stat.timestamp).total_seconds()),
                reincarnations=stat.reincarnations,
                workers=workers,
            )
        )
    found.sort(key=lambda c: (c.queue, c.host, c.pid))
    return found


@login_required
def workers(request: HttpRequest) -> HttpResponse:
    if not request.user.is_staff:
        raise PermissionDenied("the workers page is for staff")
    context = {"clusters": clusters(), "poll_seconds": POLL_SECONDS}
    if request.htmx:
        return render(request, "dashboard/workers.html#worker-list", context)
    return _page(request, "dashboard/workers.html", context, title="Workers", nav="workers", stream=None)
