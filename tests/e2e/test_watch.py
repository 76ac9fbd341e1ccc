"""`manage.py jobs watch ID` as a subprocess against real qclusters: it follows
the job's events (LISTEN and the events table, as the hub does) and exits with
the job's outcome."""

from __future__ import annotations

import re
import sys
from urllib.parse import urlsplit

import pytest

from jobs.models import Job
from jobs.services import submit_batch
from tests.conftest import wait_until
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes


def watch(processes, target) -> object:
    return processes.start("watch", [sys.executable, "manage.py", "jobs", "watch", str(target)])


def ended(processes, proc, timeout: float = 60) -> tuple[int, str]:
    wait_until(lambda: proc.poll() is not None, timeout=timeout, message=lambda: processes.log_of(proc)[-2000:])
    return proc.returncode, processes.log_of(proc)


def test_watch_shows_progress_streamed_text_and_logs_and_exits_0_on_success(processes, make_job):
    job = make_job("demo.async_sleep", {"seconds": 2, "steps": 4})
    proc = watch(processes, job.id)
    processes.qcluster()

    code, out = ended(processes, proc)

    assert code == 0, out
    assert f"watching demo.async_sleep {job.id}" in out
    assert re.search(r"\[#{12}\.{12}\]  50% running step 2 of 4", out), out  # the bar as it moved
    lines = out.splitlines()
    # The text, line by line as it streamed, and the handler's log lines.
    assert [line for line in lines if line.startswith("step ")] == ["step 1", "step 2", "step 3", "step 4"]
    assert [line.split(": ", 1)[1] for line in lines if line.startswith("  | ")] == [
        f"step {n} of 4 done" for n in range(1, 5)
    ]
    assert lines[-2:] == ["[########################] 100% succeeded step 4 of 4", f"{job.id} succeeded"]


def test_watch_exits_1_when_the_job_dies(processes, make_job):
    job = make_job("demo.fail", {"mode": "permanent", "message": "no way"})
    proc = watch(processes, job.id)
    processes.qcluster()

    code, out = ended(processes, proc)

    assert code == 1, out
    assert out.splitlines()[-2:] == ["error: DemoPermanentError: no way", f"{job.id} dead"]


def test_watch_streams_an_llm_job_s_text_from_the_simulator(processes, make_job):
    base = start_daphne(processes)
    job = make_job("llm.generate", {"prompt": "Write about queues", "max_tokens": 60, "model": "simulated@tps=40"})
    proc = watch(processes, job.id)
    processes.qcluster("llm", PORT=str(urlsplit(base).port))

    code, out = ended(processes, proc)

    assert code == 0, out
    text = Job.objects.get(id=job.id).result["text"]
    # Every line of the text, once and in order, between the status lines.
    shown = [line for line in out.splitlines() if line and line in text.splitlines()]
    assert shown == [line for line in text.splitlines() if line]
    assert "calling simulated" in out


def test_watch_follows_a_batch_until_every_job_has_ended(processes):
    batch = submit_batch(
        "two sleeps and a failure",
        [
            {"kind": "demo.sleep", "payload": {"seconds": 0.5, "steps": 2}},
            {"kind": "demo.sleep", "payload": {"seconds": 1, "steps": 2}},
            {"kind": "demo.fail", "payload": {"mode": "permanent"}},
        ],
    ).batch
    proc = watch(processes, batch.id)
    processes.qcluster()

    code, out = ended(processes, proc)

    assert code == 1, out  # one of them died
    assert "(3 jobs)" in out
    assert out.rstrip().splitlines()[-1].endswith("3/3 finished: 1 dead, 2 succeeded"), out


def test_watch_of_an_unknown_id_says_so(processes):
    proc = watch(processes, "0b9f2a94-0000-4000-8000-000000000000")

    code, out = ended(processes, proc)

    assert code == 2
    assert "no job or batch with id 0b9f2a94-0000-4000-8000-000000000000" in out
