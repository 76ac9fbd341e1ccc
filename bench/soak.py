"""`make soak`: thousands of mixed jobs on two clusters while a worker is
SIGKILLed at a steady interval; then every job is checked against what its
payload implies. Not part of `make test` or `make bench`.

1. Submit SOAK_JOBS jobs (default 10,000) to a scratch database
   (`conveyor_soak` on the embedded server, or DATABASE_URL): 10 % transient
   failures that succeed on their second attempt, 2 % permanent failures, the
   rest demo.noop and short demo.sleep.
2. Start two qclusters on the default queue. Every SOAK_KILL_EVERY seconds
   (default 30) SIGKILL one worker process, preferably one holding a running
   job (its lease names its pid); the sentinel starts a new one.
3. Wait until every job is terminal (fail after SOAK_TIMEOUT s, default 1200).
4. Check: the counts by state equal the payloads' implication; every job's
   event log is `created, (started, retrying)*, started, <terminal>` with one
   `started` per attempt (a chained claim given back unstarted, `started`
   then `queued` with reason `released`, is no attempt); attempt rows match (numbers 1..n, only the last
   one may succeed); no job succeeded twice. Print a summary table; exit 1 on
   any mismatch.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from collections import Counter, defaultdict

from bench.harness import ROOT, Cluster

SOAK_DB = "conveyor_soak"

# Share of each kind of job, in percent (the rest is demo.noop).
TRANSIENT, PERMANENT, SLEEP = 10, 2, 28


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a whole number") from None
    if value < 1:
        raise SystemExit(f"{name} must be at least 1")
    return value


def _setup() -> None:
    if "DATABASE_URL" not in os.environ:
        from config import embedded_db

        os.environ["DATABASE_URL"] = embedded_db.database_url(ROOT / ".data" / "pg", SOAK_DB)
    from bench.harness import reset, setup_django

    setup_django()
    reset()


def submit(n: int, rng: random.Random) -> dict[str, str]:
    """Submit the mix; job id -> its category."""
    from jobs.services import submit_job

    categories: dict[str, str] = {}
    for _ in range(n):
        roll = rng.uniform(0, 100)
        if roll < TRANSIENT:
            category = "transient"
            job = submit_job(
                "demo.fail",
                {"mode": "transient", "succeed_on_attempt": 2},
                backoff_base=0.5,
                backoff_max=2,
                max_attempts=10,
            )
        elif roll < TRANSIENT + PERMANENT:
            category = "permanent"
            job = submit_job("demo.fail", {"mode": "permanent"}, max_attempts=10)
        elif roll < TRANSIENT + PERMANENT + SLEEP:
            category = "sleep"
            job = submit_job("demo.sleep", {"seconds": round(rng.uniform(0.05, 0.3), 2), "steps": 2}, max_attempts=10)
        else:
            category = "noop"
            job = submit_job("demo.noop", {}, max_attempts=10)
        categories[str(job.job.id)] = category
    return categories


EXPECTED_STATE = {"transient": "succeeded", "permanent": "dead", "sleep": "succeeded", "noop": "succeeded"}


def kill_a_worker(clusters: Cluster, rng: random.Random) -> str:
    """SIGKILL a worker of one of the clusters, one with a running job if any."""
    import psutil

    from jobs.models import Job

    ours = {p.pid for proc in clusters.procs for p in psutil.Process(proc.pid).children(recursive=True)}
    owners = Job.objects.filter(state="running").exclude(lease_owner="").values_list("lease_owner", flat=True)
    busy = [pid for pid in (int(owner.rsplit(":", 1)[1]) for owner in owners) if pid in ours]
    if busy:
        pid = rng.choice(busy)
        os.kill(pid, signal.SIGKILL)
        return f"killed busy worker {pid}"
    # Otherwise any worker: the clusters' heartbeats list their workers' pids.
    from django_q.status import Stat

    idle = [pid for stat in Stat.get_all() for pid in stat.workers if pid in ours]
    if idle:
        pid = rng.choice(idle)
        os.kill(pid, signal.SIGKILL)
        return f"killed idle worker {pid}"
    return "no worker to kill"


def check(categories: dict[str, str]) -> tuple[list[str], dict]:
    """Compare every job with its payload's implication; (problems, figures)."""
    from jobs.models import Attempt, Job, JobEvent

    problems: list[str] = []
    jobs = {str(j.id): j for j in Job.objects.only("id", "state", "attempts", "error_type")}
    attempts: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for job_id, number, outcome in Attempt.objects.order_by("job_id", "id").values_list("job_id", "number", "outcome"):
        attempts[str(job_id)].append((number, outcome))
    events: dict[str, list[str]] = defaultdict(list)
    released = 0
    rows = JobEvent.objects.filter(job__isnull=False).order_by("id").values_list("job_id", "type", "data")
    for job_id, kind, data in rows:
        log = events[str(job_id)]
        if kind == "job.queued" and (data or {}).get("reason") == "released" and log[-1:] == ["job.started"]:
            # A chained job given back unstarted (jobs/engine/states.py
            # release_unstarted): its claim is undone, no attempt was made.
            log.pop()
            released += 1
        elif kind != "job.progress":
            log.append(kind)

    expected_counts = Counter(EXPECTED_STATE[c] for c in categories.values())
    actual_counts = Counter(job.state for job in jobs.values())
    if expected_counts != actual_counts:
        problems.append(f"counts by state {dict(actual_counts)} != implied {dict(expected_counts)}")
    lost = 0
    for job_id, category in categories.items():
        job = jobs.get(job_id)
        if job is None:
            problems.append(f"{job_id}: missing")
            continue
        tried = attempts[job_id]
        outcomes = [o for _, o in tried]
        lost += outcomes.count("lost")
        if job.state != EXPECTED_STATE[category]:
            problems.append(f"{job_id} ({category}): {job.state}, attempts {outcomes}")
            continue
        if [n for n, _ in tried] != list(range(1, len(tried) + 1)) or job.attempts != len(tried):
            problems.append(f"{job_id}: attempt rows {tried} vs attempts {job.attempts}")
        if outcomes.count("succeeded") > 1 or events[job_id].count("job.succeeded") > 1:
            problems.append(f"{job_id}: succeeded twice")
        retried = ["job.started", "job.retrying"] * (len(tried) - 1)
        if events[job_id] != ["job.created", *retried, "job.started", f"job.{job.state}"]:
            problems.append(f"{job_id} ({category}): events {events[job_id]} for attempts {outcomes}")
        # What the payload implies for the attempts, lost ones aside.
        failed = [o for o in outcomes[:-1] if o != "lost"]
        if category == "transient":
            ok = outcomes[-1] == "succeeded" and len(tried) >= 2 and set(failed) <= {"failed"} and len(failed) <= 1
        elif category == "permanent":
            ok = outcomes[-1] == "failed" and not failed and job.error_type == "DemoPermanentError"
        else:
            ok = outcomes[-1] == "succeeded" and not failed
        if not ok:
            problems.append(f"{job_id} ({category}): attempts {outcomes}")
    figures = {
        "expected": expected_counts,
        "actual": actual_counts,
        "attempts": sum(len(a) for a in attempts.values()),
        "lost attempts": lost,
        "released unstarted": released,
        "events": JobEvent.objects.filter(job__isnull=False).count(),
    }
    return problems, figures


def main() -> int:
    n = _env_int("SOAK_JOBS", 10_000)
    kill_every = _env_int("SOAK_KILL_EVERY", 30)
    limit = _env_int("SOAK_TIMEOUT", 1200)
    rng = random.Random(_env_int("SOAK_SEED", 9))
    started = time.monotonic()
    _setup()
    from jobs.models import Job

    print(f"soak: {n} jobs, two clusters, a worker SIGKILLed every {kill_every} s, limit {limit} s", flush=True)
    categories = submit(n, rng)
    submitted = time.monotonic()
    print(f"  submitted in {submitted - started:.0f} s: {dict(Counter(categories.values()))}", flush=True)
    kills: list[str] = []
    env = {"CONVEYOR_LEASE_SECONDS": "5", "CONVEYOR_VISIBILITY_TIMEOUT": "8", "LOG_LEVEL": "WARNING"}
    timed_out = False
    with Cluster("postgres", count=2, **env) as clusters:
        next_kill = time.monotonic() + kill_every
        while Job.objects.exclude(state__in=["succeeded", "dead"]).exists():
            now = time.monotonic()
            if now - started > limit:
                timed_out = True
                break
            if now >= next_kill:
                kills.append(kill_a_worker(clusters, rng))
                print(f"  {now - submitted:5.0f} s: {kills[-1]}", flush=True)
                next_kill = now + kill_every
            time.sleep(0.5)
        finished = time.monotonic()
    problems, figures = check(categories)
    if timed_out:
        problems.insert(0, f"not every job finished within {limit} s")

    busy_kills = sum(k.startswith("killed busy") for k in kills)
    rows = [
        ("jobs submitted", f"{n:,}"),
        *[
            (f"  {state} (implied / actual)", f"{figures['expected'][state]:,} / {figures['actual'][state]:,}")
            for state in sorted(set(figures["expected"]) | set(figures["actual"]))
        ],
        ("workers SIGKILLed (mid-job)", f"{len([k for k in kills if k.startswith('killed')])} ({busy_kills})"),
        ("attempts (lost to kills)", f"{figures['attempts']:,} ({figures['lost attempts']})"),
        ("claims given back unstarted", f"{figures['released unstarted']:,}"),
        ("job events checked", f"{figures['events']:,}"),
        ("processing time", f"{finished - submitted:.0f} s ({n / max(finished - submitted, 0.001):.0f} jobs/s)"),
        ("problems", str(len(problems))),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}")
    for problem in problems[:20]:
        print(f"PROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
