"""Shared plumbing for the benchmarks: a scratch database on the same Postgres,
subprocess clusters, medians and the ratio table."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".data" / "bench-logs"
BENCH_DB = "conveyor_bench"


def start_postgres() -> tuple[str, Path]:
    """The embedded server's socket folder (started if it was not running) and
    its data folder, for benchmarks that make their own scratch database."""
    from config import embedded_db

    pgdata = Path(os.environ.get("CONVEYOR_DATA_DIR") or ROOT / ".data") / "pg"
    url = embedded_db.database_url(pgdata, "postgres")
    return unquote(urlsplit(url).netloc.split("@", 1)[1]), pgdata


def manage(env: dict[str, str], *args: str) -> str:
    """`manage.py <args>` with `env`; its stdout, or exit with its stderr."""
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"manage.py {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def wait_healthy(base: str, process: subprocess.Popen, *, log: str, timeout: float = 60) -> None:
    """Wait for `base`/healthz to answer 200; exit if the server dies or stays silent."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"Daphne exited with status {process.returncode}; see {log}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit(f"Daphne did not answer {base} within {timeout:.0f} s")


def setup_django() -> None:
    """Point this process at the scratch benchmark database and migrate it."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    if "DATABASE_URL" not in os.environ:
        from config import embedded_db

        os.environ["DATABASE_URL"] = embedded_db.database_url(ROOT / ".data" / "pg", BENCH_DB)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def database_url() -> str:
    from django.db import connection

    from config.embedded_db import url_of

    return url_of(connection.settings_dict)


def reset() -> None:
    """Empty the jobs and broker tables between runs."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE jobs_jobevent, jobs_attempt, jobs_job, django_q_ormq, django_q_task CASCADE")


def analyze() -> None:
    """Give the planner the statistics of the tables just filled, as autovacuum
    would have in a system that has been running: right after `reset`'s
    TRUNCATE it knows nothing of them, and whether autovacuum happened to get
    there before a run decided whether that run was fast or twice as slow."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE jobs_job, jobs_attempt, jobs_jobevent, django_q_ormq")


class Cluster:
    """`manage.py qcluster` subprocess(es) with the given broker."""

    def __init__(self, broker: str, *, workers: int = 2, count: int = 1, queue: str = "default", **env: str) -> None:
        self.procs: list[subprocess.Popen] = []
        LOGS.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            full_env = {
                **os.environ,
                "DATABASE_URL": database_url(),
                "CONVEYOR_BROKER": broker,
                "CONVEYOR_WORKERS": str(workers),
                "Q_CLUSTER_NAME": queue,
                "LOG_LEVEL": "WARNING",
                # Production settings: DEBUG=1 makes Django record every query.
                "DEBUG": "0",
                # The stock side is Django-Q2's delivery, one job per task: no
                # claims around it through the broker rows (lane fills, chains).
                **({"CONVEYOR_CHAIN_SECONDS": "0", "CONVEYOR_LANE_FILL": "0"} if broker == "orm" else {}),
                **env,
            }
            log = open(LOGS / f"qcluster-{broker}-{i}.log", "wb")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "manage.py", "qcluster"],
                    cwd=ROOT,
                    env=full_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            try:  # whatever is left of its process group
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05) -> float:
    """Seconds until `predicate()` is true; raises after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not done after {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def median_of(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    values = [measure() for _ in range(runs)]
    return statistics.median(values), values


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.sections: list[str] = []  # printed after the table (bench/peers.py's own)

    def add(
        self, name: str, unit: str, conveyor: float, stock: float | None, *, higher_is_better: bool, detail: str = ""
    ) -> None:
        if stock in (None, 0):
            ratio = "n/a"
        else:
            ratio = f"{(conveyor / stock) if higher_is_better else (stock / conveyor):.2f}x"
        stock_text = "n/a" if stock is None else f"{stock:,.1f}"
        self.rows.append((name, unit, f"{conveyor:,.1f}", stock_text, ratio + (f"  {detail}" if detail else "")))
        print(f"  {name}: conveyor {conveyor:,.1f} {unit}, stock {stock_text}, ratio {ratio} {detail}", flush=True)

    def render(self) -> str:
        header = ("benchmark", "unit", "Conveyor", "stock", "Conveyor vs stock")
        widths = [max(len(str(r[i])) for r in [header, *self.rows]) for i in range(5)]
        lines = [" | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in self.rows]
        return "\n\n".join(["\n".join(lines), *self.sections])
