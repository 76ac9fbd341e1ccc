"""`python -m bench peers`: W1-W4 for Conveyor, Django-Q2 (stock ORM broker),
Celery (Redis broker and result backend) and Procrastinate (same Postgres), in
one run, with the same task bodies, and the table of Conveyor against the best
of them. Celery and Procrastinate come from the `bench` extra
(`pip install -e '.[bench]'`); redis-server from Debian, installed here when
missing. Every run is checked against the peer's own store: every task done,
exactly once. Sizes: BENCH_RUNS (median of, default 3), BENCH_PEERS_JOBS (W1
and W2, default 2,000: 5,000 as in `w1`/`w2` takes about 10 minutes)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import llm_bench, queue_bench
from bench.harness import LOGS, ROOT, Table, percentile, wait_for

RUNS = int(os.environ.get("BENCH_RUNS", "3"))
JOBS = int(os.environ.get("BENCH_PEERS_JOBS", "2000"))
W3_JOBS = 200  # 20 ms apart, as queue_bench.pickup
W2_CONCURRENCY = 10  # per Procrastinate worker process (2 processes)
W4_CONCURRENCY = 100  # Celery's thread pool, Procrastinate's one worker
PEERS_DB = "conveyor_bench_peers"
PEERS = ("Django-Q2", "Celery+Redis", "Procrastinate")


# -- processes -----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, *, timeout: float = 30) -> None:
    """SIGTERM (a warm shutdown for both peers' workers), then its whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _spawn(argv: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    LOGS.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=open(LOGS / log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


class Workers:
    """Worker processes of one peer, stopped together."""

    def __init__(self, argvs: list[list[str]], log: str, env: dict[str, str]) -> None:
        self.procs = [_spawn(argv, f"{log}-{i}.log", env) for i, argv in enumerate(argvs)]

    def check(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                sys.exit(f"peer worker {proc.args} exited with {proc.returncode}; see {LOGS}")

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            _stop(proc)


def ensure_redis_server() -> str:
    """Debian's redis-server, installed when missing (as .ci/run installs Chromium)."""
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if found:
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*sudo, "apt-get", "update"], check=True, env=env)
    subprocess.run([*sudo, "apt-get", "install", "-y", "redis-server"], check=True, env=env)
    found = shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if not found:
        sys.exit("apt-get installed redis-server but there is no redis-server binary")
    return found


class RedisServer:
    """A redis-server of our own: a free loopback port, a temporary folder, no
    snapshots; stopped by its pid."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = _spawn(
            [ensure_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", ""],
            "redis.log",
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        wait_for(self._answers, timeout=30, interval=0.1)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            sys.exit(f"redis-server exited with {self.proc.returncode}; see {LOGS / 'redis.log'}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        _stop(self.proc, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the table -----------------------------------------------------------------


@dataclass
class Row:
    workload: str
    unit: str
    higher_is_better: bool
    target: str
    values: dict[str, float | None] = field(default_factory=dict)
    detail: str = ""


def _ratio(row: Row) -> float | None:
    conveyor = row.values.get("Conveyor")
    peers = [v for name, v in row.values.items() if name != "Conveyor" and v]
    if not conveyor or not peers:
        return None
    # Above 1 = Conveyor ahead: its rate over the best rate, or the best time over its time.
    return conveyor / max(peers) if row.higher_is_better else min(peers) / conveyor


def render(rows: list[Row]) -> str:
    header = ["workload", "unit", "Conveyor", *PEERS, "Conveyor vs best peer", "target"]
    lines = []
    for row in rows:
        ratio = _ratio(row)
        verdict = "n/a" if ratio is None else ("met" if ratio > 1.0 else "not met")
        cells = [row.workload, row.unit]
        cells += [
            "n/a" if row.values.get(name) is None else f"{row.values[name]:,.1f}" for name in ("Conveyor", *PEERS)
        ]
        cells += ["n/a" if ratio is None else f"{ratio:.2f}x", f"{row.target}: {verdict}"]
        lines.append(cells)
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    out += [f"  {row.workload}: {row.detail}" for row in rows if row.detail]
    out.append("  (vs best peer above 1.00x = Conveyor ahead: rate / best rate, best time / time)")
    return "\n".join(out)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _runs(label: str, measure: Callable[[], float]) -> list[float]:
    values = []
    for _ in range(RUNS):
        values.append(measure())
        print(f"    {label}: {values[-1]:,.1f}", flush=True)
    return values


# -- Procrastinate ---------------------------------------------------------------


class ProcrastinatePeer:
    """Its own database in the same Postgres cluster, schema applied once per
    bench run (the installed version's), tasks in bench/peer_procrastinate.py."""

    def __init__(self) -> None:
        import psycopg

        from bench.harness import start_postgres
        from config import embedded_db

        _, pgdata = start_postgres()
        self.dsn = embedded_db.database_url(pgdata, PEERS_DB)
        os.environ["BENCH_PEERS_PG"] = self.dsn
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.conn.execute("DROP SCHEMA public CASCADE")
        self.conn.execute("CREATE SCHEMA public")
        from bench.peer_procrastinate import app

        # Django's logging says INFO: a line per deferred job would be timed in W1.
        logging.getLogger("procrastinate").setLevel(logging.WARNING)
        self.app = app
        self.app.open()
        self.app.schema_manager.apply_schema()
        self.conn.execute("CREATE TABLE bench_peer_started (key int PRIMARY KEY, started float8 NOT NULL)")

    def close(self) -> None:
        self.app.close()
        self.conn.close()

    def reset(self) -> None:
        self.conn.execute(
            "TRUNCATE procrastinate_events, procrastinate_periodic_defers, procrastinate_jobs, bench_peer_started"
        )

    def succeeded(self) -> int:
        return self.conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'").fetchone()[0]

    def verify(self, n: int) -> None:
        """Every job succeeded, each started exactly once (its events)."""
        jobs, done = self.conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded') FROM procrastinate_jobs"
        ).fetchone()
        starts, started_jobs = self.conn.execute(
            "SELECT count(*), count(DISTINCT job_id) FROM procrastinate_events WHERE type = 'started'"
        ).fetchone()
        if (jobs, done, starts, started_jobs) != (n, n, n, n):
            sys.exit(
                f"Procrastinate: {jobs} jobs, {done} succeeded, {starts} starts of {started_jobs} jobs; wanted {n}"
            )

    def workers(self, processes: int, concurrency: int) -> Workers:
        argv = [
            sys.executable,
            "-m",
            "procrastinate",
            "--app",
            "bench.peer_procrastinate.app",
            "--log-level",
            "warning",
            "worker",
            "--concurrency",
            str(concurrency),
        ]
        return Workers([argv] * processes, "procrastinate", {"BENCH_PEERS_PG": self.dsn})

    def w1_w2(self, n: int) -> tuple[float, float, float]:
        """(batch_defer jobs/s, defer jobs/s, drain jobs/s of those n by 2 workers)."""
        from bench.peer_procrastinate import noop

        self.reset()
        started = time.perf_counter()
        noop.batch_defer(*({} for _ in range(n)))
        bulk = n / (time.perf_counter() - started)
        self.reset()
        started = time.perf_counter()
        for _ in range(n):
            noop.defer()
        submit = n / (time.perf_counter() - started)
        self.conn.execute("ANALYZE procrastinate_jobs, procrastinate_events")
        started = time.perf_counter()
        with self.workers(2, W2_CONCURRENCY) as workers:
            wait_for(lambda: workers.check() or self.succeeded() == n, timeout=600, interval=0.1)
            drain = n / (time.perf_counter() - started)
        self.verify(n)
        return bulk, submit, drain

    def w3(self, n: int) -> list[float]:
        from bench.peer_procrastinate import pickup

        self.reset()
        committed = {}
        with self.workers(2, W2_CONCURRENCY) as workers:
            time.sleep(3)  # up and idle, as queue_bench.pickup's cluster
            for i in range(n):
                pickup.defer(key=i)
                committed[i] = time.time()
                time.sleep(0.02)
            wait_for(lambda: workers.check() or self.succeeded() == n, timeout=120)
        self.verify(n)
        started = dict(self.conn.execute("SELECT key, started FROM bench_peer_started").fetchall())
        return [(started[i] - t) * 1000 for i, t in committed.items()]

    def w4(self, url: str) -> float:
        from bench.peer_procrastinate import call_llm

        n = llm_bench.N
        self.reset()
        with self.workers(1, W4_CONCURRENCY) as workers:
            time.sleep(3)
            started = time.perf_counter()
            call_llm.batch_defer(*({"url": url, "prompt": f"page {i}", "model": llm_bench.MODEL} for i in range(n)))
            wait_for(lambda: workers.check() or self.succeeded() == n, timeout=300, interval=0.05)
            elapsed = time.perf_counter() - started
        self.verify(n)
        prompts = self.conn.execute("SELECT count(DISTINCT args->>'prompt') FROM procrastinate_jobs").fetchone()[0]
        if prompts != n:
            sys.exit(f"Procrastinate W4: {prompts} distinct prompts, wanted {n}")
        return elapsed


# -- Celery ----------------------------------------------------------------------


class CeleryPeer:
    """Redis broker and result backend on a redis-server of our own, tasks in
    bench/peer_celery.py; worker without gossip, mingle and heartbeats."""

    def __init__(self) -> None:
        self.redis_server = RedisServer()
        os.environ["BENCH_PEERS_REDIS"] = self.redis_server.url
        import redis

        from bench.peer_celery import app

        self.app = app
        self.redis = redis.Redis.from_url(self.redis_server.url)

    def close(self) -> None:
        self.redis.close()
        self.redis_server.stop()

    def reset(self) -> None:
        self.redis.flushdb()

    def results(self) -> list[bytes]:
        return self.redis.keys("celery-task-meta-*")

    def workers(self, pool: str, concurrency: int) -> Workers:
        argv = [sys.executable, "-m", "celery", "-A", "bench.peer_celery", "worker", "--loglevel", "WARNING"]
        argv += ["--pool", pool, "--concurrency", str(concurrency), "--without-gossip", "--without-mingle"]
        argv += ["--without-heartbeat", "--hostname", f"bench-{pool}@%h"]
        return Workers([argv], "celery", {"BENCH_PEERS_REDIS": self.redis_server.url})

    def ready(self, workers: Workers) -> bool:
        workers.check()
        return bool(self.app.control.inspect(timeout=0.5).ping())

    def verify(self, n: int) -> list:
        """Every task's result stored and SUCCESS, and the worker's own count of
        tasks executed (remote control `stats`) equal to n; the results."""
        stats = self.app.control.inspect(timeout=2).stats() or {}
        executed = sum(sum(s.get("total", {}).values()) for s in stats.values())
        metas = [json.loads(raw) for raw in self.redis.mget(self.results())] if n else []
        ok = sum(1 for m in metas if m["status"] == "SUCCESS")
        if (executed, len(metas), ok) != (n, n, n):
            sys.exit(f"Celery: {executed} executed, {len(metas)} results, {ok} SUCCESS; wanted {n}")
        return metas

    def w1_w2(self, n: int) -> tuple[float, float]:
        from bench.peer_celery import noop

        self.reset()
        started = time.perf_counter()
        for _ in range(n):
            noop.delay()
        submit = n / (time.perf_counter() - started)
        started = time.perf_counter()
        with self.workers("prefork", 2) as workers:
            wait_for(lambda: workers.check() or len(self.results()) == n, timeout=600, interval=0.1)
            drain = n / (time.perf_counter() - started)
            self.verify(n)
        return submit, drain

    def w3(self, n: int) -> list[float]:
        from bench.peer_celery import pickup

        self.reset()
        committed = {}
        with self.workers("prefork", 2) as workers:
            wait_for(lambda: self.ready(workers), timeout=60, interval=0.2)
            time.sleep(3)
            for _ in range(n):
                result = pickup.delay()
                committed[result.id] = time.time()
                time.sleep(0.02)
            wait_for(lambda: workers.check() or len(self.results()) == n, timeout=120)
            metas = self.verify(n)
        started = {m["task_id"]: m["result"] for m in metas}
        return [(started[i] - t) * 1000 for i, t in committed.items()]

    def w4(self, url: str) -> float:
        from bench.peer_celery import call_llm

        n = llm_bench.N
        self.reset()
        with self.workers("threads", W4_CONCURRENCY) as workers:
            wait_for(lambda: self.ready(workers), timeout=60, interval=0.2)
            time.sleep(3)
            started = time.perf_counter()
            for i in range(n):
                call_llm.delay(url, f"page {i}", llm_bench.MODEL)
            wait_for(lambda: workers.check() or len(self.results()) == n, timeout=300, interval=0.05)
            elapsed = time.perf_counter() - started
            metas = self.verify(n)
        if len({m["result"] for m in metas}) != n:
            sys.exit(f"Celery W4: {len({m['result'] for m in metas})} distinct prompts, wanted {n}")
        return elapsed


# -- the benchmark -----------------------------------------------------------------


def peers(table: Table, n: int = JOBS) -> None:
    import importlib.util

    missing = [name for name in ("procrastinate", "celery", "redis") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(f"bench peers needs {missing}: `make bench` installs them, or pip install -e '.[bench]'")
    procrastinate, celery = ProcrastinatePeer(), CeleryPeer()
    w1 = Row(f"W1 submit {n}, one call each", "jobs/s", True, "ahead of all three (> 1.00x)")
    w2 = Row(f"W2 drain {n} no-ops", "jobs/s", True, "ahead")
    p50 = Row(f"W3 idle pickup p50 ({W3_JOBS})", "ms", False, "ahead")
    p95 = Row(f"W3 idle pickup p95 ({W3_JOBS})", "ms", False, "ahead")
    w4 = Row(f"W4 {llm_bench.N} calls at 1 s, wall", "s", False, "ahead")
    try:
        print("  Conveyor", flush=True)
        w1w2 = [(queue_bench.submit_conveyor(n), queue_bench.drain_queued("postgres", n)) for _ in range(RUNS)]
        _put(w1, w2, "Conveyor", w1w2)
        _put_latency(p50, p95, "Conveyor", [queue_bench.pickup("postgres", W3_JOBS) for _ in range(RUNS)])

        print("  Django-Q2", flush=True)
        w1.values["Django-Q2"] = _median(_runs("W1", lambda: queue_bench.submit_stock(n)))
        w2.values["Django-Q2"] = _median(_runs("W2", lambda: queue_bench._drain("orm", n)))
        _put_latency(p50, p95, "Django-Q2", [queue_bench.pickup("orm", W3_JOBS) for _ in range(RUNS)])

        print("  Celery+Redis", flush=True)
        _put(w1, w2, "Celery+Redis", [celery.w1_w2(n) for _ in range(RUNS)])
        _put_latency(p50, p95, "Celery+Redis", [celery.w3(W3_JOBS) for _ in range(RUNS)])

        print("  Procrastinate", flush=True)
        runs = [procrastinate.w1_w2(n) for _ in range(RUNS)]
        bulk = _median([r[0] for r in runs])
        _put(w1, w2, "Procrastinate", [r[1:] for r in runs])
        _put_latency(p50, p95, "Procrastinate", [procrastinate.w3(W3_JOBS) for _ in range(RUNS)])

        print("  W4", flush=True)
        sim = llm_bench.Simulator()
        try:
            url = f"http://127.0.0.1:{sim.port}/simulated/v1/chat/completions"
            w4.values["Conveyor"] = _median(_runs("Conveyor", lambda: llm_bench.conveyor_run(sim)[0]))
            w4.values["Celery+Redis"] = _median(_runs("Celery+Redis", lambda: celery.w4(url)))
            w4.values["Procrastinate"] = _median(_runs("Procrastinate", lambda: procrastinate.w4(url)))
        finally:
            sim.stop()
    finally:
        celery.close()
        procrastinate.close()
    w1.detail = f"Procrastinate batch_defer (one call for all {n}): {bulk:,.0f} jobs/s"
    w2.detail = (
        f"Conveyor and Django-Q2: one cluster of 2 workers; Celery: prefork, concurrency 2; "
        f"Procrastinate: 2 worker processes, concurrency {W2_CONCURRENCY} each; worker start counted"
    )
    p50.detail = "commit of the submission to the task's start; Procrastinate as W2, with LISTEN/NOTIFY"
    w4.detail = (
        f"Django-Q2 n/a here (about 50 s a run: see `w4`); Celery: threads pool of {W4_CONCURRENCY}; "
        f"Procrastinate: one worker, concurrency {W4_CONCURRENCY}, async httpx, jobs by batch_defer"
    )
    rows = [w1, w2, p50, p95, w4]
    for row in rows:
        best = max(PEERS, key=lambda p: _score(row, p))
        table.add(
            row.workload,
            row.unit,
            row.values["Conveyor"],
            row.values.get(best),
            higher_is_better=row.higher_is_better,
            detail=f"vs best peer, {best}",
        )
    table.sections.append("Peers in the same run (`python -m bench peers`):\n" + render(rows))


def _score(row: Row, peer: str) -> float:
    value = row.values.get(peer)
    if value is None:
        return float("-inf")
    return value if row.higher_is_better else -value


def _put(w1: Row, w2: Row, name: str, runs: list[tuple[float, float]]) -> None:
    w1.values[name] = _median([r[0] for r in runs])
    w2.values[name] = _median([r[1] for r in runs])
    print(f"    {name}: W1 {[round(r[0]) for r in runs]} jobs/s, W2 {[round(r[1]) for r in runs]} jobs/s", flush=True)


def _put_latency(p50: Row, p95: Row, name: str, runs: list[list[float]]) -> None:
    p50.values[name] = _median([percentile(r, 50) for r in runs])
    p95.values[name] = _median([percentile(r, 95) for r in runs])
    print(f"    {name}: W3 p50 {p50.values[name]:.1f} ms, p95 {p95.values[name]:.1f} ms", flush=True)
