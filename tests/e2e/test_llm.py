"""LLM jobs end to end: a real qcluster (the asyncio lane) calling the
simulated provider served by a real Daphne over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import sys

import pytest

from jobs.models import Job, Page
from jobs.services import submit_batch
from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.processes


@pytest.fixture
def simulator(processes):
    """The simulated provider on its own Daphne; returns the env that points workers at it."""
    port = free_port()
    processes.start(
        "simulator",
        [
            sys.executable,
            "-m",
            "daphne",
            "-e",
            f"tcp:port={port}:interface=127.0.0.1:backlog=1024",
            "config.simulator.simulated:asgi_app",
        ],
        CONVEYOR_SIM_TTFT_MS="50",
        CONVEYOR_SIM_TPS="400",
    )

    def listening():
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout=30, message="the simulator to listen")
    return {"PORT": str(port)}


def test_an_llm_job_streams_its_output_as_progress_and_stores_the_result(processes, simulator, make_job):
    job = make_job("llm.generate", {"prompt": "Write about queues", "max_tokens": 60})
    processes.qcluster("llm", **simulator)
    wait_until(lambda: Job.objects.get(id=job.id).state == "succeeded", timeout=60, message="the llm job")
    job.refresh_from_db()
    assert job.result["finish_reason"] in {"stop", "length"}
    assert job.result["simulated"] is True and job.result["provider"] == "simulated"
    assert job.result["usage"]["completion_tokens"] > 0
    assert job.result["text"] and job.attempt_set.get().output == job.result["text"]
    progress = job.events.filter(type="job.progress")
    assert progress.exists()


def test_a_provider_400_dead_letters_the_job_with_the_provider_s_message(processes, simulator, make_job):
    job = make_job("llm.generate", {"prompt": "x", "model": "simulated@fail=400"})
    processes.qcluster("llm", **simulator)
    wait_until(lambda: Job.objects.get(id=job.id).state == "dead", timeout=60, message="the job to die")
    job.refresh_from_db()
    assert job.attempts == 1 and job.error_type == "ProviderRejected"
    assert job.error_message


def test_a_batch_of_pages_is_stored_once_each_despite_failures_and_a_killed_worker(processes, simulator):
    items = [
        {
            "kind": "content.page",
            "backoff_base": 0.3,
            "backoff_max": 1,
            "max_attempts": 10,
            "payload": {
                "template": "Write a page about {keyword} for {audience}.",
                "variables": {"keyword": f"topic {i}", "audience": "operators"},
                "model": "simulated@latency_ms=1500,rate_500=0.15,rate_429=0.1",
            },
        }
        for i in range(50)
    ]
    batch = submit_batch("fifty pages", items).batch
    processes.qcluster("llm", CONVEYOR_WORKERS="2", **simulator)

    def some_running():
        return Job.objects.filter(batch=batch, state="running").count() >= 5

    wait_until(some_running, timeout=60, message="jobs to run")
    victim = Job.objects.filter(batch=batch, state="running").first()
    os.kill(int(victim.lease_owner.rsplit(":", 1)[1]), signal.SIGKILL)

    wait_until(
        lambda: Job.objects.filter(batch=batch, state="succeeded").count() == 50,
        timeout=120,
        interval=0.5,
        message="all 50 pages",
    )
    pages = Page.objects.filter(batch=batch)
    assert pages.count() == 50
    assert sorted(pages.values_list("slug", flat=True)) == sorted(f"topic-{i}" for i in range(50))
    assert all(p.word_count > 0 and p.title and p.simulated for p in pages)
    lost = Job.objects.filter(batch=batch, attempt_set__outcome="lost").distinct().count()
    assert lost >= 1  # the killed worker's jobs were rescued, and still stored once
