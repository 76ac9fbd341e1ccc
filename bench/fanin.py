"""Fan-in latency: how long after the last of 10,000 jobs finishes does the job
that waits for all of them start? Target: under 1 second.

Two shapes, each timed on one real cluster (2 workers) from the database's own
timestamps, so no clock but Postgres's is read:

- a batch of N `demo.noop` jobs with a `then` job (`submit_batch(then=...)`);
- one job with `depends_on` naming N `demo.noop` jobs.

latency = the waiting job's `started_at` - the latest `finished_at` of its
dependencies. Usage: python -m bench fanin
"""

from __future__ import annotations

import statistics
import time

from bench.harness import Cluster, Table, analyze, reset, wait_for

TARGET_SECONDS = 1.0
RUNS = 3


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


def _run(shape: str, n: int) -> tuple[float, float]:
    """One run: (latency in seconds, seconds the whole drain took)."""
    from jobs.engine.batches import submit_batch
    from jobs.engine.submission import submit_job
    from jobs.models import Batch, Job

    reset()
    noop = {"kind": "demo.noop", "payload": {}}
    if shape == "batch":
        batch = submit_batch("fan-in", [noop] * n, then=noop).batch
        then_id = Batch.objects.get(id=batch.id).then_job_id
    else:
        parts = submit_batch("parts", [noop] * n).batch
        ids = list(Job.objects.filter(batch=parts).values_list("id", flat=True))
        then_id = submit_job("demo.noop", {}, depends_on=ids).job.id
    analyze()
    started = time.monotonic()
    with Cluster("postgres", workers=2):
        wait_for(lambda: Job.objects.filter(id=then_id, state="succeeded").exists(), timeout=600, interval=0.2)
    return _latency(then_id), time.monotonic() - started


def fanin(table: Table, n: int = 10_000) -> None:
    for shape, label in (("batch", "batch then-job"), ("depends_on", "depends_on")):
        runs = [_run(shape, n) for _ in range(RUNS)]
        latency = statistics.median(r[0] for r in runs)
        drains = "/".join(f"{r[1]:.1f}" for r in runs)
        each = "/".join(f"{r[0] * 1000:.0f}" for r in runs)
        ratio = latency / TARGET_SECONDS
        print(
            f"  fan-in over {n} jobs ({label}): {latency * 1000:.0f} ms after the last dependency finished"
            f" (runs {each} ms; drains {drains} s); {ratio:.2f}x of the 1 s target",
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
