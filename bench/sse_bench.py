"""Live updates under load: one Daphne process, many SSE clients, a steady
stream of job events. Issue 4's benchmark.

    .venv/bin/python bench/sse_bench.py [--clients 1000] [--rate 100] [--duration 30]
                                        [--jobs 50] [--queue-clients 50]

1. Start the embedded Postgres if needed and create a private database,
   conveyor_bench_sse (dropped first if a past run left it), migrate it and
   create an API key (`manage.py createapikey`).
2. Turn on statement logging for that database only (`ALTER DATABASE … SET
   log_statement = 'all'`) and put the application name into the server's
   log prefix for the run (restored afterwards), so that every statement in
   the log says which process sent it.
3. Start one Daphne process as `manage.py up` does (DEBUG off,
   CONVEYOR_DB_POOL=1) on a free loopback port.
4. A producer subprocess submits `--jobs` demo.noop jobs and claims them as a
   worker does (job.created and job.started events).
5. This process opens `--clients` SSE connections with raw asyncio streams
   (HTTP/1.1, chunked, one parser per connection): `--queue-clients` on the
   queue-wide stream `/api/v1/events?queue=default`, the others spread evenly
   over the jobs on `/api/v1/events?job=<id>` (several viewers per job, as
   when a job's page is shared). Each job-scoped client first receives its
   job's log so far (a replay); the run starts once all have.
6. The producer reports progress on the jobs round-robin at `--rate` events a
   second for `--duration` seconds through the runner's own
   `Context.report_progress` (one statement: the update, the JobEvent row and
   its pg_notify, autocommitted), noting `time.time()` right after each
   commit. Latency = the client's `time.time()` when the bytes arrived −
   that commit time.
7. Every client must receive every event its filter selects, each once, in
   id order: the job's replayed log and all run events for job clients, all
   run events for queue clients. What has not arrived GRACE_SECONDS after
   the last commit counts as lost; the bench then says so and exits 1.
8. Queries per event: the statements the Postgres log attributes to the
   hub's LISTEN connection (`conveyor-event-hub`) between two marker
   statements around the run, divided by the events that committed in that
   window (the producer's and the `queue.stats` events Daphne publishes
   itself). Daphne's request pool (tagged by PGAPPNAME; the queue.stats
   publisher) is counted beside them.
9. Daphne's RSS is sampled with psutil every 0.2 s; the peak is reported.

Targets (issue 4): p99 ≤ 250 ms, Daphne RSS ≤ 500 MB, one query per event
whatever the number of clients. The load generator and the producer share
the machine with Daphne and Postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import manage, start_postgres, wait_healthy  # noqa: E402

DATABASE = "conveyor_bench_sse"
QUEUE = "default"
DAPHNE_APP = "bench-sse-daphne"
PRODUCER_APP = "bench-sse-producer"
MARKER_APP = "bench-sse-marker"
HUB_APP = "conveyor-event-hub"  # dashboard/live/hub.py names its LISTEN connection so
LOG_PREFIX = "%m [%p] app=%a "
TARGET_P99_MS, TARGET_RSS_MB, TARGET_QUERIES = 250, 500, 1.0
# How long after the last commit a client may still receive events before
# those it misses count as lost.
GRACE_SECONDS = 60


# --- the producer (runs with Django, in its own process) ---------------------


def prepare_jobs(count: int, *, queue: str = QUEUE, worker: str = "bench-sse-worker") -> dict[str, list[int]]:
    """Submit `count` demo.noop jobs and claim them as a worker would; the
    event ids each job has so far (its job.created and job.started)."""
    from jobs.models import JobEvent
    from jobs.services import submit_job
    from jobs.worker.claims import claim

    job_ids = []
    for _ in range(count):
        job = submit_job("demo.noop", {}, queue=queue).job
        if claim(str(job.id), worker) is None:
            raise RuntimeError(f"could not claim job {job.id}")
        job_ids.append(str(job.id))
    logged: dict[str, list[int]] = {job_id: [] for job_id in job_ids}
    for event_id, job_id in JobEvent.objects.filter(job_id__in=job_ids).order_by("id").values_list("id", "job_id"):
        logged[str(job_id)].append(event_id)
    return logged


def produce(
    job_ids: list[str], *, rate: float, count: int, worker: str = "bench-sse-worker", queue: str = QUEUE
) -> list[tuple[int, str, float]]:
    """Report progress on the jobs round-robin, `rate` events a second, `count`
    events in all, as the runner's Context does; (event id, job id, commit
    time) for each, in commit order."""
    from django.db import connection

    from jobs.db.durability import relax_commit_durability
    from jobs.models import Job, JobEvent
    from jobs.worker.context import Context

    relax_commit_durability()  # as the workers commit
    contexts = [Context(job, worker) for job in Job.objects.filter(id__in=job_ids)]
    contexts.sort(key=lambda ctx: job_ids.index(str(ctx.job_id)))
    committed: list[tuple[str, float]] = []
    started = time.perf_counter()
    for seq in range(count):
        delay = started + seq / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        ctx = contexts[seq % len(contexts)]
        # Autocommit: the event is committed (and notified) when this returns.
        ctx.report_progress(seq * 100 // max(1, count - 1), f"bench {seq}")
        committed.append((str(ctx.job_id), time.time()))
    # The runner does not return event ids; the message carries the sequence.
    ids = dict(
        JobEvent.objects.filter(job_id__in=job_ids, type="job.progress")
        .filter(data__message__startswith="bench ")
        .values_list("data__message", "id")
    )
    connection.close()
    return [(ids[f"bench {seq}"], job_id, at) for seq, (job_id, at) in enumerate(committed)]


def _producer_main(args: argparse.Namespace) -> None:
    """`sse_bench.py --produce`: prepare, wait for "go" on stdin, produce;
    one JSON line on stdout after each step."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    logged = prepare_jobs(args.jobs)
    print(json.dumps({"jobs": logged}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    events = produce(list(logged), rate=args.rate, count=round(args.rate * args.duration))
    print(json.dumps({"events": events}), flush=True)


# --- the SSE clients (plain asyncio, no Django) -------------------------------


@dataclass
class ClientSpec:
    path: str
    job: str | None  # None: the queue-wide stream


@dataclass
class ClientResult:
    spec: ClientSpec
    received: list[tuple[int, float]] = field(default_factory=list)  # (event id, receipt time)
    stats: int = 0
    messages: int = 0
    cursor_went_back: bool = False
    status: int | None = None
    ended: bool = False  # the server closed the stream (a dropped subscriber)
    error: str | None = None


def plan_clients(job_ids: list[str], *, clients: int, queue_clients: int, queue: str = QUEUE) -> list[ClientSpec]:
    """`queue_clients` on the queue-wide stream, the rest spread over the jobs."""
    queue_clients = min(queue_clients, clients)
    specs = [ClientSpec(f"/api/v1/events?queue={queue}", None) for _ in range(queue_clients)]
    for i in range(clients - queue_clients):
        job = job_ids[i % len(job_ids)]
        specs.append(ClientSpec(f"/api/v1/events?job={job}", job))
    return specs


_DATA_ID = re.compile(rb'^data: \{"id": (\d+),', re.M)


class _Stream:
    """One SSE connection: HTTP/1.1 request, chunked decoding, message split."""

    def __init__(self, result: ClientResult) -> None:
        self.result = result
        self._chunked = False
        self._raw = b""  # undecoded transfer bytes
        self._body = b""  # decoded bytes not yet split into messages
        self._last_sse_id = 0

    async def run(self, host: str, port: int, key: str, opened: asyncio.Event) -> None:
        result = self.result
        try:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
        except OSError as exc:
            result.error = f"connect: {exc}"
            opened.set()
            return
        try:
            writer.write(
                f"GET {result.spec.path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n"
                "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            result.status = int(head.split(b" ", 2)[1])
            self._chunked = b"transfer-encoding: chunked" in head.lower()
            opened.set()
            if result.status != 200:
                result.error = f"HTTP {result.status}"
                return
            while True:
                data = await reader.read(1 << 16)
                now = time.time()
                if not data:
                    result.ended = True
                    return
                if self._feed(data, now):
                    result.ended = True
                    return
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            opened.set()
        finally:
            writer.close()

    def _feed(self, data: bytes, now: float) -> bool:
        """Take bytes off the socket; True at the end of the response."""
        finished = False
        if not self._chunked:
            self._body += data
        else:
            self._raw += data
            while True:
                line_end = self._raw.find(b"\r\n")
                if line_end < 0:
                    break
                size = int(self._raw[:line_end].split(b";", 1)[0], 16)
                if size == 0:
                    finished = True
                    break
                if len(self._raw) < line_end + 2 + size + 2:
                    break
                self._body += self._raw[line_end + 2 : line_end + 2 + size]
                self._raw = self._raw[line_end + 2 + size + 2 :]
        if b"\n\n" in self._body:
            *blocks, self._body = self._body.split(b"\n\n")
            for block in blocks:
                self._message(block, now)
        return finished

    def _message(self, block: bytes, now: float) -> None:
        if not block.startswith(b"id: "):
            return  # retry:, comments (connected, keep-alive)
        result = self.result
        result.messages += 1
        sse_id = int(block[4 : block.index(b"\n")])
        if sse_id < self._last_sse_id:
            result.cursor_went_back = True
        self._last_sse_id = sse_id
        if b"\nevent: queue.stats\n" in block:
            result.stats += 1
            return
        # The SSE id is the stream's cursor (never lower than one already
        # sent); the event's own id is the first key of the JSON.
        match = _DATA_ID.search(block)
        if match is None:
            result.error = f"unexpected message {block[:200]!r}"
            return
        result.received.append((int(match.group(1)), now))


class LoadGenerator:
    """All the SSE clients of a run, in this process's event loop."""

    def __init__(self, host: str, port: int, key: str, specs: list[ClientSpec]) -> None:
        self.host, self.port, self.key = host, port, key
        self.results = [ClientResult(spec) for spec in specs]
        self._tasks: list[asyncio.Task] = []

    async def open(self, *, batch: int = 50, timeout: float = 120) -> None:
        """Connect every client, `batch` at a time, each waiting for its
        response headers; raises if any fails."""
        deadline = time.monotonic() + timeout
        for start in range(0, len(self.results), batch):
            events = []
            for result in self.results[start : start + batch]:
                opened = asyncio.Event()
                stream = _Stream(result)
                self._tasks.append(asyncio.create_task(stream.run(self.host, self.port, self.key, opened)))
                events.append(opened)
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), max(0.1, deadline - time.monotonic()))
        failed = [r for r in self.results if r.status != 200]
        if failed:
            raise RuntimeError(f"{len(failed)} client(s) could not open their stream, e.g. {failed[0].error}")

    async def wait_for(self, expected: list[list[int]], *, timeout: float) -> bool:
        """Wait until every client has received (at least) as many events as
        `expected[i]` lists; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(
                len(r.received) >= len(e) or r.ended or r.error for r, e in zip(self.results, expected, strict=True)
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def expected_events(
    specs: list[ClientSpec], *, logged: dict[str, list[int]], produced: list[tuple[int, str, float]] | None
) -> list[list[int]]:
    """The event ids each client must receive, in order: a job's log before
    the run (replayed on connect) and the run's events its filter selects."""
    run_by_job: dict[str, list[int]] = {}
    for event_id, job_id, _ in produced or []:
        run_by_job.setdefault(job_id, []).append(event_id)
    run_all = sorted(event_id for event_id, _, _ in produced or [])
    expected = []
    for spec in specs:
        if spec.job is None:
            expected.append(run_all)
        else:
            expected.append(logged[spec.job] + sorted(run_by_job.get(spec.job, [])))
    return expected


@dataclass
class Check:
    expected: int = 0
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    dropped_streams: int = 0
    errors: list[str] = field(default_factory=list)
    cursor_went_back: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.duplicates
            or self.out_of_order
            or self.unexpected
            or self.dropped_streams
            or self.errors
            or self.cursor_went_back
        )


def check_delivery(results: list[ClientResult], expected: list[list[int]]) -> Check:
    """Compare what each client received with what it should have."""
    check = Check()
    for result, wanted in zip(results, expected, strict=True):
        got = [event_id for event_id, _ in result.received]
        check.expected += len(wanted)
        wanted_set, got_set = set(wanted), set(got)
        check.lost += len(wanted_set - got_set)
        check.duplicates += len(got) - len(got_set)
        check.unexpected += len(got_set - wanted_set)
        in_both = [event_id for event_id in got if event_id in wanted_set]
        check.out_of_order += sum(1 for a, b in zip(in_both, in_both[1:], strict=False) if b <= a)
        check.dropped_streams += result.ended
        check.cursor_went_back += result.cursor_went_back
        if result.error:
            check.errors.append(result.error)
    return check


def latencies(results: list[ClientResult], produced: list[tuple[int, str, float]]) -> list[float]:
    """Receipt − commit, in seconds, for every delivery of a run event."""
    committed = {event_id: at for event_id, _, at in produced}
    return [now - committed[event_id] for r in results for event_id, now in r.received if event_id in committed]


# --- measuring Daphne ---------------------------------------------------------


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stopped.is_set():
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            self.stopped.wait(self.interval)


def count_statements(log_text: str, start_marker: str, end_marker: str) -> dict[str, int]:
    """Statements per application name between the two markers' log lines."""
    start, end = log_text.find(start_marker), log_text.find(end_marker)
    if start < 0 or end < 0:
        raise RuntimeError("the window markers are not in the Postgres log")
    counts: dict[str, int] = {}
    for match in re.finditer(
        r"^\S+ \S+ \S+ \[\d+\] app=(\S*) LOG:  (?:statement|execute [^:]+): ", log_text[start:end], re.M
    ):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


# --- the run ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="concurrent SSE clients (default 1000)")
    parser.add_argument("--rate", type=float, default=100.0, help="job events per second (default 100)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of events (default 30)")
    parser.add_argument("--jobs", type=int, default=50, help="jobs the events are spread over (default 50)")
    parser.add_argument("--queue-clients", type=int, default=50, help="clients on the queue-wide stream (default 50)")
    parser.add_argument("--produce", action="store_true", help=argparse.SUPPRESS)  # the producer subprocess
    args = parser.parse_args()
    if args.produce:
        _producer_main(args)
        return
    if not asyncio.run(_bench(args)):
        sys.exit(1)  # events were lost: the figures above mean nothing


async def _bench(args: argparse.Namespace) -> bool:
    """Run the benchmark and print its table; False when delivery failed."""
    import psycopg

    socket_dir, pgdata = start_postgres()
    log_path = pgdata / "log"
    admin = psycopg.connect(host=socket_dir, user="postgres", dbname="postgres", autocommit=True)
    admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {DATABASE}")
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@{quote(socket_dir, safe='')}/{DATABASE}",
        "DEBUG": "0",
        "SECURE_SSL_REDIRECT": "0",
        "ALLOWED_HOSTS": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    daphne: subprocess.Popen | None = None
    producer: asyncio.subprocess.Process | None = None
    prefix_changed = False
    try:
        manage(env, "migrate", "--verbosity", "0")
        key = manage(env, "createapikey", "bench-sse").strip().splitlines()[-1]
        admin.execute(f"ALTER DATABASE {DATABASE} SET log_statement = 'all'")
        admin.execute(f"ALTER SYSTEM SET log_line_prefix = '{LOG_PREFIX}'")
        prefix_changed = True
        admin.execute("SELECT pg_reload_conf()")

        port = _free_port()
        (ROOT / ".data").mkdir(exist_ok=True)
        daphne_log = open(ROOT / ".data" / "bench-sse-daphne.log", "wb")  # noqa: SIM115 - closed with the process
        daphne = subprocess.Popen(
            # As `manage.py up` runs it (a pooled request connection).
            [
                sys.executable,
                "-m",
                "daphne",
                "-e",
                f"tcp:port={port}:interface=127.0.0.1:backlog=1024",
                "config.asgi:application",
            ],
            cwd=ROOT,
            env={**env, "CONVEYOR_DB_POOL": "1", "PGAPPNAME": DAPHNE_APP},
            stdout=daphne_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_healthy(f"http://127.0.0.1:{port}", daphne, log=".data/bench-sse-daphne.log")
        rss = RssSampler(daphne.pid)
        rss.start()
        idle_rss = rss.process.memory_info().rss

        producer = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__)),
            "--produce",
            "--jobs",
            str(args.jobs),
            "--rate",
            str(args.rate),
            "--duration",
            str(args.duration),
            cwd=ROOT,
            env={**env, "PGAPPNAME": PRODUCER_APP},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,
        )
        logged = {k: v for k, v in json.loads(await producer.stdout.readline())["jobs"].items()}
        specs = plan_clients(list(logged), clients=args.clients, queue_clients=args.queue_clients)
        load = LoadGenerator("127.0.0.1", port, key, specs)
        print(f"Daphne pid {daphne.pid} on 127.0.0.1:{port}; opening {len(specs)} SSE clients …", flush=True)
        started = time.monotonic()
        await load.open()
        if not await load.wait_for(expected_events(specs, logged=logged, produced=None), timeout=120):
            raise RuntimeError("the job-scoped clients did not all receive their job's log")
        print(
            f"  all open and replayed in {time.monotonic() - started:.1f} s; "
            f"{args.rate:g} events/s for {args.duration:g} s …",
            flush=True,
        )

        marker = psycopg.connect(
            host=socket_dir, user="postgres", dbname=DATABASE, autocommit=True, application_name=MARKER_APP
        )
        window = f"{os.getpid()}-{time.time():.0f}"
        last_before = marker.execute("SELECT coalesce(max(id), 0) FROM jobs_jobevent").fetchone()[0]
        marker.execute(f"SELECT 'bench-sse window start {window}'")
        cpu_before = rss.process.cpu_times()
        waited_before = _run_queue_wait(daphne.pid)
        own_before = time.process_time()
        go_at = time.monotonic()
        messages_before = sum(r.messages for r in load.results)  # the replays of the jobs' logs
        load_avg = os.getloadavg()
        producer.stdin.write(b"go\n")
        await producer.stdin.drain()
        produced = [tuple(e) for e in json.loads(await producer.stdout.readline())["events"]]
        expected = expected_events(specs, logged=logged, produced=produced)
        complete = await load.wait_for(expected, timeout=GRACE_SECONDS)
        cpu_after = rss.process.cpu_times()
        waited = _run_queue_wait(daphne.pid) - waited_before
        own_cpu = time.process_time() - own_before
        window_wall = time.monotonic() - go_at
        marker.execute(f"SELECT 'bench-sse window end {window}'")
        window_events = marker.execute("SELECT count(*) FROM jobs_jobevent WHERE id > %s", [last_before]).fetchone()[0]
        marker.close()
        await load.close()
        rss.stopped.set()
        rss.join()

        first_commit, last_commit = produced[0][2], produced[-1][2]
        span = max(1e-9, last_commit - first_commit)
        check = check_delivery(load.results, expected)
        lat = sorted(latencies(load.results, produced))
        statements = count_statements(
            _read_log(log_path), f"bench-sse window start {window}", f"bench-sse window end {window}"
        )
        return _report(
            args=args,
            specs=specs,
            produced=produced,
            span=span,
            results=load.results,
            check=check,
            complete=complete,
            lat=lat,
            peak_rss=rss.peak,
            idle_rss=idle_rss,
            statements=statements,
            window_events=window_events,
            daphne_cpu=(cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
            load_avg=load_avg,
            own_cpu=own_cpu,
            window_wall=window_wall,
            messages_before=messages_before,
            waited=waited,
        )
    finally:
        if producer is not None and producer.returncode is None:
            producer.kill()
            await producer.wait()
        if daphne is not None:
            if daphne.poll() is None:
                os.killpg(daphne.pid, signal.SIGTERM)
            try:
                daphne.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(daphne.pid, signal.SIGKILL)
                daphne.wait()
        if prefix_changed:
            admin.execute("ALTER SYSTEM RESET log_line_prefix")
            admin.execute("SELECT pg_reload_conf()")
        admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        admin.close()


def _report(
    *,
    args,
    specs,
    produced,
    span,
    results,
    check: Check,
    complete: bool,
    lat: list[float],
    peak_rss: int,
    idle_rss: int,
    statements: dict[str, int],
    window_events: int,
    daphne_cpu: float,
    load_avg,
    own_cpu: float,
    window_wall: float,
    messages_before: int,
    waited: float,
) -> bool:
    from bench.harness import percentile

    job_clients = sum(1 for s in specs if s.job is not None)
    delivered = sum(r.messages for r in results) - messages_before
    rate = (len(produced) - 1) / span
    hub = statements.get(HUB_APP, 0)
    daphne_total = hub + statements.get(DAPHNE_APP, 0)
    p50, p99 = (percentile(lat, 50) * 1000, percentile(lat, 99) * 1000) if lat else (float("nan"),) * 2
    worst = lat[-1] * 1000 if lat else float("nan")
    per_event = hub / window_events if window_events else float("nan")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    rows = [
        (
            "clients",
            f"{len(specs)} ({job_clients} on ?job= over {args.jobs} jobs, "
            f"{len(specs) - job_clients} on ?queue={QUEUE})",
            "",
        ),
        ("events produced", f"{len(produced)} in {span:.1f} s = {rate:.1f}/s (job.progress)", f"{args.rate:g}/s"),
        ("messages delivered", f"{delivered:,} = {delivered / span:,.0f}/s over all clients", ""),
        ("latency p50", f"{p50:.1f} ms", ""),
        ("latency p99", f"{p99:.1f} ms", f"≤ {TARGET_P99_MS} ms: {verdict(p99 <= TARGET_P99_MS)}"),
        ("latency max", f"{worst:.1f} ms", ""),
        (
            "Daphne peak RSS",
            f"{peak_rss / 2**20:.0f} MiB (idle {idle_rss / 2**20:.0f} MiB)",
            f"≤ {TARGET_RSS_MB} MB: {verdict(peak_rss <= TARGET_RSS_MB * 10**6)}",
        ),
        (
            "Daphne CPU",
            f"{daphne_cpu:.1f} s over the {window_wall:.0f} s from the first event to the last delivery "
            f"({100 * daphne_cpu / window_wall:.0f} % of a core; {1e6 * daphne_cpu / max(1, delivered):.0f} µs per "
            f"message); load generator {own_cpu:.1f} s",
            "",
        ),
        (
            "Daphne waiting for a CPU",
            f"{waited:.1f} s runnable but not running (its event loop thread, /proc/<pid>/schedstat)",
            "",
        ),
        (
            "hub queries per event",
            f"{per_event:.3f} ({hub} statements / {window_events} events incl. queue.stats)",
            f"≤ {TARGET_QUERIES:g} whatever the clients: {verdict(per_event <= TARGET_QUERIES)}",
        ),
        (
            "all Daphne statements",
            f"{daphne_total} ({statements.get(DAPHNE_APP, 0)} on its request pool: queue.stats publisher)",
            "",
        ),
        (
            "events lost",
            f"{check.lost} of {check.expected} deliveries (not there {GRACE_SECONDS} s after the last commit)",
            "0: " + verdict(check.ok and complete),
        ),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print()
    print(
        f"SSE benchmark: 1 Daphne process, load average at start {load_avg[0]:.1f} / {os.cpu_count()} CPUs "
        "(the machine is shared: figures are a floor)"
    )
    for name, value, target in rows:
        print(f"  {name.ljust(width)}  {value.ljust(vwidth)}  {target}")
    if not (check.ok and complete):
        print()
        print("!!! DELIVERY FAILED: some clients did not get every event they should, once and in order !!!")
        print(
            f"    lost {check.lost}, duplicates {check.duplicates}, out of order {check.out_of_order}, "
            f"unexpected {check.unexpected}, streams closed by the server {check.dropped_streams}, "
            f"cursor went back {check.cursor_went_back}, errors {len(check.errors)} {check.errors[:3]}, "
            f"complete within {GRACE_SECONDS} s after the last commit: {complete}"
        )
    print(f"  statements in the window by application: {statements}")
    return check.ok and complete


def _run_queue_wait(pid: int) -> float:
    """Seconds the process's main thread (Daphne's event loop) has spent
    ready to run but waiting for a CPU: how much the machine's other load
    held it back."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def _read_log(path: Path) -> str:
    # The server runs as another user and owns its log; read it as it can be.
    try:
        return path.read_text(errors="replace")
    except PermissionError:
        return subprocess.run(["cat", str(path)], capture_output=True, text=True, check=True).stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
