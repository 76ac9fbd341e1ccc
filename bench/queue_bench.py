"""W1-W3 and competing clusters: Conveyor's Postgres broker against Django-Q2's
stock ORM broker, each running Conveyor's full job lifecycle (job row,
attempt, events), in the same run."""

from __future__ import annotations

import statistics
import time

from bench.harness import Cluster, Table, analyze, median_of, percentile, reset, wait_for

RUNS = int(__import__("os").environ.get("BENCH_RUNS", "3"))


def submit_conveyor(n: int) -> float:
    """jobs/s of n `submit_job` calls from one producer, on emptied tables."""
    from jobs.services import submit_job

    reset()
    started = time.perf_counter()
    for _ in range(n):
        submit_job("demo.noop", {})
    return n / (time.perf_counter() - started)


def submit_stock(n: int) -> float:
    """jobs/s of n Django-Q2 `async_task` calls on the stock ORM broker."""
    from django_q.brokers.orm import ORM
    from django_q.tasks import async_task

    reset()
    broker = ORM(list_key="default")
    started = time.perf_counter()
    for _ in range(n):
        async_task("jobs.worker.runner.run_job", "x", broker=broker)
    return n / (time.perf_counter() - started)


def w1_submission(table: Table, n: int = 5000) -> None:
    """One producer, n jobs: Conveyor's submit_job (job + event + broker row in
    one transaction) vs Django-Q2's async_task on the stock ORM broker."""
    c, cs = median_of(RUNS, lambda: submit_conveyor(n))
    s, ss = median_of(RUNS, lambda: submit_stock(n))
    table.add(
        f"W1 submit {n} (service call)", "jobs/s", c, s, higher_is_better=True, detail=f"runs {fmt(cs)} vs {fmt(ss)}"
    )


def _drain(broker: str, n: int, *, clusters: int = 1, workers: int = 2) -> float:
    from jobs.services import submit_job

    reset()
    for _ in range(n):
        submit_job("demo.noop", {})
    return drain_queued(broker, n, clusters=clusters, workers=workers)


def drain_queued(broker: str, n: int, *, clusters: int = 1, workers: int = 2) -> float:
    """jobs/s of a cluster started on the n `demo.noop` jobs queued (and nothing
    else), until all have succeeded; the tables are analyzed first."""
    from jobs.models import Job

    analyze()
    started = time.perf_counter()
    with Cluster(broker, workers=workers, count=clusters):
        wait_for(lambda: Job.objects.filter(state="succeeded").count() == n, timeout=600, interval=0.1)
        # Until every job has succeeded: stopping the cluster (about 2 s) is not the drain.
        elapsed = time.perf_counter() - started
    return n / elapsed


def w2_drain(table: Table, n: int = 5000) -> None:
    c, cs = median_of(RUNS, lambda: _drain("postgres", n))
    s, ss = median_of(RUNS, lambda: _drain("orm", n))
    table.add(
        f"W2 drain {n} noop, 2 workers", "jobs/s", c, s, higher_is_better=True, detail=f"runs {fmt(cs)} vs {fmt(ss)}"
    )


def pickup(broker: str, n: int) -> list[float]:
    """Latencies (ms) from submit commit to attempt start for n jobs 20 ms apart."""
    from jobs.models import Job
    from jobs.services import submit_job

    reset()
    committed = {}
    with Cluster(broker, workers=2):
        time.sleep(3)  # let the cluster come up and go idle
        for _ in range(n):
            job = submit_job("demo.noop", {}).job
            committed[job.id] = time.time()
            time.sleep(0.02)
        wait_for(lambda: Job.objects.filter(state="succeeded").count() == n, timeout=120)
    started = dict(Job.objects.values_list("id", "started_at"))
    return [(started[i].timestamp() - t) * 1000 for i, t in committed.items()]


def w3_pickup(table: Table, n: int = 200) -> None:
    runs_c = [pickup("postgres", n) for _ in range(RUNS)]
    runs_s = [pickup("orm", n) for _ in range(RUNS)]
    for label, p in (("p50", 50), ("p95", 95), ("max", 100)):
        c = statistics.median(percentile(r, p) for r in runs_c)
        s = statistics.median(percentile(r, p) for r in runs_s)
        table.add(f"W3 idle pickup {label} ({n} jobs, 20 ms apart)", "ms", c, s, higher_is_better=False)


def competing_clusters(table: Table, n: int = 5000) -> None:
    """4 clusters on one queue: every job must run exactly once."""
    from jobs.models import Attempt, Job

    def run(broker: str) -> tuple[float, int]:
        rate = _drain(broker, n, clusters=4, workers=1)
        duplicates = Attempt.objects.count() - n
        assert Job.objects.exclude(attempts=1).count() == 0 or duplicates > 0
        return rate, duplicates

    c_rate, c_dup = run("postgres")
    s_rate, s_dup = run("orm")
    table.add(
        f"4 competing clusters, {n} jobs",
        "jobs/s",
        c_rate,
        s_rate,
        higher_is_better=True,
        detail=f"duplicate executions: conveyor {c_dup}, stock {s_dup}",
    )


def fmt(values: list[float]) -> str:
    return "/".join(f"{v:,.0f}" for v in values)
