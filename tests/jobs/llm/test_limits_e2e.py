"""The provider concurrency limit across worker processes: a real qcluster with two
workers (two asyncio lanes) calling the simulated provider on its own Daphne, which
counts the calls it is answering at once."""

from __future__ import annotations

import json

import httpx
import pytest

from jobs.models import Attempt, Job
from jobs.services import submit_batch
from tests.conftest import wait_until
from tests.jobs.llm.conftest import start_daphne

pytestmark = pytest.mark.processes


def test_two_worker_processes_never_have_more_calls_in_flight_than_the_limit(processes):
    simulator = start_daphne(
        processes,
        "config.simulator.simulated:asgi_app",
        CONVEYOR_SIM_LATENCY_MS="1000",
        CONVEYOR_SIMULATOR_CONTROLS="1",
    )
    providers = [{"name": "sim", "base_url": f"{simulator}/simulated/v1", "max_concurrency": 2, "simulated": True}]
    items = [
        {"kind": "llm.generate", "payload": {"prompt": f"Write about queue {i}", "max_tokens": 30}} for i in range(10)
    ]
    batch = submit_batch("limited", items).batch

    processes.qcluster("llm", CONVEYOR_WORKERS="2", CONVEYOR_LLM_PROVIDERS=json.dumps(providers))

    jobs = Job.objects.filter(batch=batch)
    wait_until(lambda: jobs.filter(state="succeeded").count() == 10, timeout=180, interval=0.5, message="ten jobs")
    load = httpx.get(f"{simulator}/simulated/v1/load").json()
    assert load["requests"] == 10  # one call each: no call was refused by the provider
    assert load["peak"] == 2  # the limit was reached, and never passed
    # Ten one-second calls two at a time: some jobs waited longer than the lane
    # waits, went back to retrying, and still used a single attempt each.
    assert Attempt.objects.filter(job__batch=batch, error_type="ProviderBusy").exists()
    assert set(jobs.values_list("attempts", flat=True)) == {1}
    assert all(job.tokens_used > 0 for job in jobs)
