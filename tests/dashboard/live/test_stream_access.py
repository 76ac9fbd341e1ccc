"""An open SSE stream ends soon after its credentials stop being valid: a
real Daphne, real keys, the real `manage.py revokeapikey`."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import ROOT, process_env, wait_until

pytestmark = pytest.mark.processes


class Watcher:
    """Reads `/api/v1/events` with a key on a thread of its own."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.raw = b""
        self.status: int | None = None
        self.ended: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "text/event-stream"}
        try:
            with httpx.stream(
                "GET", f"{self.url}/api/v1/events", headers=headers, timeout=httpx.Timeout(10, read=120)
            ) as response:
                self.status = response.status_code
                for chunk in response.iter_raw():
                    self.raw += chunk
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to report
            self.error = exc
        finally:
            self.ended = time.monotonic()

    @property
    def connected(self) -> bool:
        return b": connected" in self.raw


def _key(name: str, scopes: list[str]):
    from jobs.services import create_api_key

    return create_api_key(name, scopes=scopes)


def test_a_revoked_keys_open_stream_ends_within_five_seconds_and_others_go_on(processes):
    from jobs.engine.apikeys import display_prefix
    from jobs.services import submit_job

    revoked = _key("to revoke", ["read"])
    kept = _key("kept", ["read", "operate"])
    _, url = processes.daphne()
    doomed, other = Watcher(url, revoked.key), Watcher(url, kept.key)
    wait_until(lambda: doomed.connected and other.connected, timeout=30, message="both streams to open")

    subprocess.run(
        [sys.executable, "manage.py", "revokeapikey", display_prefix(revoked.api_key)],
        cwd=ROOT,
        env=process_env(),
        check=True,
        capture_output=True,
    )
    revoked_at = time.monotonic()
    wait_until(lambda: doomed.ended, timeout=5, interval=0.05, message="the revoked key's stream to end")
    assert doomed.ended - revoked_at < 5
    assert doomed.status == 200 and doomed.error is None, doomed.error

    # The other key's stream is still open and still delivers.
    assert other.ended is None
    job = submit_job("demo.noop", {}).job
    wait_until(lambda: str(job.id).encode() in other.raw, timeout=15, message="the kept key's stream to deliver")
    assert other.ended is None
