"""Provider limits kept in Postgres (jobs/llm/limits.py): slots, the requests-per-minute
bucket, the batch token budget, and the accounting a release does."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from jobs.llm import limits
from jobs.llm.providers import Provider
from jobs.models import Batch, Job, ProviderSlot, State, TokenUsage


def provider(**overrides) -> Provider:
    values = {"name": "limited", "base_url": "http://127.0.0.1:9/v1", "max_concurrency": 2}
    values.update(overrides)
    return Provider(**values)


def running_job(**fields) -> Job:
    values = {
        "kind": "llm.generate",
        "state": State.RUNNING,
        "lease_owner": "host:1",
        "lease_expires_at": timezone.now() + timedelta(seconds=30),
    }
    values.update(fields)
    return Job.objects.create(**values)


@pytest.mark.django_db
def test_it_grants_as_many_calls_as_the_concurrency_limit_and_no_more():
    p = provider(max_concurrency=2)
    first = limits.acquire(p, job_id=running_job().id, worker="host:1")
    second = limits.acquire(p, job_id=running_job().id, worker="host:1")
    third = limits.acquire(p, job_id=running_job().id, worker="host:1")

    assert isinstance(first, limits.Permit) and isinstance(second, limits.Permit)
    assert {first.slot, second.slot} == {0, 1}
    assert isinstance(third, limits.Refusal) and "2 concurrent calls" in third.reason
    assert limits.in_use("limited") == 2


@pytest.mark.django_db
def test_a_released_slot_is_granted_again():
    p = provider(max_concurrency=1)
    permit = limits.acquire(p, job_id=running_job().id, worker="host:1")
    assert limits.release(permit) is True
    assert isinstance(limits.acquire(p, job_id=running_job().id, worker="host:1"), limits.Permit)


@pytest.mark.django_db
def test_a_dead_holders_slot_frees_itself_when_its_jobs_lease_expires():
    p = provider(max_concurrency=1)
    holder = running_job()
    assert isinstance(limits.acquire(p, job_id=holder.id, worker="host:1"), limits.Permit)
    assert isinstance(limits.acquire(p, job_id=running_job().id, worker="host:2"), limits.Refusal)

    # The holder's worker was killed: nobody renews its lease.
    Job.objects.filter(id=holder.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    taken = limits.acquire(p, job_id=running_job().id, worker="host:2")
    assert isinstance(taken, limits.Permit)
    assert ProviderSlot.objects.get(provider="limited", slot=taken.slot).worker == "host:2"


@pytest.mark.django_db
def test_a_slot_whose_job_moved_on_is_free():
    p = provider(max_concurrency=1)
    holder = running_job()
    limits.acquire(p, job_id=holder.id, worker="host:1")
    # Rescued and claimed again by another worker: the old attempt's slot is stale.
    Job.objects.filter(id=holder.id).update(lease_owner="host:9")
    assert isinstance(limits.acquire(p, job_id=running_job().id, worker="host:2"), limits.Permit)


@pytest.mark.django_db
def test_a_slot_without_a_job_frees_itself_at_its_hard_expiry():
    p = provider(max_concurrency=1)
    assert isinstance(limits.acquire(p), limits.Permit)
    assert isinstance(limits.acquire(p), limits.Refusal)
    ProviderSlot.objects.filter(provider="limited").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert isinstance(limits.acquire(p), limits.Permit)


@pytest.mark.django_db
def test_lowering_the_limit_holds_at_once():
    for _ in range(3):
        assert isinstance(limits.acquire(provider(max_concurrency=3)), limits.Permit)
    assert isinstance(limits.acquire(provider(max_concurrency=4)), limits.Permit)
    assert isinstance(limits.acquire(provider(max_concurrency=2)), limits.Refusal)


@pytest.mark.django_db
def test_the_requests_per_minute_bucket_spreads_calls_and_says_when_the_next_is_due():
    p = provider(max_concurrency=10, requests_per_minute=120)  # 2 a second, a bucket of 2
    granted = [limits.acquire(p) for _ in range(3)]
    assert [isinstance(g, limits.Permit) for g in granted] == [True, True, False]
    refusal = granted[2]
    assert "120 requests a minute" in refusal.reason
    assert 0 < refusal.wait <= 0.5
    # A refused call takes no slot.
    assert limits.in_use("limited") == 2
    for permit in granted[:2]:
        limits.release(permit)
    time.sleep(refusal.wait + 0.05)  # the wait the refusal named: the bucket has refilled
    assert isinstance(limits.acquire(p), limits.Permit)


@pytest.mark.django_db
def test_a_batch_whose_budget_is_spent_gets_no_call():
    p = provider(max_concurrency=5)
    batch = Batch.objects.create(name="b", total=1, token_budget=100, prompt_tokens=60, completion_tokens=40)
    refusal = limits.acquire(p, job_id=running_job(batch=batch).id, worker="host:1", batch_id=batch.id)
    assert isinstance(refusal, limits.Refusal)
    assert refusal.budget_spent and refusal.used == 100 and refusal.budget == 100
    assert limits.in_use("limited") == 0

    Batch.objects.filter(id=batch.id).update(token_budget=101)
    assert isinstance(
        limits.acquire(p, job_id=running_job(batch=batch).id, worker="h", batch_id=batch.id), limits.Permit
    )


@pytest.mark.django_db
def test_a_release_adds_the_calls_tokens_to_the_job_batch_and_owner():
    p = provider()
    batch = Batch.objects.create(name="b", total=2)
    jobs = [running_job(batch=batch, owner="apikey:7") for _ in range(2)]
    for job in jobs:
        permit = limits.acquire(p, job_id=job.id, worker="host:1", batch_id=batch.id)
        limits.release(permit, prompt_tokens=10, completion_tokens=25)

    job = Job.objects.get(id=jobs[0].id)
    assert (job.prompt_tokens, job.completion_tokens, job.tokens_used) == (10, 25, 35)
    batch.refresh_from_db()
    assert (batch.prompt_tokens, batch.completion_tokens, batch.tokens_used) == (20, 50, 70)
    usage = TokenUsage.objects.get(owner="apikey:7")
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (2, 20, 50)
    assert usage.day == timezone.now().date()


@pytest.mark.django_db(transaction=True)
def test_workers_racing_for_slots_never_get_more_than_the_limit():
    p = provider(max_concurrency=2)
    limits.acquire(p)  # creates the rows
    ProviderSlot.objects.update(expires_at=None)
    barrier = threading.Barrier(12)
    outcomes: list[object] = []

    def race() -> None:
        try:
            barrier.wait()
            outcomes.append(limits.acquire(p))
        finally:
            connection.close()

    threads = [threading.Thread(target=race) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(outcomes) == 12
    assert sum(isinstance(o, limits.Permit) for o in outcomes) == 2
    assert limits.in_use("limited") == 2


def _plan_nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


@pytest.mark.django_db
def test_a_granted_call_does_not_count_the_providers_slots():
    # With most of a large limit held, a grant used to count every slot of the
    # provider as well (for the refusal's check of missing rows): about half
    # of its cost. Only a refusal needs the count.
    p = provider(max_concurrency=200)
    held = [limits.acquire(p, job_id=running_job().id, worker="host:1") for _ in range(150)]
    assert all(isinstance(permit, limits.Permit) for permit in held)
    rate, burst = limits.rate_of(p)
    params = {
        "provider": p.name,
        "slots": p.max_concurrency,
        "rpm": p.requests_per_minute,
        "rate": rate,
        "burst": burst,
        "batch": None,
        "job": str(running_job().id),
        "worker": "host:1",
        "hold": 60,
    }
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + limits._ACQUIRE, params)
        plan = cursor.fetchone()[0]
    assert limits.in_use(p.name) == 151  # (EXPLAIN ANALYZE ran it: a grant)
    plan = plan[0]["Plan"] if isinstance(plan, list) else plan
    counted = [
        scan
        for node in _plan_nodes(plan)
        if node["Node Type"] == "Aggregate"
        for scan in _plan_nodes(node)
        if scan.get("Relation Name") == "jobs_providerslot" and scan.get("Actual Loops", 0) > 0
    ]
    assert not counted, f"a granted acquire counted the provider's slots: {counted}"
