"""POST /api/v1/jobs through Daphne: submissions/s and latency with concurrent
clients, then the time of one 10,000-job batch.

    .venv/bin/python bench/api_submit.py [--duration 20] [--clients 32] [--batch 10000]

1. Start the embedded Postgres if needed and create a private database,
   conveyor_bench_api (dropped first if a past run left it), then migrate it.
2. Create an API key with `manage.py createapikey`.
3. Start Daphne on a free loopback port, DEBUG off (`--processes N`: N
   Daphne processes sharing the socket). No worker runs: this measures
   submission, and the jobs stay queued. Steps 4 and 5 run with the intake
   (jobs/api/intake.py); step 4 runs again with `CONVEYOR_INTAKE=0`, every
   request through Django's view, for the ratio.
4. `--clients` concurrent clients POST demo.noop jobs for `--duration`
   seconds (after a short warm-up), each on one keep-alive connection; report
   submissions/s and p50/p99 latency, and check that the database holds a job
   for every 202. The clients are plain asyncio streams, not httpx: httpx's
   client costs about as much CPU per request as the server it measures, and
   the two share the machine's two cores.
5. POST one batch of `--batch` jobs; report its time.
6. Print both, with their ratio; stop Daphne and drop the database.

Targets (issue 3, on 2 cores): >= 500 submissions/s with p99 <= 100 ms; the
10,000-job batch in <= 2 s. The load generator shares the machine with
Daphne and Postgres, so numbers are a floor.

Settings come from the environment as for any run: `CONN_MAX_AGE=0 …` for
instance measures Daphne closing its connection after each request (under
ASGI every request runs in a fresh thread, so with the default 600 each opens
a connection that lingers until the thread is collected).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.harness import manage, start_postgres, wait_healthy  # noqa: E402

DATABASE = "conveyor_bench_api"
JOB = {"kind": "demo.noop", "payload": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--batch", type=int, default=10_000, help="jobs in the batch (default 10000)")
    parser.add_argument(
        "--processes", type=int, default=1, help="Daphne processes sharing one listening socket (default 1)"
    )
    args = parser.parse_args()

    socket_dir, _ = start_postgres()
    _recreate_database(socket_dir)
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@{quote(socket_dir, safe='')}/{DATABASE}",
        "DEBUG": "0",
        "SECURE_SSL_REDIRECT": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        # As `manage.py up` runs Daphne: pooled connections.
        "CONVEYOR_DB_POOL": os.environ.get("CONVEYOR_DB_POOL", "1"),
    }
    try:
        manage(env, "migrate", "--verbosity", "0")
        key = manage(env, "createapikey", "bench").strip().splitlines()[-1]
        headers = {"Authorization": f"Bearer {key}"}
        results = {}
        # The intake, then the same requests through Django's view (the intake off).
        for label, intake in (("intake", "1"), ("Django view", "0")):
            with _daphne({**env, "CONVEYOR_INTAKE": intake}, args.processes) as base:
                print(
                    f"{label}: Daphne ×{args.processes}; {args.clients} clients for {args.duration:.0f} s …", flush=True
                )
                latencies, errors, elapsed, created = asyncio.run(
                    _load(base, headers, args.clients, args.duration, lambda: _count_jobs(socket_dir))
                )
                results[label] = _report(latencies, errors, elapsed)
                if created != len(latencies):
                    sys.exit(f"{len(latencies)} submissions answered 202 but {created} jobs were created")
                if intake == "1":
                    print(f"batch of {args.batch} jobs …", flush=True)
                    _batch(base, headers, args.batch)
        _compare(results)
    finally:
        _drop_database(socket_dir)


@contextlib.contextmanager
def _daphne(env: dict[str, str], processes: int):
    """`processes` Daphne processes on one listening socket; yields the base URL."""
    servers: list[subprocess.Popen] = []
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    # Each Daphne adopts the same listening socket; the kernel spreads
    # connections over them (Daphne has no worker processes of its own).
    listener.set_inheritable(True)
    log = open(ROOT / ".data" / "bench-daphne.log", "ab")  # noqa: SIM115 - closed with the processes
    try:
        for _ in range(processes):
            servers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "daphne",
                        "-v",
                        "0",
                        "--fd",
                        str(listener.fileno()),
                        "config.asgi:application",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=[listener.fileno()],
                    start_new_session=True,
                )
            )
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        for server in servers:
            wait_healthy(base, server, log=".data/bench-daphne.log", timeout=30)
        yield base
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        listener.close()
        log.close()


async def _load(base: str, headers: dict[str, str], clients: int, duration: float, count_jobs):
    latencies: list[float] = []
    errors: dict[str, int] = {}
    host, port = base.removeprefix("http://").split(":")
    body = json.dumps(JOB).encode()
    request = (
        f"POST /api/v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def client(deadline: float, record: bool) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    writer.write(request)
                    status = await asyncio.wait_for(_read_response(reader), timeout=30)
                    outcome = None if status == 202 else str(status)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    outcome = type(exc).__name__
                if not record:
                    continue
                if outcome is None:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1
                    if outcome[0].isalpha():  # the connection is gone: open another
                        writer.close()
                        reader, writer = await asyncio.open_connection(host, int(port))
        finally:
            writer.close()

    warm_up = time.perf_counter() + 2
    await asyncio.gather(*(client(warm_up, record=False) for _ in range(clients)))
    before = count_jobs()
    started = time.perf_counter()
    await asyncio.gather(*(client(started + duration, record=True) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    return latencies, errors, elapsed, count_jobs() - before


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked body); its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:] if line)
    }
    if "content-length" in fields:
        await reader.readexactly(int(fields["content-length"]))
    elif fields.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        raise ValueError("a response without a length")
    return status


def _report(latencies: list[float], errors: dict[str, int], elapsed: float) -> tuple[float, float, float]:
    """Print and return submissions/s, p50 and p99 (ms)."""
    if len(latencies) < 2:
        print(f"too few successful submissions ({len(latencies)}); errors: {errors}")
        return 0.0, float("nan"), float("nan")
    cuts = statistics.quantiles(latencies, n=100)
    rate, p50, p99 = len(latencies) / elapsed, cuts[49] * 1000, cuts[98] * 1000
    print(f"submissions: {len(latencies)} in {elapsed:.1f} s = {rate:.0f}/s")
    print(f"latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    print(f"errors: {errors or 'none'}")
    return rate, p50, p99


def _compare(results: dict[str, tuple[float, float, float]]) -> None:
    (rate, p50, p99), (django_rate, django_p50, django_p99) = results["intake"], results["Django view"]
    print()
    print("POST /api/v1/jobs    | submissions/s | p50 ms | p99 ms")
    print(f"intake               | {rate:13.0f} | {p50:6.1f} | {p99:6.1f}")
    print(f"Django view          | {django_rate:13.0f} | {django_p50:6.1f} | {django_p99:6.1f}")
    print(f"ratio                | {rate / django_rate if django_rate else float('nan'):12.2f}x |")


def _batch(base: str, headers: dict[str, str], size: int) -> None:
    body = {"name": "bench", "jobs": [JOB] * size}
    with httpx.Client(base_url=base, headers=headers, timeout=300) as http:
        started = time.perf_counter()
        response = http.post("/api/v1/batches", json=body)
        elapsed = time.perf_counter() - started
    if response.status_code != 202:
        print(f"batch failed: {response.status_code} {response.text[:500]}")
        return
    print(f"batch: {response.json()['total']} jobs in {elapsed:.2f} s")


def _recreate_database(socket_dir: str) -> None:
    import psycopg

    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")


def _count_jobs(socket_dir: str) -> int:
    import psycopg

    with psycopg.connect(host=socket_dir, user="postgres", dbname=DATABASE) as conn:
        return conn.execute("SELECT count(*) FROM jobs_job").fetchone()[0]


def _drop_database(socket_dir: str) -> None:
    import psycopg

    with psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


if __name__ == "__main__":
    main()
