"""History: the pages, lists and workloads on a database holding a realistic
past, against the same on an empty one, in the same run.

1. Empty database: the measurements below.
2. Load (set-based, `INSERT … SELECT generate_series`, not the API) N finished
   jobs (`--history-jobs`, default 2,000,000) spread over two years, with
   their attempts and events; 2.5 % dead in 20 kind/error groups (50,000 at
   2,000,000); 200 batches (scaled with N) of up to 10,000 jobs, the first of
   exactly 10,000; 300 webhook messages of dead jobs (3 endpoints, subscribed to job.dead); the `/metrics` counters
   (`conveyor_counter`, written set-based with the triggers off, as the
   triggers would have) and the minute rollup (by `jobs.engine.rollup.roll_up`
   itself). The secondary indexes are dropped for the load and rebuilt after
   it; then VACUUM ANALYZE and a CHECKPOINT. Prints the time and rate.
3. Full database: the same measurements.
4. Purge: `manage.py purge_jobs`' function (`purge_finished`) deletes the
   jobs older than a year (about half of them) while W2 drains at the same
   time; jobs/s of the purge, and W2's rate against its full-database rate.

Measurements, through one Daphne over real HTTP (a staff session for the
dashboard, an API key with every scope for the REST API), each item 20 times
after one warm-up request: p50/p95 of every dashboard page, the REST lists and
`/metrics`; W1 (submit_job from this process), W2 (a 2-worker cluster drains
W1's jobs), W3 (idle pickup, jobs 20 ms apart), the intake (sequential `POST
/api/v1/jobs`, to a queue no cluster serves).

Targets (issue 20): every page and list p95 <= 250 ms, `/metrics` p95 <= 200
ms, W2 and W3 within 10 % of the empty database, the purge >= 50,000 jobs/s
with W2 keeping >= 75 % of its rate.

Usage: python -m bench history [--history-jobs N]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from dataclasses import dataclass, field

from bench.harness import Cluster, Table, database_url, percentile, wait_for

DEFAULT_JOBS = 2_000_000
REQUESTS = 20
PAGE_TARGET_MS = 250.0
METRICS_TARGET_MS = 200.0
W_JOBS = 3000
PICKUP_JOBS = 100
INTAKE_REQUESTS = 200
INTAKE_QUEUE = "bench-intake"  # no cluster serves it: the intake's jobs stay queued

# (kind, queue) of the history; not demo.noop, which the workloads submit.
KINDS = [
    ("demo.sleep", "default"),
    ("llm.generate", "llm"),
    ("content.page", "llm"),
    ("webhook.deliver", "webhooks"),
    ("demo.collect", "default"),
    ("demo.fail", "default"),
]
ERRORS = [
    "TimeoutError", "ProviderError", "RateLimited", "ValidationError", "ConnectionError",
    "HTTPStatusError", "ReadTimeout", "PermanentError", "KeyError", "ValueError",
    "JSONDecodeError", "BudgetExceeded", "SSLError", "RemoteProtocolError", "ContentFilter",
    "TooManyTokens", "InvalidPayload", "LeaseLost", "Cancelled", "UnicodeDecodeError",
]  # fmt: skip
HISTORY_TABLES = ("jobs_job", "jobs_attempt", "jobs_jobevent")
TRUNCATE = (
    "TRUNCATE jobs_jobevent, jobs_attempt, jobs_webhookattempt, jobs_webhookdelivery, jobs_webhookendpoint,"
    " jobs_batch, jobs_job, django_q_ormq, django_q_task, conveyor_counter, jobs_minuterollup, jobs_rollupcursor"
    " CASCADE"
)


@dataclass
class Phase:
    """One phase's figures: latencies (ms) per item, and the workloads."""

    latencies: dict[str, list[float]] = field(default_factory=dict)
    w1: float = 0.0  # jobs/s
    w2: float = 0.0  # jobs/s
    w3: list[float] = field(default_factory=list)  # ms
    intake: list[float] = field(default_factory=list)  # ms


# --- loading ---------------------------------------------------------------------


def batch_sizes(n: int) -> list[int]:
    """200 batches at 2,000,000 jobs (scaled, at least 10), the first of
    10,000 jobs (fewer for a small N), the others 1,000 to 10,000; together
    about 55 % of the jobs."""
    count = max(10, round(200 * n / DEFAULT_JOBS))
    sizes = [min(10_000, n // 20)] + [1000 + (k * 7919) % 9001 for k in range(1, count)]
    budget = n * 6 // 10
    kept = []
    for size in sizes:
        if sum(kept) + size > budget:
            break
        kept.append(size)
    return kept


# Per job g of 1..n: h and h2 two hashes; the state from h (2.5 % dead, 1 %
# cancelled, 0.5 % discarded, the rest succeeded), the kind and the error group
# from h2, times spread evenly over two years before `now`.
_JOBS = """
INSERT INTO jobs_job (id, kind, queue, payload, state, priority, attempts, max_attempts, backoff_base, backoff_max,
  timeout, run_after, lease_owner, lease_expires_at, cancel_requested_at, progress_percent, progress_message, result,
  prompt_tokens, completion_tokens, error_type, error_message, error_traceback, owner, idempotency_key,
  request_fingerprint, callback_url, batch_id, has_dependents, pending_dependencies, on_dependency_failure,
  created_at, started_at, finished_at, updated_at)
SELECT md5('history' || g)::uuid, (%(kinds)s::text[])[k + 1], (%(queues)s::text[])[k + 1],
  jsonb_build_object('n', g), s.state, 0, s.attempts, 3, 2, 600, 600, NULL, '', NULL, NULL,
  CASE WHEN s.state = 'succeeded' THEN 100 ELSE 0 END, '',
  CASE WHEN s.state = 'succeeded' THEN '{"ok": true}'::jsonb END, 0, 0,
  CASE WHEN s.failed THEN (%(errors)s::text[])[grp + 1] ELSE '' END,
  CASE WHEN s.failed THEN 'attempt 3 of 3 failed: ' || (%(errors)s::text[])[grp + 1] ELSE '' END,
  CASE WHEN s.failed THEN 'Traceback (most recent call last):\n  ...\n' || (%(errors)s::text[])[grp + 1] ELSE '' END,
  CASE WHEN b.i > 0 OR g %% 3 = 1 THEN %(owner)s WHEN g %% 3 = 2 THEN 'apikey:0' ELSE 'user:1' END,
  CASE WHEN g %% 10 = 0 THEN 'order-' || g END, '', '', (%(batch_ids)s::uuid[])[nullif(b.i, 0)], false, 0, 'cancel',
  t.created, CASE WHEN s.attempts > 0 THEN t.created + t.wait END,
  t.created + CASE WHEN s.attempts > 0 THEN t.wait + s.attempts * t.run + (s.attempts - 1) * interval '2 s'
                   ELSE interval '1 min' END,
  t.created + CASE WHEN s.attempts > 0 THEN t.wait + s.attempts * t.run + (s.attempts - 1) * interval '2 s'
                   ELSE interval '1 min' END
FROM generate_series(1, %(n)s) g
CROSS JOIN LATERAL (SELECT g::bigint * 2654435761 %% 1000003 %% 1000 AS h, g::bigint * 40503 %% 65537 %% 20 AS grp) x
CROSS JOIN LATERAL (SELECT grp %% 6 AS k) kk
CROSS JOIN LATERAL (
  SELECT CASE WHEN h < 25 THEN 'dead' WHEN h < 35 THEN 'cancelled' WHEN h < 40 THEN 'discarded' ELSE 'succeeded' END
           AS state,
         CASE WHEN h < 25 OR h BETWEEN 35 AND 39 THEN 3 WHEN h < 35 THEN 0 WHEN h %% 10 = 0 THEN 2 ELSE 1 END AS attempts,
         h < 25 OR h BETWEEN 35 AND 39 AS failed
) s
CROSS JOIN LATERAL (SELECT greatest(width_bucket(g, %(bounds)s::bigint[]), 0) AS i) b0
CROSS JOIN LATERAL (SELECT CASE WHEN b0.i <= %(batches)s THEN b0.i ELSE 0 END AS i) b
CROSS JOIN LATERAL (
  SELECT %(now)s::timestamptz - (%(n)s - g) * (interval '730 days' / %(n)s) AS created,
         (h * 5) * interval '1 ms' AS wait,
         (10 + g::bigint * 7 %% 3000) * interval '1 ms' AS run
) t
"""

_ATTEMPTS = """
INSERT INTO jobs_attempt (job_id, number, worker, started_at, finished_at, outcome, error_type, error_message,
  traceback, output, logs)
SELECT j.id, a, 'bench-host:history', st, st + r.run,
  CASE WHEN a < j.attempts OR j.state IN ('dead', 'discarded') THEN 'failed' ELSE 'succeeded' END,
  CASE WHEN a < j.attempts OR j.state IN ('dead', 'discarded') THEN coalesce(nullif(j.error_type, ''), 'TimeoutError')
       ELSE '' END,
  CASE WHEN a < j.attempts OR j.state IN ('dead', 'discarded') THEN 'failed' ELSE '' END, '', '', ''
FROM jobs_job j
CROSS JOIN LATERAL (
  SELECT (j.finished_at - j.started_at - (j.attempts - 1) * interval '2 s') / j.attempts AS run
) r
CROSS JOIN LATERAL generate_series(1, j.attempts) a
CROSS JOIN LATERAL (SELECT j.started_at + (a - 1) * (r.run + interval '2 s') AS st) s
WHERE j.attempts > 0
"""

# In each job's order: created, (started, retrying)*, started, the end (a
# discarded job died first).
_EVENTS = """
INSERT INTO jobs_jobevent (job_id, type, data, created_at)
SELECT j.id, e.type, jsonb_build_object('state', e.state, 'attempts', e.attempts), e.at
FROM jobs_job j
CROSS JOIN LATERAL (
  SELECT (j.finished_at - j.started_at - (j.attempts - 1) * interval '2 s') / greatest(j.attempts, 1) AS run
) r
CROSS JOIN LATERAL (
  SELECT 0 AS o, 'job.created' AS type, 'queued' AS state, 0 AS attempts, j.created_at AS at
  UNION ALL
  SELECT s, CASE WHEN s %% 2 = 1 THEN 'job.started' ELSE 'job.retrying' END,
         CASE WHEN s %% 2 = 1 THEN 'running' ELSE 'retrying' END, (s + 1) / 2,
         j.started_at + ((s - 1) / 2) * (r.run + interval '2 s') + CASE WHEN s %% 2 = 0 THEN r.run ELSE interval '0' END
  FROM generate_series(1, 2 * j.attempts - 1) s
  UNION ALL
  SELECT 2 * j.attempts, CASE WHEN j.state = 'discarded' THEN 'job.dead' ELSE 'job.' || j.state END,
         CASE WHEN j.state = 'discarded' THEN 'dead' ELSE j.state END, j.attempts, j.finished_at
  UNION ALL
  SELECT 2 * j.attempts + 1, 'job.discarded', 'discarded', j.attempts, j.finished_at WHERE j.state = 'discarded'
  ORDER BY 1
) e
"""

_BATCHES = """
UPDATE jobs_batch b SET created_at = x.created, finished_at = x.finished
FROM (SELECT batch_id, min(created_at) AS created, max(finished_at) AS finished FROM jobs_job
      WHERE batch_id IS NOT NULL GROUP BY batch_id) x
WHERE b.id = x.batch_id
"""

_DELIVERIES = """
WITH d AS (
  INSERT INTO jobs_webhookdelivery (id, message_id, event_type, body, url, endpoint_id, signing_owner, job_id, batch_id,
    deliver_job_id, created_at, delivered_at)
  SELECT md5('delivery' || j.id)::uuid, 'msg_' || replace(j.id::text, '-', ''), 'job.' || j.state,
    jsonb_build_object('type', 'job.' || j.state, 'data', jsonb_build_object('id', j.id))::text,
    'https://hooks.example.com/conveyor', (%(endpoints)s::uuid[])[1 + (row_number() OVER ()) %% 3], '', j.id, NULL,
    NULL, j.finished_at, j.finished_at + interval '1 s'
  FROM (SELECT id, state, finished_at FROM jobs_job WHERE state = 'dead' ORDER BY created_at DESC LIMIT %(count)s) j
  RETURNING id, created_at
)
INSERT INTO jobs_webhookattempt (delivery_id, deliver_job_id, job_attempt_id, number, started_at, latency_ms,
  status_code, response_body, error)
SELECT id, NULL, NULL, 1, created_at, 120, 200, 'ok', '' FROM d
"""

# What the triggers of migrations 0009/0019 would have counted, in the folded
# shard: every job submitted; finished by the state it first finished in (a
# discarded job finished dead); attempts by outcome, and the duration
# histogram of those that ran to an end of their own.
_COUNTERS = """
INSERT INTO conveyor_counter (metric, kind, queue, label, shard, n, seconds)
SELECT 'submitted', kind, queue, '', -1, count(*), 0 FROM jobs_job GROUP BY kind, queue
UNION ALL
SELECT 'finished', kind, queue, CASE WHEN state = 'discarded' THEN 'dead' ELSE state END, -1, count(*), 0
FROM jobs_job GROUP BY 2, 3, 4
UNION ALL
SELECT 'attempts', j.kind, j.queue, a.outcome, -1, count(*), 0
FROM jobs_attempt a JOIN jobs_job j ON j.id = a.job_id GROUP BY 2, 3, 4
UNION ALL
SELECT 'attempt_seconds', kind, queue, label, -1, count(*), sum(elapsed)
FROM (
  SELECT j.kind, j.queue, e.elapsed,
    -- the first bound >= elapsed (the trigger's label), from how many bounds are >= elapsed
    CASE WHEN ge = 0 THEN '+Inf' ELSE (%(buckets)s::float8[])[cardinality(%(buckets)s::float8[]) - ge + 1]::text END
      AS label
  FROM jobs_attempt a JOIN jobs_job j ON j.id = a.job_id
  CROSS JOIN LATERAL (SELECT greatest(extract(epoch FROM a.finished_at - a.started_at), 0)::float8 AS elapsed) e
  CROSS JOIN LATERAL (SELECT width_bucket(-e.elapsed, %(negated)s::float8[]) AS ge) w
  WHERE a.outcome IN ('succeeded', 'failed')
) x GROUP BY 2, 3, 4
"""


def _secondary_indexes(cursor, table: str) -> list[tuple[str, str]]:
    """(name, definition) of the table's indexes that back no constraint."""
    cursor.execute(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i"
        " WHERE i.indrelid = %s::regclass AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)",
        [table],
    )
    return cursor.fetchall()


def load(n: int, *, owner: str) -> float:
    """Fill the (empty) database with n finished jobs and the rest; returns seconds."""
    import uuid

    from django.db import connection
    from django.utils import timezone

    from jobs.engine import rollup
    from jobs.metrics import DURATION_BUCKETS
    from jobs.models import WebhookEndpoint
    from jobs.webhooks.signing import new_secret

    started = time.perf_counter()
    sizes = batch_sizes(n)
    bounds = [1]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    batch_ids = [uuid.uuid5(uuid.NAMESPACE_URL, f"history-batch-{k}") for k in range(len(sizes))]
    # Straight to the table: create_endpoint would resolve the (made-up) hosts.
    # Subscribed to job.dead only: the workloads' jobs succeed, and a message to
    # each endpoint for each of them would measure webhooks, not the history.
    endpoints = [
        WebhookEndpoint.objects.create(
            owner=owner,
            url=f"https://hooks{i}.example.com/conveyor",
            event_types=["job.dead"],
            secret=new_secret(),
        ).id
        for i in range(3)
    ]
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        cursor.execute("SET maintenance_work_mem = '512MB'")
        # No triggers (the counters are written below) and no foreign-key checks for the load.
        cursor.execute("SET session_replication_role = replica")
        dropped = []
        for table in HISTORY_TABLES:
            for name, definition in _secondary_indexes(cursor, table):
                cursor.execute(f"DROP INDEX {name}")
                dropped.append(definition)
        cursor.execute(
            "INSERT INTO jobs_batch (id, name, owner, total, callback_url, created_at, prompt_tokens, completion_tokens)"
            " SELECT id, 'history batch ' || k, %s, size, '', now(), 0, 0"
            " FROM unnest(%s::uuid[], %s::int[]) WITH ORDINALITY AS b(id, size, k)",
            [owner, batch_ids, sizes],
        )
        steps = [
            (
                "jobs",
                _JOBS,
                {
                    "n": n,
                    "now": now,
                    "kinds": [k for k, _ in KINDS],
                    "queues": [q for _, q in KINDS],
                    "errors": ERRORS,
                    "owner": owner,
                    "batch_ids": batch_ids,
                    "bounds": bounds,
                    "batches": len(sizes),
                },
            ),
            ("attempts", _ATTEMPTS, {}),
            ("events", _EVENTS, {}),
            ("batches", _BATCHES, {}),
            ("deliveries", _DELIVERIES, {"endpoints": endpoints, "count": 300}),
            (
                "counters",
                _COUNTERS,
                {
                    "buckets": [float(b) for b in DURATION_BUCKETS],
                    "negated": [-float(b) for b in reversed(DURATION_BUCKETS)],
                },
            ),
        ]
        try:
            for label, statement, params in steps:
                at = time.perf_counter()
                cursor.execute(statement, params)
                print(f"    {label}: {cursor.rowcount:,} rows in {time.perf_counter() - at:.1f} s", flush=True)
        finally:
            at = time.perf_counter()
            for definition in dropped:
                cursor.execute(definition)
            print(f"    {len(dropped)} indexes rebuilt in {time.perf_counter() - at:.1f} s", flush=True)
            cursor.execute("SET session_replication_role = origin")
            cursor.execute("SET synchronous_commit = on")
    at = time.perf_counter()
    rolled = rollup.roll_up()
    print(f"    minute rollup: {rolled['rows']:,} rows in {time.perf_counter() - at:.1f} s", flush=True)
    at = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
        # The load's gigabytes of dirty pages are written now, not by a
        # checkpoint in the middle of the full database's measurements (a
        # history that has been there a while has none pending).
        cursor.execute("CHECKPOINT")
    print(f"    VACUUM ANALYZE and CHECKPOINT in {time.perf_counter() - at:.1f} s", flush=True)
    return time.perf_counter() - started


# --- measuring -----------------------------------------------------------------------


def _session_cookie() -> str:
    """A logged-in staff (superuser) session, as the login form would make."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    user, _ = get_user_model().objects.get_or_create(
        username="bench-history", defaults={"is_staff": True, "is_superuser": True}
    )
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.create()
    return session.session_key


def _targets() -> dict[str, str]:
    """Path of each measured item, on the database as it is now."""
    from jobs.models import Batch, Job

    job = Job.objects.order_by("-created_at").only("id").first()
    keyed = Job.objects.filter(idempotency_key__isnull=False).order_by("-created_at").only("idempotency_key").first()
    big = Batch.objects.order_by("-total", "id").only("id").first()
    kind = KINDS[1][0]
    items = {
        "page: overview": "/",
        "page: jobs": "/jobs/",
        "page: jobs state=succeeded": "/jobs/?state=succeeded",
        "page: jobs state=dead": "/jobs/?state=dead",
        f"page: jobs kind={kind}": f"/jobs/?kind={kind}",
        "page: jobs search id prefix": f"/jobs/?q={str(job.id)[:8] if job else 'abcd1234'}",
        "page: jobs search idempotency key": f"/jobs/?q={keyed.idempotency_key if keyed else 'order-10'}",
        "page: dead letter": "/dead-letter/",
        "page: batches": "/batches/",
        "page: webhooks": "/webhooks/",
        "page: charts (usage)": "/charts/",
        "api: GET /jobs": "/api/v1/jobs",
        "api: GET /jobs?state=dead": "/api/v1/jobs?state=dead",
        "api: GET /dlq": "/api/v1/dlq",
        "api: GET /batches": "/api/v1/batches",
        "api: GET /webhooks": "/api/v1/webhooks",
        "api: GET /queues": "/api/v1/queues",
        "api: GET /usage": "/api/v1/usage",
        "metrics": "/metrics",
    }
    if big is not None:
        items["page: jobs batch=<largest>"] = f"/jobs/?batch={big.id}"
        items["page: batch (largest)"] = f"/batches/{big.id}/"
        items["api: GET /batches/<largest>"] = f"/api/v1/batches/{big.id}"
        items["api: GET /jobs?batch=<largest>"] = f"/api/v1/jobs?batch={big.id}"
    if job is not None:
        items["page: job"] = f"/jobs/{job.id}/"
        items["api: GET /jobs/<id>/events"] = f"/api/v1/jobs/{job.id}/events"
    return items


def _requests(base: str, cookie: str, key: str) -> dict[str, list[float]]:
    import httpx

    results: dict[str, list[float]] = {}
    with httpx.Client(base_url=base, timeout=60) as client:
        for name, path in _targets().items():
            headers = (
                {"Authorization": f"Bearer {key}"} if path.startswith("/api/") else {"Cookie": f"sessionid={cookie}"}
            )
            timings = []
            for i in range(REQUESTS + 1):
                at = time.perf_counter()
                response = client.get(path, headers=headers)
                elapsed = (time.perf_counter() - at) * 1000
                if response.status_code != 200:
                    raise SystemExit(f"GET {path}: {response.status_code} {response.text[:300]}")
                if i:  # the first one warms up
                    timings.append(elapsed)
            results[name] = timings
            print(f"    {name}: p50 {percentile(timings, 50):.1f} ms, p95 {percentile(timings, 95):.1f} ms", flush=True)
    return results


def _submit(n: int) -> tuple[float, float]:
    """W1: n demo.noop jobs by submit_job from this process; (jobs/s, start time)."""
    from django.utils import timezone

    from jobs.services import submit_job

    since = timezone.now()
    at = time.perf_counter()
    for _ in range(n):
        submit_job("demo.noop", {})
    return n / (time.perf_counter() - at), since


def _noop_succeeded(since) -> int:
    from jobs.models import Job

    return Job.objects.filter(state="succeeded", created_at__gte=since, kind="demo.noop").count()


def _drain(since, n: int) -> float:
    """W2: a 2-worker cluster drains the n jobs submitted since `since`; jobs/s."""
    at = time.perf_counter()
    with Cluster("postgres", workers=2):
        wait_for(lambda: _noop_succeeded(since) >= n, timeout=900, interval=0.1)
        elapsed = time.perf_counter() - at
    return n / elapsed


def _pickup(n: int) -> list[float]:
    """W3: ms from submit commit to attempt start, n jobs 20 ms apart to an idle cluster."""
    from django.utils import timezone

    from jobs.models import Job
    from jobs.services import submit_job

    committed = {}
    since = timezone.now()
    with Cluster("postgres", workers=2):
        time.sleep(3)  # let the cluster come up and go idle (as queue_bench's W3)
        for _ in range(n):
            job = submit_job("demo.noop", {}).job
            committed[job.id] = time.time()
            time.sleep(0.02)
        wait_for(lambda: _noop_succeeded(since) >= n, timeout=120)
    started = dict(Job.objects.filter(id__in=list(committed)).values_list("id", "started_at"))
    return [(started[i].timestamp() - t) * 1000 for i, t in committed.items()]


def _intake(base: str, key: str) -> list[float]:
    """Sequential POST /api/v1/jobs to a queue no cluster serves; latencies (ms)."""
    import httpx

    body = {"kind": "demo.noop", "payload": {}, "queue": INTAKE_QUEUE}
    timings = []
    with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {key}"}) as client:
        for i in range(INTAKE_REQUESTS + 1):
            at = time.perf_counter()
            response = client.post("/api/v1/jobs", json=body)
            if response.status_code != 202:
                raise SystemExit(f"POST /api/v1/jobs: {response.status_code} {response.text[:300]}")
            if i:
                timings.append((time.perf_counter() - at) * 1000)
    return timings


def measure(label: str, *, key: str) -> Phase:
    from bench.api_submit import _daphne

    phase = Phase()
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "DEBUG": "0",
        "SECURE_SSL_REDIRECT": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "CONVEYOR_DB_POOL": os.environ.get("CONVEYOR_DB_POOL", "1"),
    }
    print(f"  -- {label} database", flush=True)
    cookie = _session_cookie()
    with _daphne(env, 1) as base:
        phase.latencies = _requests(base, cookie, key)
        phase.intake = _intake(base, key)
    print(
        f"    intake: p50 {percentile(phase.intake, 50):.1f} ms, p95 {percentile(phase.intake, 95):.1f} ms", flush=True
    )
    phase.w1, since = _submit(W_JOBS)
    phase.w2 = _drain(since, W_JOBS)
    phase.w3 = _pickup(PICKUP_JOBS)
    print(
        f"    W1 {phase.w1:,.0f} jobs/s, W2 {phase.w2:,.0f} jobs/s, W3 p50 {percentile(phase.w3, 50):.1f} ms"
        f" p95 {percentile(phase.w3, 95):.1f} ms",
        flush=True,
    )
    return phase


# --- purging -------------------------------------------------------------------------


@dataclass
class Purge:
    jobs: int
    seconds: float
    w2: float  # jobs/s while purging

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0


def purge_during_w2() -> Purge:
    """purge_finished of everything older than a year, with W2 draining at the same time."""
    from django.db import connection

    from jobs.engine.retention import purge_finished

    _, since = _submit(W_JOBS)
    outcome: dict = {}

    def purge() -> None:
        try:
            at = time.perf_counter()
            outcome["report"] = purge_finished(older_than_days=365, dead_older_than_days=365)
            outcome["seconds"] = time.perf_counter() - at
        finally:
            connection.close()

    thread = threading.Thread(target=purge)
    thread.start()
    w2 = _drain(since, W_JOBS)
    thread.join()
    return Purge(jobs=outcome["report"]["jobs"], seconds=outcome["seconds"], w2=w2)


# --- the run -----------------------------------------------------------------------


def _p(values: list[float] | None) -> str:
    if not values:
        return "n/a"  # nothing to ask for on the empty database (no batch, no job)
    return f"{percentile(values, 50):,.1f} / {percentile(values, 95):,.1f} ms"


def history(table: Table, n: int = DEFAULT_JOBS) -> None:
    from django.db import connection

    from jobs.engine.apikeys import create_api_key

    with connection.cursor() as cursor:
        cursor.execute(TRUNCATE)
    created = create_api_key("bench-history")
    key, owner = created.key, f"apikey:{created.api_key.id}"
    empty = measure("empty", key=key)
    with connection.cursor() as cursor:
        cursor.execute(TRUNCATE)
    print(f"  -- loading {n:,} jobs", flush=True)
    seconds = load(n, owner=owner)
    print(f"  loaded {n:,} jobs in {seconds:.1f} s ({n / seconds:,.0f} jobs/s)", flush=True)
    full = measure(f"{n:,}-job", key=key)
    print("  -- purge (older than 365 days) while W2 drains", flush=True)
    purge = purge_during_w2()
    print(
        f"    purged {purge.jobs:,} jobs in {purge.seconds:.1f} s ({purge.rate:,.0f} jobs/s); W2 {purge.w2:,.0f} jobs/s"
    )

    rows: list[tuple[str, str, str, str, bool | None]] = []
    for name, timings in full.latencies.items():
        target = METRICS_TARGET_MS if name == "metrics" else PAGE_TARGET_MS
        rows.append(
            (
                name,
                _p(empty.latencies.get(name)),
                _p(timings),
                f"p95 <= {target:.0f} ms",
                percentile(timings, 95) <= target,
            )
        )
    rows.append(("intake POST /api/v1/jobs (sequential)", _p(empty.intake), _p(full.intake), "(reported)", None))
    rows.append(("W1 submit_job", f"{empty.w1:,.0f} jobs/s", f"{full.w1:,.0f} jobs/s", "(reported)", None))
    rows.append(
        (
            "W2 drain, 2 workers",
            f"{empty.w2:,.0f} jobs/s",
            f"{full.w2:,.0f} jobs/s",
            ">= 0.9x empty",
            full.w2 >= 0.9 * empty.w2,
        )
    )
    w3_ok = percentile(full.w3, 95) <= 1.1 * percentile(empty.w3, 95)
    rows.append(("W3 idle pickup", _p(empty.w3), _p(full.w3), "p95 <= 1.1x empty", w3_ok))
    rows.append(
        ("purge_jobs (> 1 year old)", "", f"{purge.jobs:,} in {purge.seconds:.1f} s = {purge.rate:,.0f} jobs/s",
         ">= 50,000 jobs/s", purge.rate >= 50_000)
    )  # fmt: skip
    rows.append(
        ("W2 during the purge", "", f"{purge.w2:,.0f} jobs/s ({purge.w2 / full.w2:.2f}x)", ">= 0.75x full",
         purge.w2 >= 0.75 * full.w2)
    )  # fmt: skip
    header = ("item", "empty p50 / p95", f"{n:,} jobs p50 / p95", "target", "ok")
    cells = [header] + [(a, b, c, d, "-" if ok is None else ("yes" if ok else "NO")) for a, b, c, d, ok in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(5)]
    print(f"\nHistory: {n:,} jobs, loaded in {seconds:.1f} s ({n / seconds:,.0f} jobs/s)")
    for i, row in enumerate(cells):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print(flush=True)
    for name, timings in full.latencies.items():
        table.add(
            f"history {n:,}: {name} p95",
            "ms",
            percentile(timings, 95),
            percentile(empty.latencies[name], 95) if name in empty.latencies else None,
            higher_is_better=False,
            detail="(stock column: the empty database)",
        )
    table.add(f"history {n:,}: W2", "jobs/s", full.w2, empty.w2, higher_is_better=True, detail="vs the empty database")
    table.add(f"history {n:,}: purge", "jobs/s", purge.rate, None, higher_is_better=True, detail="target >= 50,000")


def parse(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench history")
    parser.add_argument("--history-jobs", type=int, default=DEFAULT_JOBS, help="jobs to load (default 2,000,000)")
    return parser.parse_args(argv).history_jobs
