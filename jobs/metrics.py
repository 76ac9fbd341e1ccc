"""`GET /metrics`: Prometheus metrics, read from the database at each scrape.

Every Daphne process answers the same thing, whichever one the scrape
reaches, and no process keeps counts of its own (so no prometheus-client
multiprocess mode, and nothing lost when a worker is recycled or killed):

- gauges are read at scrape time: queue depth by queue and state and the age
  of the oldest runnable job (`jobs.engine.stats.queue_stats`, on the partial indexes
  of active and dead jobs), running jobs whose lease has expired (the
  running-lease index), and Django-Q2 clusters and workers online per queue
  (their heartbeats, which live in the database cache);
- counters and the attempt-duration histogram are sums over
  `conveyor_counter`, a table that triggers (migrations 0009, 0019) add to in
  the transaction of each submission, finish and attempt: exact across
  processes, never counting a rolled-back change, and untouched by the
  retention purge. Each writer adds to rows of its own backend pid, so a
  transaction held open never makes another wait; the rows of gone backends
  are folded into one per counter (`jobs.engine.counters.compact`, every
  minute), which leaves every sum as it was. About one row per counter and
  live backend;
- the age of the database's oldest open transaction (and of the oldest one
  idle in transaction, and the xid age of the oldest snapshot), one statement
  on pg_stat_activity (`jobs.engine.stats.oldest_transaction`): while it is
  open Postgres cannot remove dead rows, and claims slow down.

A scrape is four queries plus Django-Q2's reads of its heartbeats from the
database cache.
"""

from __future__ import annotations

import hmac
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from jobs.engine.stats import oldest_transaction, queue_stats

# A cluster counts as online when its last heartbeat is this recent. Django-Q2
# saves one every half second with a 3 s expiry, so in practice a cluster is
# either fresh or gone; the bound guards against a stopped clock or cache.
HEARTBEAT_SECONDS = 30

# Upper bounds of the attempt-duration buckets, seconds. Migration 0009 files
# each attempt under the first bound it fits; keep the two in step.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

DEPTH_STATES = ("waiting", "queued", "scheduled", "running", "retrying", "dead")
UNKNOWN_QUEUE = "?"  # a cluster whose heartbeat does not name its queue (see jobs/djangoq/cluster.py)

_COUNTERS = """
SELECT metric, kind, queue, label, sum(n), sum(seconds)
FROM conveyor_counter
GROUP BY metric, kind, queue, label
"""

# The running-lease partial index holds only running jobs.
_EXPIRED_LEASES = """
SELECT queue, count(*) FROM jobs_job
WHERE state = 'running' AND lease_expires_at < now()
GROUP BY queue
"""


def configured_queues() -> list[str]:
    return list(settings.CONVEYOR_QUEUES)


# --- cluster heartbeats ----------------------------------------------------------


@dataclass(frozen=True)
class ClusterBeat:
    """One Django-Q2 cluster's last heartbeat."""

    queue: str
    host: str
    pid: int
    workers: int
    status: str
    age_seconds: float


def cluster_heartbeats(*, max_age: float = HEARTBEAT_SECONDS) -> list[ClusterBeat]:
    """The clusters (of any host) that reported within `max_age` seconds and
    are not stopping."""
    from django_q.conf import Conf
    from django_q.status import Stat

    stopping = {str(Conf.STOPPING), str(Conf.STOPPED)}
    now = timezone.now()
    beats = []
    for stat in Stat.get_all():
        status = str(stat.status)
        age = (now - stat.timestamp).total_seconds()
        if status in stopping or age > max_age:
            continue
        beats.append(
            ClusterBeat(
                queue=getattr(stat, "queue", None) or UNKNOWN_QUEUE,
                host=stat.host,
                pid=stat.pid,
                workers=len(stat.workers or ()),
                status=status,
                age_seconds=max(age, 0.0),
            )
        )
    return beats


# --- the collector -----------------------------------------------------------------


class ConveyorCollector(Collector):
    """Builds every metric family from the database when scraped."""

    def collect(self) -> Iterator[Metric]:
        queues = configured_queues()
        yield from _queue_families(queues)
        yield from _cluster_families(queues, cluster_heartbeats())
        counters = _counter_rows()
        yield from _counter_families(counters)
        yield from _webhook_families(counters)
        yield from _horizon_families()


def _queue_families(queues: list[str]) -> Iterator[Metric]:
    depth = GaugeMetricFamily(
        "conveyor_queue_depth", "Jobs by queue and state (dead: the dead-letter queue).", labels=["queue", "state"]
    )
    oldest = GaugeMetricFamily(
        "conveyor_oldest_runnable_job_age_seconds",
        "How long the oldest job that could run now has been waiting (0 when none waits).",
        labels=["queue"],
    )
    paused = GaugeMetricFamily(
        "conveyor_queue_paused",
        "1 while an operator has paused the queue (nothing of it is claimed).",
        labels=["queue"],
    )
    limit = GaugeMetricFamily(
        "conveyor_queue_max_running", "The queue's limit on jobs running at once (absent: no limit).", labels=["queue"]
    )
    for row in queue_stats(always=queues):
        for state in DEPTH_STATES:
            depth.add_metric([row["queue"], state], row[state])
        oldest.add_metric([row["queue"]], max(row["oldest_queued_age_seconds"] or 0.0, 0.0))
        paused.add_metric([row["queue"]], 1.0 if row["paused"] else 0.0)
        if row["max_running"] is not None:
            limit.add_metric([row["queue"]], row["max_running"])
    expired = GaugeMetricFamily(
        "conveyor_expired_leases",
        "Running jobs whose lease has expired: their worker is gone and they await rescue.",
        labels=["queue"],
    )
    with connection.cursor() as cursor:
        cursor.execute(_EXPIRED_LEASES)
        found = dict(cursor.fetchall())
    for queue in sorted(set(queues) | set(found)):
        expired.add_metric([queue], found.get(queue, 0))
    yield from (depth, oldest, expired, paused, limit)


def _cluster_families(queues: list[str], beats: list[ClusterBeat]) -> Iterator[Metric]:
    clusters = GaugeMetricFamily(
        "conveyor_clusters_online",
        f"Django-Q2 clusters serving the queue with a heartbeat in the last {HEARTBEAT_SECONDS} s.",
        labels=["queue"],
    )
    workers = GaugeMetricFamily(
        "conveyor_workers_online", "Worker processes of the queue's online clusters.", labels=["queue"]
    )
    by_queue: dict[str, list[ClusterBeat]] = {queue: [] for queue in queues}
    for beat in beats:
        by_queue.setdefault(beat.queue, []).append(beat)
    for queue, found in sorted(by_queue.items()):
        clusters.add_metric([queue], len(found))
        workers.add_metric([queue], sum(beat.workers for beat in found))
    yield from (clusters, workers)


@dataclass(frozen=True)
class _Count:
    metric: str
    kind: str
    queue: str
    label: str
    n: int
    seconds: float


def _counter_rows() -> list[_Count]:
    with connection.cursor() as cursor:
        cursor.execute(_COUNTERS)
        return [_Count(m, k, q, label, int(n), float(s)) for m, k, q, label, n, s in cursor.fetchall()]


def _counter_families(counts: list[_Count]) -> Iterator[Metric]:
    submitted = CounterMetricFamily("conveyor_jobs_submitted", "Jobs submitted.", labels=["kind", "queue"])
    finished = CounterMetricFamily(
        "conveyor_jobs_finished",
        "Jobs that left the active states, by the state they entered (succeeded, dead, cancelled).",
        labels=["kind", "queue", "outcome"],
    )
    attempts = CounterMetricFamily(
        "conveyor_attempts",
        "Attempts that ended, by outcome (succeeded, failed, lost: its worker died, cancelled).",
        labels=["kind", "queue", "outcome"],
    )
    # kind -> upper bound -> attempts in that bucket (not cumulative yet)
    buckets: dict[str, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    seconds: dict[str, float] = defaultdict(float)
    for c in counts:
        if c.metric == "submitted":
            submitted.add_metric([c.kind, c.queue], c.n)
        elif c.metric == "finished":
            finished.add_metric([c.kind, c.queue, c.label], c.n)
        elif c.metric == "attempts":
            attempts.add_metric([c.kind, c.queue, c.label], c.n)
        elif c.metric == "attempt_seconds":
            buckets[c.kind][float(c.label)] += c.n
            seconds[c.kind] += c.seconds
    durations = HistogramMetricFamily(
        "conveyor_attempt_duration_seconds",
        "How long attempts that succeeded or failed ran, from claim to finish.",
        labels=["kind"],
    )
    for kind in sorted(buckets):
        durations.add_metric([kind], _cumulative(buckets[kind]), sum_value=seconds[kind])
    yield from (submitted, finished, attempts, durations)


def _cumulative(counts: dict[float, int]) -> list[tuple[str, float]]:
    bounds = sorted(set(DURATION_BUCKETS) | {b for b in counts if not math.isinf(b)})
    total, out = 0, []
    for bound in bounds:
        total += counts.get(bound, 0)
        out.append((floatToGoString(bound), total))
    out.append(("+Inf", total + counts.get(math.inf, 0)))
    return out


# Webhook delivery outcomes, from the states their `webhook.deliver` jobs end in.
_DELIVERY_OUTCOMES = {"succeeded": "delivered", "dead": "failed", "cancelled": "cancelled"}


def _webhook_families(counts: Iterable[_Count]) -> Iterator[Metric]:
    """Webhook messages, counted through the jobs that deliver them
    (jobs/webhooks/messages.py: one `webhook.deliver` job per message and URL)."""
    from jobs.webhooks.messages import DELIVER_KIND

    deliveries = CounterMetricFamily(
        "conveyor_webhook_deliveries",
        "Webhook deliveries that ended: delivered (answered 2xx, or 410 Gone), "
        "failed (every attempt spent, or the URL refused), cancelled.",
        labels=["outcome"],
    )
    requests = CounterMetricFamily(
        "conveyor_webhook_delivery_attempts",
        "Webhook delivery attempts by outcome (failed: an error answer, a timeout or no connection).",
        labels=["outcome"],
    )
    ended: dict[str, int] = dict.fromkeys(_DELIVERY_OUTCOMES.values(), 0)
    tried: dict[str, int] = defaultdict(int)
    for c in counts:
        if c.kind != DELIVER_KIND:
            continue
        if c.metric == "finished" and c.label in _DELIVERY_OUTCOMES:
            ended[_DELIVERY_OUTCOMES[c.label]] += c.n
        elif c.metric == "attempts":
            tried[c.label] += c.n
    for outcome, n in ended.items():
        deliveries.add_metric([outcome], n)
    for outcome, n in sorted(tried.items()):
        requests.add_metric([outcome], n)
    yield from (deliveries, requests)


def _horizon_families() -> Iterator[Metric]:
    horizon = oldest_transaction()
    oldest = GaugeMetricFamily(
        "conveyor_oldest_transaction_age_seconds",
        "Age of the oldest open transaction on the database (other than the scrape's own; 0 when none): "
        "Postgres cannot remove rows that died after it began.",
    )
    oldest.add_metric([], horizon["age_seconds"])
    idle = GaugeMetricFamily(
        "conveyor_oldest_idle_in_transaction_age_seconds",
        "Age of the oldest transaction left open by a session that is doing nothing (idle in transaction; 0 when none).",
    )
    idle.add_metric([], horizon["idle_in_transaction_age_seconds"])
    xmin = GaugeMetricFamily(
        "conveyor_oldest_backend_xmin_age",
        "Transaction ids assigned since the oldest one a backend of the database still holds "
        "(its xid or its snapshot's xmin; 0 when none).",
    )
    xmin.add_metric([], horizon["xmin_age"])
    yield from (oldest, idle, xmin)


REGISTRY = CollectorRegistry()
REGISTRY.register(ConveyorCollector())


# --- the view ------------------------------------------------------------------------


def _authorized(request: HttpRequest) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The metrics in Prometheus text (or OpenMetrics, when the scraper asks
    for it); with METRICS_TOKEN set, only for `Authorization: Bearer <token>`."""
    if not _authorized(request):
        response = HttpResponse("401 Unauthorized: send Authorization: Bearer <METRICS_TOKEN>\n", status=401)
        response["Content-Type"] = "text/plain; charset=utf-8"
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(REGISTRY), content_type=content_type)
