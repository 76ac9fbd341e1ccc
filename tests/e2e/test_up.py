"""`manage.py up` (what `make run` runs): the whole system in the foreground."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

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
