"""Pinned horizon: a transaction left open (`BEGIN; SELECT txid_current();`,
then idle in transaction) on its own connection for the whole drain, so
Postgres can remove none of the rows the drain kills (broker rows deleted, job
versions replaced). How much does the drain slow down as they pile up?

N `demo.noop` jobs (`--jobs`, default 50,000) are queued set-based
(`submit_batch`, 5,000 a batch) and the tables analyzed; then the clusters
`manage.py up` starts (one per queue of CONVEYOR_QUEUES, default settings)
drain them. Measured from the database's own timestamps (attempts'
`started_at`, the `now()` of the claim that took the job):

- drain rate of the first and the last 5,000 jobs to start: 5,000 / the span
  of their start times;
- claim round p95: per worker, the time from one claim to its next one (a
  chain claims up to CONVEYOR_CHAIN_BATCH jobs a round and runs them; noop
  jobs take microseconds, so the round is mostly the claim and finish
  statements);
- the ratio last / first, against the target of 0.5.

The same run then drains again without the pinned transaction, for
comparison. Afterwards it prints the dead rows of the tables the claim reads
and the plan of the broker's claim. Usage: python -m bench horizon [--jobs N]
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass

from bench.harness import Cluster, Table, analyze, database_url, percentile, reset, wait_for

WINDOW = 5000
TARGET = 0.5
CHUNK = 5000


@dataclass
class Window:
    rate: float  # jobs/s
    claim_p95_ms: float


@dataclass
class Drain:
    pinned: bool
    seconds: float
    first: Window
    last: Window
    dead_rows: dict[str, int]

    @property
    def ratio(self) -> float:
        return self.last.rate / self.first.rate


@contextmanager
def pinned_transaction():
    """A transaction holding an xid, idle on its own connection until the block ends."""
    import psycopg

    with psycopg.connect(database_url(), application_name="bench-horizon-pin") as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT txid_current()")
        try:
            yield
        finally:
            conn.rollback()


def _submit(n: int) -> None:
    from jobs.engine.batches import submit_batch

    noop = {"kind": "demo.noop", "payload": {}}
    for start in range(0, n, CHUNK):
        submit_batch(f"horizon-{start}", [noop] * min(CHUNK, n - start))


_STARTS = """
SELECT worker, extract(epoch FROM started_at) FROM jobs_attempt ORDER BY started_at, id
"""

_DEAD_ROWS = """
SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid)
FROM pg_stat_user_tables WHERE relname IN ('jobs_job', 'django_q_ormq', 'jobs_attempt', 'jobs_jobevent')
ORDER BY relname
"""


def _window(starts: list[tuple[str, float]]) -> Window:
    """Rate and claim round p95 of these attempts (ordered by start)."""
    span = starts[-1][1] - starts[0][1]
    rounds: list[float] = []
    last_claim: dict[str, float] = {}
    for worker, at in starts:
        previous = last_claim.get(worker)
        if previous is not None and at > previous:
            rounds.append((at - previous) * 1000)
        if previous is None or at > previous:
            last_claim[worker] = at
    return Window(rate=(len(starts) - 1) / span if span > 0 else float("inf"), claim_p95_ms=percentile(rounds, 95))


def _table_stats() -> dict[str, tuple[int, int, int]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute(_DEAD_ROWS)
        return {name: (live, dead, size) for name, live, dead, size in cursor.fetchall()}


def drain(n: int, *, pinned: bool) -> Drain:
    from django.conf import settings
    from django.db import connection

    from jobs.models import Job

    reset()
    _submit(n)
    analyze()
    print(f"  {n:,} jobs queued; draining {'with' if pinned else 'without'} a pinned transaction", flush=True)
    with pinned_transaction() if pinned else _nothing():
        started = time.perf_counter()
        clusters = [Cluster("postgres", queue=queue) for queue in settings.CONVEYOR_QUEUES]
        try:
            wait_for(lambda: Job.objects.filter(state="succeeded").count() == n, timeout=1800, interval=0.25)
            seconds = time.perf_counter() - started
        finally:
            for cluster in clusters:
                cluster.stop()
        stats = _table_stats()
        if pinned:
            _explain_claim()
    with connection.cursor() as cursor:
        cursor.execute(_STARTS)
        starts = [(worker, float(at)) for worker, at in cursor.fetchall()]
    result = Drain(
        pinned=pinned,
        seconds=seconds,
        first=_window(starts[:WINDOW]),
        last=_window(starts[-WINDOW:]),
        dead_rows={name: dead for name, (_, dead, _) in stats.items()},
    )
    for name, (live, dead, size) in stats.items():
        print(f"    {name}: {live:,} live, {dead:,} dead rows, {size / 2**20:,.1f} MiB", flush=True)
    return result


@contextmanager
def _nothing():
    yield


def _explain_claim() -> None:
    """The plan of the broker's claim (jobs/djangoq/broker.py) on the tables as
    the drain left them: what it reads to find (no) ready rows."""
    from django.db import connection, transaction

    from jobs.djangoq import broker

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + broker._CLAIM.format(limit=10),
            ["default", "default", broker.cluster_for_queue("default"), 60],
        )
        plan = "\n".join(f"      {row[0]}" for row in cursor.fetchall())
        transaction.set_rollback(True)
    print("    broker claim, after the drain:\n" + plan, flush=True)


def horizon(table: Table, n: int = 50_000) -> None:
    if n < 2 * WINDOW:
        raise SystemExit(f"--jobs must be at least {2 * WINDOW:,} (two windows of {WINDOW:,})")
    runs = [drain(n, pinned=True), drain(n, pinned=False)]
    for run in runs:
        label = "pinned transaction" if run.pinned else "no open transaction"
        verdict = "met" if run.ratio >= TARGET else "NOT met"
        print(
            f"  {label}: {n:,} jobs in {run.seconds:.1f} s ({n / run.seconds:,.0f} jobs/s); "
            f"first {WINDOW:,} {run.first.rate:,.0f} jobs/s (claim round p95 {run.first.claim_p95_ms:.1f} ms), "
            f"last {WINDOW:,} {run.last.rate:,.0f} jobs/s (p95 {run.last.claim_p95_ms:.1f} ms); "
            f"last/first {run.ratio:.2f} (target >= {TARGET}: {verdict})",
            flush=True,
        )
        table.add(
            f"horizon {n:,}, {label}: last/first {WINDOW:,} rate",
            "ratio",
            run.ratio,
            None,
            higher_is_better=True,
            detail=f"{run.first.rate:,.0f} -> {run.last.rate:,.0f} jobs/s; claim round p95 "
            f"{run.first.claim_p95_ms:.1f} -> {run.last.claim_p95_ms:.1f} ms; target >= {TARGET}: {verdict}",
        )


def parse(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench horizon")
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs to drain (default 50,000)")
    return parser.parse_args(argv).jobs
