"""bench/sse_bench.py at a tiny scale against a real Daphne process, so that
the benchmark's clients, producer and delivery check keep working."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes


def test_every_bench_client_gets_every_event_it_should(processes):
    from bench.sse_bench import (
        LoadGenerator,
        check_delivery,
        expected_events,
        latencies,
        plan_clients,
        prepare_jobs,
        produce,
    )
    from jobs.engine.apikeys import create_api_key

    # Operate: the producer's jobs are not this key's own (keys without it see only theirs).
    key = create_api_key("sse-bench", scopes=("read", "operate")).key
    base = start_daphne(processes)
    port = int(base.rsplit(":", 1)[1])
    logged = prepare_jobs(4)
    specs = plan_clients(list(logged), clients=20, queue_clients=4)

    async def run():
        load = LoadGenerator("127.0.0.1", port, key, specs)
        try:
            await load.open(timeout=60)
            # The job-scoped clients replay their job's log (created, started) first.
            assert await load.wait_for(expected_events(specs, logged=logged, produced=None), timeout=60)
            produced = await asyncio.to_thread(produce, list(logged), rate=50, count=20)
            expected = expected_events(specs, logged=logged, produced=produced)
            assert await load.wait_for(expected, timeout=60)
            return load.results, produced, expected
        finally:
            await load.close()

    results, produced, expected = asyncio.run(run())

    assert len(produced) == 20 and len({job for _, job, _ in produced}) == 4
    check = check_delivery(results, expected)
    assert check.ok, check
    # 16 job clients: 2 logged + 5 run events each; 4 queue clients: all 20.
    assert check.expected == 16 * (2 + 5) + 4 * 20
    assert len(latencies(results, produced)) == 16 * 5 + 4 * 20
    assert max(latencies(results, produced)) < 60
