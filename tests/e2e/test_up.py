"""`manage.py up` (what `make run` runs): the whole system in the foreground."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.processes


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError:
        return 0, {}


def manage(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_up_runs_the_system_on_its_own_embedded_postgres_and_stops_cleanly(tmp_path):
    """No DATABASE_URL: `up` starts a private Postgres under the data dir, serves,
    runs jobs, stops every child on SIGTERM, and a second start finds the data."""
    port = free_port()
    env = {k: v for k, v in __import__("os").environ.items() if k != "DATABASE_URL"}
    env.update(CONVEYOR_DATA_DIR=str(tmp_path / "data"), PORT=str(port), PYTHONUNBUFFERED="1")

    log = open(tmp_path / "up.log", "wb")  # noqa: SIM115
    up = subprocess.Popen([sys.executable, "manage.py", "up"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: get_json(f"http://127.0.0.1:{port}/healthz")[0] == 200, timeout=90, interval=0.5, message="/healthz"
        )
        assert get_json(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})

        started = time.monotonic()
        submitted = manage(env, "jobs", "submit", "demo.sleep", "--payload", '{"seconds": 2}')
        assert submitted.returncode == 0, submitted.stderr
        assert time.monotonic() - started < 15
        job_id = submitted.stdout.strip().splitlines()[-1]

        def succeeded():
            shown = manage(env, "jobs", "show", job_id)
            return shown.returncode == 0 and json.loads(shown.stdout)["state"] == "succeeded"

        wait_until(succeeded, timeout=60, interval=1, message="the demo.sleep job to succeed")
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
        log.close()
    output = (tmp_path / "up.log").read_text()
    assert code == 0, output
    assert "embedded Postgres stopped" in output
    assert get_json(f"http://127.0.0.1:{port}/healthz")[0] == 0  # nothing listens any more
    assert not (tmp_path / "data" / "pg" / "postmaster.pid").exists()

    # A second start runs on the same data.
    listed = manage(env, "jobs", "list")
    assert listed.returncode == 0, listed.stderr
    assert job_id in listed.stdout and "succeeded" in listed.stdout
    stop = manage(
        env,
        "shell",
        "-c",
        "from config import embedded_db; from django.conf import settings; embedded_db.stop(settings.DATA_DIR / 'pg')",
    )
    assert stop.returncode == 0, stop.stderr


def test_up_refuses_a_bad_port_with_a_clear_message():
    result = subprocess.run(
        [sys.executable, "manage.py", "up", "--port", "70000"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "--port 70000 is not a TCP port" in result.stderr
    assert "Traceback" not in result.stderr


# --- the supervisor killed, a second instance, a crashed Postgres ------------


@pytest.fixture(scope="session")
def migrated_server():
    """One server's data directory, initialised and migrated by `manage.py
    migrate` once a run, then stopped: each `data_dir` starts as a copy of it
    (initdb and the migrations cost about 7 s a test). `manage.py up` on a
    directory with nothing in it is the first test's own."""
    from config import embedded_db

    path = ROOT / ".data" / f"up-template-{uuid.uuid4().hex[:8]}"
    try:
        migrated = manage(up_env(path, free_port()), "migrate", "-v", "0", timeout=180)
        assert migrated.returncode == 0, migrated.stderr
        embedded_db.stop(path / "pg")
        yield path / "pg"
    finally:
        embedded_db.stop(path / "pg")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def data_dir(migrated_server):
    """A data directory of the test's own under .data/ (not tmp_path: run as
    root, the server runs as another user, and pytest narrows
    /tmp/pytest-of-root back to 0700), holding a stopped, migrated server (a
    copy, owners kept). Its server is stopped at the end."""
    from config import embedded_db

    path = ROOT / ".data" / f"up-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(migrated_server), str(path / "pg")], check=True)
    yield path
    embedded_db.stop(path / "pg")
    shutil.rmtree(path, ignore_errors=True)


def up_env(data_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(
        CONVEYOR_DATA_DIR=str(data_dir),
        PORT=str(port),
        CONVEYOR_QUEUES="default",
        CONVEYOR_WORKERS="2",
        PYTHONUNBUFFERED="1",
        DJANGO_Q_LOG_LEVEL="INFO",
    )
    return env


def start_up(env: dict, log_path: Path, *args: str) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps it
    return subprocess.Popen(
        [sys.executable, "manage.py", "up", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )


def wait_healthy(up: subprocess.Popen, port: int, log_path: Path, path: str = "/healthz") -> None:
    def healthy() -> bool:
        if up.poll() is not None:
            pytest.fail(f"up exited with {up.returncode}:\n{log_path.read_text(errors='replace')}")
        return get_json(f"http://127.0.0.1:{port}{path}")[0] == 200

    wait_until(healthy, timeout=120, interval=0.5, message=f"{path} of manage.py up")


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def server_running(data_dir: Path) -> bool:
    pid = postmaster_pid(data_dir)
    return pid is not None and alive(pid)


def alive(process: psutil.Process | int) -> bool:
    try:
        if isinstance(process, int):
            process = psutil.Process(process)
        # A zombie has exited; only its parent has not reaped it yet.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # As Twisted binds: a closed listener's TIME_WAIT connections do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_sigkill_of_up_takes_down_every_child_and_its_postgres_within_10_s(data_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "up.log"
    up = start_up(up_env(data_dir, port), log_path)
    tree: list[psutil.Process] = []
    try:
        # /readyz answers 200 once the cluster's sentinel has spawned its workers.
        wait_healthy(up, port, log_path, "/readyz")
        tree = psutil.Process(up.pid).children(recursive=True)
        # Daphne; qcluster, its sentinel, monitor, pusher and two workers.
        assert len(tree) >= 7, [p.cmdline() for p in tree]
        postgres = psutil.Process(postmaster_pid(data_dir))

        up.send_signal(signal.SIGKILL)
        up.wait(timeout=10)
        killed_at = time.monotonic()

        def all_gone() -> bool:
            return not any(alive(p) for p in [*tree, postgres]) and port_free(port)

        wait_until(all_gone, timeout=10, interval=0.2, message="every child of up, its Postgres and the port")
        assert time.monotonic() - killed_at < 10
        # Its lifeline watcher did it (it writes to up's stderr).
        wait_until(
            lambda: f"manage.py up (pid {up.pid}) is gone" in log_path.read_text(), timeout=10, message="the watcher"
        )
    finally:
        for process in tree:
            if alive(process):
                process.kill()


def test_a_second_up_on_the_same_data_dir_or_port_refuses_in_one_line(data_dir, tmp_path):
    port = free_port()
    log_path = tmp_path / "up.log"
    env = up_env(data_dir, port)
    up = start_up(env, log_path)
    other_dir = data_dir.parent / f"{data_dir.name}-other"
    try:
        wait_healthy(up, port, log_path)

        # The same data directory, another port.
        second = manage({**env, "PORT": str(free_port())}, "up", timeout=120)
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "already running" in lines[0] and str(up.pid) in lines[0], lines[0]

        # Another data directory, the same port.
        third = manage(up_env(other_dir, port), "up", timeout=120)
        assert third.returncode != 0
        lines = third.stderr.strip().splitlines()
        assert len(lines) == 1, third.stderr
        assert f"port {port}" in lines[0] and "in use" in lines[0], lines[0]
        # It stopped the server it had started for nothing.
        assert not server_running(other_dir)

        # The first instance is untouched.
        assert get_json(f"http://127.0.0.1:{port}/healthz") == (200, {"status": "ok"})
        assert server_running(data_dir)
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
        from config import embedded_db

        embedded_db.stop(other_dir / "pg")
        shutil.rmtree(other_dir, ignore_errors=True)
    assert code == 0, log_path.read_text()


def test_up_recovers_a_postgres_left_stale_by_a_crash(data_dir, tmp_path):
    """The machine went down under a running server: postmaster.pid is left
    behind, and after the reboot its pid belongs to another process."""
    port = free_port()
    env = up_env(data_dir, port)
    migrated = manage(env, "migrate", "-v", "0", timeout=180)
    assert migrated.returncode == 0, migrated.stderr
    pgdata = (data_dir / "pg").resolve()
    os.kill(postmaster_pid(data_dir), signal.SIGKILL)

    def backends_gone() -> bool:
        for process in psutil.process_iter(["name"]):
            try:
                if process.info["name"] == "postgres" and process.cwd() == str(pgdata) and alive(process):
                    return False
            except psutil.Error:
                pass
        return True

    wait_until(backends_gone, timeout=30, message="the crashed server's processes to exit")
    squatter = subprocess.Popen(["sleep", "300"])
    pid_file = pgdata / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    pid_file.write_text("\n".join([str(squatter.pid), *lines[1:]]) + "\n")

    log_path = tmp_path / "up.log"
    up = start_up(env, log_path)
    try:
        wait_healthy(up, port, log_path)
        assert alive(squatter.pid)  # recovering did not touch the process that has the old pid
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
        squatter.kill()
        squatter.wait()
    assert code == 0, log_path.read_text()
    assert not server_running(data_dir)


def test_up_stops_on_exit_a_server_it_adopted_unless_another_process_uses_it(data_dir, tmp_path):
    port = free_port()
    env = up_env(data_dir, port)
    # A finished command started the server and left it running.
    migrated = manage(env, "migrate", "-v", "0", timeout=180)
    assert migrated.returncode == 0, migrated.stderr
    assert server_running(data_dir)

    # While a shell holds it, `up` leaves it running on exit, and says why
    # (the shell sleeps only to keep its connection open until it is killed).
    holder = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            "import time; from django.db import connection; connection.ensure_connection(); "
            "print('connected', flush=True); time.sleep(600)",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: holder.stdout.readline().strip() == "connected", timeout=60, message="the shell to connect")
        log_path = tmp_path / "up-1.log"
        up = start_up(env, log_path)
        wait_healthy(up, port, log_path)
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, log_path.read_text()
        output = log_path.read_text()
        assert server_running(data_dir), output
        assert f"left running: in use by pid {holder.pid}" in output, output
    finally:
        holder.kill()
        holder.wait()

    # Nobody else uses it: `make stop` stops the `up` that adopted it, which stops the server.
    log_path = tmp_path / "up-2.log"
    up = start_up(env, log_path)
    try:
        wait_healthy(up, port, log_path)
        stopped = subprocess.run(["make", "-s", "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert up.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert "embedded Postgres stopped" in log_path.read_text()
    assert not server_running(data_dir)


def test_a_test_run_stops_the_embedded_server_it_started(data_dir):
    env = up_env(data_dir, free_port())
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/jobs/management/test_commands.py::test_submit_prints_the_new_jobs_id",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (data_dir / "pg" / "PG_VERSION").exists()  # it did run on a server of its own
    assert not server_running(data_dir), result.stdout + result.stderr


_SHOW_SETTINGS = """
import sys
from pathlib import Path
import psycopg
from config import embedded_db
pgdata = Path(sys.argv[1])
with psycopg.connect(embedded_db.database_url(pgdata, "postgres"), autocommit=True) as conn:
    print(conn.execute("SELECT current_setting('shared_buffers')").fetchone()[0])
embedded_db.stop(pgdata)
"""


def test_the_embedded_server_runs_with_its_settings_on_a_new_or_an_older_data_directory(data_dir):
    from config import embedded_db

    pg = data_dir / "pg"
    expected = embedded_db.server_settings()["shared_buffers"]

    def started_with() -> str:
        shown = subprocess.run(
            [sys.executable, "-c", _SHOW_SETTINGS, str(pg)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.strip()

    def megabytes(value: str) -> int:
        return int(value[:-2]) * (1024 if value.endswith("GB") else 1)

    # A copy of a server initialised by this code: set from its first start.
    assert (pg / embedded_db.SETTINGS_FILE).exists()
    assert megabytes(started_with()) == megabytes(expected)
    # A data directory from before the settings existed gets them at its next start, included once.
    (pg / embedded_db.SETTINGS_FILE).unlink()
    conf = pg / "postgresql.conf"
    conf.write_text(
        "".join(line for line in conf.read_text().splitlines(True) if embedded_db.SETTINGS_FILE not in line)
    )
    assert megabytes(started_with()) == megabytes(expected)
    embedded_db.configure(pg)  # as every later start does
    assert sum(embedded_db.SETTINGS_FILE in line for line in conf.read_text().splitlines()) == 1


class FreezableProxy(threading.Thread):
    """A TCP proxy to the embedded server's Unix socket that can go silent, as
    a network partition does: connections stay open, nothing passes, new ones
    are accepted and never answered."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(daemon=True)
        self.socket_path = socket_path
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.held: list[socket.socket] = []
        self.swallowed = 0  # bytes sent into the silence

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(client)
            if self.frozen.is_set():
                continue
            server = socket.socket(socket.AF_UNIX)
            try:
                server.connect(str(self.socket_path))
            except OSError:  # the server is stopped: refused, as it would be
                client.close()
                server.close()
                continue
            self.held.append(server)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if self.frozen.is_set():
                    self.swallowed += len(data)
                else:
                    sink.sendall(data)
        except OSError:
            pass
        if not self.frozen.is_set():  # the other end closed: pass that on
            sink.close()

    def close(self) -> None:
        self.listener.close()
        for s in self.held:
            s.close()


@pytest.mark.parametrize("gone", ["stopped", "unreachable"])
def test_qcluster_whose_postgres_has_gone_exits_on_sigterm_within_10_s(data_dir, tmp_path, gone):
    """`stopped`: the server is shut down (connections refused at once).
    `unreachable`: the network to it goes silent (every query and connection
    attempt waits forever)."""
    from config import embedded_db

    env = up_env(data_dir, free_port())
    migrated = manage(env, "migrate", "-v", "0", timeout=180)
    assert migrated.returncode == 0, migrated.stderr
    proxy = FreezableProxy((data_dir / "pg" / ".s.PGSQL.5432").resolve())
    proxy.start()
    env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:{proxy.port}/conveyor"
    log_path = tmp_path / "qcluster.log"
    with open(log_path, "wb") as log:
        qcluster = subprocess.Popen(
            [sys.executable, "manage.py", "qcluster"],
            cwd=ROOT,
            env={**env, "Q_CLUSTER_NAME": "default"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: list[psutil.Process] = []
    try:
        wait_until(lambda: "running." in log_path.read_text(), timeout=60, message="the cluster to run")
        tree = [psutil.Process(qcluster.pid), *psutil.Process(qcluster.pid).children(recursive=True)]
        assert len(tree) >= 6, [p.cmdline() for p in tree]

        if gone == "stopped":
            embedded_db.stop(data_dir / "pg")
            # Let its processes run into the missing database (the broker, the heartbeat).
            wait_until(
                lambda: "connection" in log_path.read_text().lower(),
                timeout=30,
                message="the cluster to miss its database",
            )
        else:
            proxy.frozen.set()
            # The sentinel's heartbeat (every half second) now waits on the silent network.
            wait_until(lambda: proxy.swallowed, timeout=30, message="a query sent into the silence")
        qcluster.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        wait_until(lambda: not any(alive(p) for p in tree), timeout=10, interval=0.2, message="the whole qcluster tree")
        assert time.monotonic() - signalled_at < 10
    finally:
        for process in tree:
            if alive(process):
                process.kill()
        if qcluster.poll() is None:
            qcluster.kill()
        qcluster.wait()
        proxy.close()
