"""W4: 400 LLM calls at 1 s each against the simulated provider, submission
included. Conveyor (llm.generate in the asyncio lane of 2 worker processes)
against the stock approach (a blocking call per Django-Q2 worker, 8 workers,
stock ORM broker), in the same run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil

from bench.harness import LOGS, ROOT, Cluster, Table, reset, wait_for

N = 400
MODEL = "simulated@latency_ms=1000"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Simulator:
    def __init__(self) -> None:
        self.port = _free_port()
        LOGS.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daphne",
                "-e",
                f"tcp:port={self.port}:interface=127.0.0.1:backlog=1024",
                "config.simulator.asgi:application",
            ],
            cwd=ROOT,
            stdout=open(LOGS / "simulator.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._listening, timeout=30, interval=0.1)

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


class MemorySampler:
    """Peak total PSS and RSS (MiB) of a set of process trees: sampled every
    `interval` seconds (half a second by default), and once more at `stop` (after
    the clock has stopped). Reading PSS makes the kernel walk every page table;
    at 10 samples a second it cost about a fifth of one core, which this
    CPU-bound workload then lacked."""

    INTERVAL = 0.5

    def __init__(self, pids: list[int], interval: float = INTERVAL) -> None:
        self.pids = pids
        self.interval = interval
        self.pss = 0.0
        self.rss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self._sample()

    def _sample(self) -> None:
        pss = rss = 0
        for pid in self.pids:
            try:
                root = psutil.Process(pid)
                for proc in [root, *root.children(recursive=True)]:
                    info = proc.memory_full_info()
                    pss += info.pss
                    rss += info.rss
            except psutil.Error:
                continue
        self.pss = max(self.pss, pss / 2**20)
        self.rss = max(self.rss, rss / 2**20)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def conveyor_run(sim: Simulator) -> tuple[float, float, float, int]:
    from jobs.models import Attempt, Job
    from jobs.services import submit_batch

    reset()
    # The simulated provider's default limit is 200 calls at once across all
    # workers; this workload wants its 400 in flight together.
    providers = json.dumps(
        [{"name": "simulated", "simulated": True, "default_model": "simulated", "max_concurrency": N}]
    )
    with Cluster(
        "postgres",
        workers=2,
        queue="llm",
        PORT=str(sim.port),
        CONVEYOR_LANE_CAPACITY="250",
        CONVEYOR_LLM_PROVIDERS=providers,
    ) as cluster:
        time.sleep(3)  # cluster up and idle, as the stock one
        sampler = MemorySampler([p.pid for p in cluster.procs])
        started = time.perf_counter()
        items = [{"kind": "llm.generate", "payload": {"prompt": f"page {i}", "model": MODEL}} for i in range(N)]
        submit_batch("w4", items)
        wait_for(lambda: Job.objects.filter(state="succeeded").count() == N, timeout=300, interval=0.05)
        elapsed = time.perf_counter() - started
        sampler.stop()
    duplicates = Attempt.objects.count() - N
    return elapsed, sampler.pss, sampler.rss, duplicates


def stock_run(sim: Simulator) -> tuple[float, float, float, int]:
    from django.db import connection
    from django_q.brokers.orm import ORM
    from django_q.tasks import async_task

    reset()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS bench_stock_done (id serial, prompt text, chars int)")
        cursor.execute("TRUNCATE bench_stock_done")

    def done() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*), count(DISTINCT prompt) FROM bench_stock_done")
            return cursor.fetchone()

    url = f"http://127.0.0.1:{sim.port}/simulated/v1/chat/completions"
    with Cluster("orm", workers=8, queue="default") as cluster:
        time.sleep(3)
        sampler = MemorySampler([p.pid for p in cluster.procs])
        broker = ORM(list_key="default")
        started = time.perf_counter()
        for i in range(N):
            async_task("bench.stock_tasks.call_llm", url, f"page {i}", MODEL, broker=broker)
        wait_for(lambda: done()[0] >= N, timeout=600, interval=0.05)
        elapsed = time.perf_counter() - started
        sampler.stop()
    total, distinct = done()
    return elapsed, sampler.pss, sampler.rss, total - distinct


def w4_llm(table: Table, runs: int = 3) -> None:
    sim = Simulator()
    try:
        conveyor = sorted((conveyor_run(sim) for _ in range(runs)), key=lambda r: r[0])[runs // 2]
        stock = sorted((stock_run(sim) for _ in range(runs)), key=lambda r: r[0])[runs // 2]
    finally:
        sim.stop()
    table.add(
        f"W4 {N} LLM calls at 1 s, wall time",
        "s",
        conveyor[0],
        stock[0],
        higher_is_better=False,
        detail=f"duplicates: conveyor {conveyor[3]}, stock {stock[3]}",
    )
    table.add(
        "W4 worker memory, peak PSS total",
        "MiB",
        conveyor[1],
        stock[1],
        higher_is_better=False,
        detail=f"RSS {conveyor[2]:.0f} vs {stock[2]:.0f} MiB",
    )
