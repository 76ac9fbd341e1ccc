"""Fan-in: how long after the last of 10,000 jobs finishes does the job that
waits for all of them start (target: under 1 second), and how fast do jobs
that have a dependent drain, against the same jobs without one (target: at
least half the rate)?

Three shapes, each timed on one real cluster (2 workers) from the database's
own timestamps, so no clock but Postgres's is read:

- a batch of N `demo.noop` jobs without a `then` job (the drain-rate baseline);
- a batch of N `demo.noop` jobs with a `then` job (`submit_batch(then=...)`);
- one job with `depends_on` naming N `demo.noop` jobs.

latency = the waiting job's `started_at` - the latest `finished_at` of its
dependencies; drain rate = N / (the latest `finished_at` - the earliest
`started_at` of the N jobs). Usage: python -m bench fanin
(BENCH_FANIN_N changes N; BENCH_RUNS=1 makes one run instead of the median of 3.)
"""

from __future__ import annotations

import os
import statistics
import time

from bench.harness import Cluster, Table, analyze, reset, wait_for

TARGET_SECONDS = 1.0
TARGET_RATIO = 0.5
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
N = int(os.environ.get("BENCH_FANIN_N", "10000"))


def _latency(then_id) -> float:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT extract(epoch FROM j.started_at - max(d.finished_at)) FROM jobs_job j"
            " JOIN jobs_jobdependency e ON e.job_id = j.id JOIN jobs_job d ON d.id = e.depends_on_id"
            " WHERE j.id = %s GROUP BY j.started_at",
            [str(then_id)],
        )
        return float(cursor.fetchone()[0])


def _drain_rate(batch_id) -> float:
    """Jobs a second from the batch's first start to its last finish."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) / extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs_job"
            " WHERE batch_id = %s",
            [str(batch_id)],
        )
        return float(cursor.fetchone()[0])


def _run(shape: str, n: int) -> tuple[float | None, float, float]:
    """One run: (latency in seconds or None, drain rate in jobs/s, seconds the whole run took)."""
    from jobs.engine.batches import submit_batch
    from jobs.engine.submission import submit_job
    from jobs.models import Batch, Job

    reset()
    noop = {"kind": "demo.noop", "payload": {}}
    then_id = None
    if shape == "plain":
        batch = submit_batch("plain", [noop] * n).batch
    elif shape == "batch":
        batch = submit_batch("fan-in", [noop] * n, then=noop).batch
        then_id = Batch.objects.get(id=batch.id).then_job_id
    else:
        batch = submit_batch("parts", [noop] * n).batch
        ids = list(Job.objects.filter(batch=batch).values_list("id", flat=True))
        then_id = submit_job("demo.noop", {}, depends_on=ids).job.id
    analyze()
    started = time.monotonic()
    with Cluster("postgres", workers=2):
        if then_id is None:
            done = Job.objects.filter(batch_id=batch.id, state="succeeded")
            wait_for(lambda: done.count() == n, timeout=600, interval=0.2)
        else:
            wait_for(lambda: Job.objects.filter(id=then_id, state="succeeded").exists(), timeout=600, interval=0.2)
    took = time.monotonic() - started
    return (_latency(then_id) if then_id else None), _drain_rate(batch.id), took


def fanin(table: Table, n: int = N) -> None:
    baseline = None
    for shape, label in (("plain", "no dependent"), ("batch", "batch then-job"), ("depends_on", "depends_on")):
        runs = [_run(shape, n) for _ in range(RUNS)]
        rate = statistics.median(r[1] for r in runs)
        rates = "/".join(f"{r[1]:.0f}" for r in runs)
        if baseline is None:
            baseline = rate
            print(f"  drain of {n} jobs ({label}): {rate:.0f} jobs/s (runs {rates})", flush=True)
            table.add(
                f"drain rate, {n} jobs, {label}", "jobs/s", rate, None, higher_is_better=True, detail=f"runs {rates}"
            )
            continue
        latency = statistics.median(r[0] for r in runs)
        each = "/".join(f"{r[0] * 1000:.0f}" for r in runs)
        ratio = latency / TARGET_SECONDS
        drain_ratio = rate / baseline
        print(
            f"  fan-in over {n} jobs ({label}): {latency * 1000:.0f} ms after the last dependency finished"
            f" (runs {each} ms); {ratio:.2f}x of the 1 s target; drain {rate:.0f} jobs/s (runs {rates}),"
            f" {drain_ratio:.2f}x of the rate without a dependent (target {TARGET_RATIO:.2f}x)",
            flush=True,
        )
        table.add(
            f"fan-in start latency, {n} jobs, {label}",
            "ms",
            latency * 1000,
            None,
            higher_is_better=False,
            detail=f"{ratio:.2f}x of the 1 s target (runs {each} ms)",
        )
        table.add(
            f"drain rate, {n} jobs, {label}",
            "jobs/s",
            rate,
            None,
            higher_is_better=True,
            detail=f"{drain_ratio:.2f}x of the rate without a dependent (runs {rates})",
        )
