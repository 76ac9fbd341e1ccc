"""LLM jobs through the service functions, the runner and this process's asyncio lane,
calling the simulated provider on a real Daphne: token accounting, batch budgets,
the requests-per-minute limit and the fallback provider."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta

import httpx
import pytest
from django.db import connection
from django.utils import timezone

from jobs import services
from jobs.llm import limits
from jobs.models import Batch, Job, ProviderSlot, TokenUsage
from jobs.worker import runner
from tests.conftest import release_lane_connection, wait_until
from tests.jobs.llm.conftest import API_KEY

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def configure(daphne: str, monkeypatch) -> Iterator[Callable[..., None]]:
    """`configure(name=..., **options)` per provider: all point at the test Daphne."""

    def set_providers(*providers: dict) -> None:
        values = [
            {"base_url": f"{daphne}/simulated/v1", "api_key": API_KEY, "default_model": "simulated", **p}
            for p in providers
        ]
        monkeypatch.setenv("CONVEYOR_LLM_PROVIDERS", json.dumps(values))

    httpx.delete(f"{daphne}/simulated/v1/load")
    yield set_providers
    release_lane_connection()


@pytest.fixture
def one_at_a_time(settings) -> None:
    """Each delivery claims only its own job (no lane filling): the budget is
    spent by one call before the next starts. Calls that start together all
    pass the budget check, whether in one lane or on many workers."""
    settings.CONVEYOR = {**settings.CONVEYOR, "LANE_FILL": 0}


def run(job: Job) -> Job:
    """Deliver the job once (as a broker row would) and wait until its attempt ends."""
    runner.run_job(str(job.id))
    wait_until(lambda: Job.objects.get(id=job.id).state != "running", timeout=60, message="the attempt to end")
    return Job.objects.get(id=job.id)


def generate(**payload) -> dict:
    return {"kind": "llm.generate", "payload": {"prompt": "Write about durable queues", "max_tokens": 20, **payload}}


def test_a_job_counts_its_tokens_on_itself_its_batch_and_its_owner(configure):
    configure({"name": "sim"})
    batch = services.submit_batch("counted", [generate(), generate()], owner="apikey:42").batch

    jobs = [run(job) for job in batch.jobs.order_by("created_at")]

    assert [job.state for job in jobs] == ["succeeded", "succeeded"]
    for job in jobs:
        assert job.prompt_tokens == job.result["usage"]["prompt_tokens"] > 0
        assert job.completion_tokens == job.result["usage"]["completion_tokens"] > 0
    batch.refresh_from_db()
    assert batch.tokens_used == sum(job.tokens_used for job in jobs)
    usage = TokenUsage.objects.get(owner="apikey:42")
    assert usage.requests == 2 and usage.prompt_tokens + usage.completion_tokens == batch.tokens_used
    assert services.owner_usage("apikey:42").total.total_tokens == batch.tokens_used


def test_a_spent_budget_parks_the_batchs_jobs_until_an_operator_raises_it(configure, one_at_a_time):
    configure({"name": "sim"})
    batch = services.submit_batch("budgeted", [generate() for _ in range(3)], token_budget=5).batch
    first, second, third = batch.jobs.order_by("created_at")

    # The budget is checked before a call: the first call starts, and spends it.
    assert run(first).state == "succeeded"
    batch.refresh_from_db()
    assert batch.tokens_used >= 5

    parked = run(second)
    assert parked.state == "retrying"
    assert parked.error_type == "TokenBudgetExhausted"
    assert parked.error_message.startswith("token budget exhausted")
    assert parked.attempts == 0  # waiting does not use up attempts
    assert parked.run_after > timezone.now() + timedelta(minutes=30)
    assert run(third).state == "retrying"
    assert services.waiting_on_budget(batch.id) == 2
    # A delivery while the budget is still spent does not run it.
    runner.run_job(str(parked.id))
    assert Job.objects.get(id=parked.id).state == "retrying"

    # Raising the budget to what is already used leaves no room: they keep waiting.
    services.set_batch_budget(batch.id, batch.tokens_used)
    assert Job.objects.get(id=parked.id).run_after > timezone.now() + timedelta(minutes=30)

    services.set_batch_budget(batch.id, 10_000, actor="ops")
    woken = Job.objects.get(id=parked.id)
    assert woken.run_after <= timezone.now()
    assert woken.events.filter(type="job.resumed").exists()
    assert run(woken).state == "succeeded"

    # The other one is cancelled by the operator instead.
    services.set_batch_budget(batch.id, 1)
    assert services.cancel_job(third.id).state == "cancelled"
    assert services.waiting_on_budget(batch.id) == 0


def test_a_budget_can_be_removed(configure, one_at_a_time):
    configure({"name": "sim"})
    batch = services.submit_batch("capped", [generate(), generate()], token_budget=1).batch
    first, second = batch.jobs.order_by("created_at")
    run(first)
    assert run(second).state == "retrying"

    services.set_batch_budget(batch.id, None)

    assert Batch.objects.get(id=batch.id).token_budget is None
    assert run(Job.objects.get(id=second.id)).state == "succeeded"


@pytest.mark.parametrize("bad", [0, -5, 1.5, "100", True])
def test_a_bad_budget_is_refused_with_its_field(bad, configure):
    batch = services.submit_batch("b", [generate()]).batch
    with pytest.raises(services.InvalidBatch) as refused:
        services.set_batch_budget(batch.id, bad)
    assert refused.value.errors[0]["field"] == "token_budget"
    with pytest.raises(services.InvalidBatch):
        services.submit_batch("b", [generate()], token_budget=bad)


def test_the_requests_per_minute_limit_spreads_the_calls(configure, daphne):
    # 60 a minute: one a second, a bucket of one.
    configure({"name": "sim", "requests_per_minute": 60, "max_concurrency": 10})
    jobs = list(services.submit_batch("paced", [generate() for _ in range(4)]).batch.jobs.all())

    for job in jobs:
        runner.run_job(str(job.id))

    def all_done():
        states = list(Job.objects.filter(id__in=[j.id for j in jobs]).values_list("state", flat=True))
        if "running" in states:
            return False
        # Those the limit sent back to wait are delivered again once due.
        for job in Job.objects.filter(id__in=[j.id for j in jobs], state="retrying", run_after__lte=timezone.now()):
            runner.run_job(str(job.id))
        return states.count("succeeded") == 4

    wait_until(all_done, timeout=90, interval=0.2, message="four paced jobs")
    started = sorted(httpx.get(f"{daphne}/simulated/v1/load").json()["started"])
    assert len(started) == 4
    gaps = [later - earlier for earlier, later in zip(started, started[1:], strict=False)]
    assert min(gaps) >= 0.9, gaps
    # Throttling never used up an attempt.
    assert all(job.attempts == 1 for job in Job.objects.filter(id__in=[j.id for j in jobs]))


@pytest.mark.parametrize("failure", ["500", "429"])
def test_after_n_provider_failures_the_fallback_provider_answers(failure, configure, daphne):
    configure(
        {"name": "primary", "default_model": f"simulated@fail={failure},retry_after=0"},
        {"name": "backup", "default_model": "simulated"},
    )
    job = services.submit_job(
        "llm.generate",
        {
            "prompt": "Write about queues",
            "max_tokens": 10,
            "provider": "primary",
            "fallback": {"provider": "backup", "after": 2},
        },
        backoff_base=0.05,
        backoff_max=0.1,
    ).job

    outcomes = []
    for _ in range(3):
        wait_until(
            lambda: (
                Job.objects.get(id=job.id).run_after is None or Job.objects.get(id=job.id).run_after <= timezone.now()
            ),
            timeout=10,
            message="the retry",
        )
        done = run(job)
        outcomes.append((done.state, done.error_type))

    expected_error = "ProviderUnavailable" if failure == "500" else "ProviderThrottled"
    assert outcomes == [("retrying", expected_error), ("retrying", expected_error), ("succeeded", "")]
    assert done.result["provider"] == "backup" and done.result["fallback"] is True
    assert done.attempts == (3 if failure == "500" else 1)  # a 429 does not use up attempts


def test_a_job_without_a_fallback_keeps_failing_on_its_provider(configure):
    configure({"name": "primary", "default_model": "simulated@fail=503"})
    job = services.submit_job("llm.generate", {"prompt": "x", "provider": "primary"}, max_attempts=1).job
    done = run(job)
    assert done.state == "dead" and done.error_type == "ProviderUnavailable"
    assert done.tokens_used == 0


def test_a_cancelled_call_gives_its_slot_back(configure):
    configure({"name": "sim", "max_concurrency": 1, "default_model": "simulated@latency_ms=6000"})
    job = services.submit_job("llm.generate", {"prompt": "Write a long answer", "max_tokens": 200}).job
    runner.run_job(str(job.id))
    wait_until(lambda: limits.in_use("sim") == 1, timeout=30, message="the call to hold the slot")

    services.cancel_job(job.id, actor="ops")

    wait_until(lambda: Job.objects.get(id=job.id).state == "cancelled", timeout=30, message="the cancellation")
    assert limits.in_use("sim") == 0
    assert not ProviderSlot.objects.filter(provider="sim", job_id__isnull=False).exists()  # released, not just stale


def test_a_failed_call_gives_its_slot_back(configure):
    configure({"name": "sim", "max_concurrency": 1, "default_model": "simulated@fail=500"})
    job = services.submit_job("llm.generate", {"prompt": "x"}, max_attempts=1).job
    assert run(job).state == "dead"
    assert not ProviderSlot.objects.filter(provider="sim", job_id__isnull=False).exists()


def test_one_delivery_fills_the_lane_with_the_queues_ready_jobs(configure):
    configure({"name": "sim"})
    jobs = list(services.submit_batch("filled", [generate() for _ in range(3)]).batch.jobs.order_by("created_at"))
    runner.run_job(str(jobs[0].id))  # one delivery; the other two are claimed with it

    ids = [job.id for job in jobs]
    wait_until(lambda: Job.objects.filter(id__in=ids, state="succeeded").count() == 3, timeout=60)
    for job in Job.objects.filter(id__in=ids):
        assert [(a.number, a.outcome) for a in job.attempt_set.all()] == [(1, "succeeded")]
        assert job.completion_tokens > 0

    # The claimed jobs' own broker rows served as their watchdogs and went when they finished.
    def rows_left() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM django_q_ormq WHERE job_id = ANY(%s)", [ids[1:]])
            return cursor.fetchone()[0]

    wait_until(lambda: rows_left() == 0, timeout=10, message="the watchdog rows to go")


@pytest.mark.parametrize(
    ("template", "variables", "message"),
    [
        ("{keyword:>50}", {"keyword": "k"}, "format spec"),
        ("{keyword!r}", {"keyword": "k"}, "conversion"),
        ("{keyword}" * 20, {"keyword": "k" * 6000}, "at most 100,000"),
    ],
)
def test_a_stored_content_page_job_with_a_bad_template_fails_at_once(configure, daphne, template, variables, message):
    """A job stored before its template was checked (or written around the
    checks) is dead on its first attempt: retrying cannot fix its payload."""
    configure({"name": "sim"})
    job = services.submit_job("content.page", {"template": "{keyword}", "variables": {"keyword": "k"}}).job
    Job.objects.filter(id=job.id).update(payload={**job.payload, "template": template, "variables": variables})

    done = run(job)

    assert (done.state, done.attempts, done.max_attempts) == ("dead", 1, 5)
    assert done.error_type == "InvalidPayload" and message in done.error_message
    assert httpx.get(f"{daphne}/simulated/v1/load").json()["requests"] == 0


def test_a_content_page_is_asked_for_whole_and_stored_without_streamed_events(configure, daphne):
    """content.page makes one non-streamed call: no job.progress events and
    one job.output (the whole text, flushed with the outcome) rather than
    several of each per page; the attempt keeps the text all the same."""
    from jobs.models import Attempt, Page

    configure({"name": "sim"})
    batch = services.submit_batch(
        "pages",
        [{"kind": "content.page", "payload": {"template": "About {keyword}", "variables": {"keyword": "Tea Time"}}}],
    ).batch
    job = batch.jobs.get()

    done = run(job)

    assert done.state == "succeeded"
    stored = Page.objects.get(batch=batch)
    assert (stored.slug, stored.keyword, stored.job_id) == ("tea-time", "Tea Time", job.id)
    assert stored.simulated is done.result["simulated"]
    assert done.result["page_id"] == stored.id and done.result["slug"] == "tea-time"
    assert stored.title and stored.body_markdown.startswith("# ") and stored.word_count > 0
    assert (stored.prompt_tokens, stored.completion_tokens) == (done.prompt_tokens, done.completion_tokens)
    types = list(done.events.values_list("type", flat=True))
    assert {"job.created", "job.started", "job.succeeded"} <= set(types)
    assert "job.progress" not in types and types.count("job.output") == 1  # the whole text, with the outcome
    assert stored.title in Attempt.objects.get(job=job).output
    assert httpx.get(f"{daphne}/simulated/v1/load").json()["total"] == 1


def page_job(keyword: str, owner: str, **options) -> Job:
    payload = {"template": "About {keyword}", "variables": {"keyword": keyword}}
    item = {"kind": "content.page", "payload": payload, **options}
    return services.submit_batch("pages", [item], owner=owner).batch.jobs.get()


def test_a_stored_page_frees_its_slot_and_counts_its_tokens_once_in_its_statement(configure, monkeypatch):
    from jobs.llm import handler

    configure({"name": "sim", "max_concurrency": 1})
    releases = []
    real = limits.release
    monkeypatch.setattr(limits, "release", lambda *args, **kwargs: releases.append(args) or real(*args, **kwargs))
    job = page_job("Green Tea", "apikey:7")

    done = run(job)

    assert done.state == "succeeded" and releases == []  # no separate release statement
    assert not ProviderSlot.objects.filter(provider="sim", job_id__isnull=False).exists()
    assert limits.in_use("sim") == 0
    assert done.prompt_tokens == done.result["usage"]["prompt_tokens"]
    assert done.completion_tokens == done.result["usage"]["completion_tokens"]
    assert done.tokens_used > 0 and Batch.objects.get(id=done.batch_id).tokens_used == done.tokens_used
    usage = TokenUsage.objects.get(owner="apikey:7")
    assert (usage.requests, usage.prompt_tokens + usage.completion_tokens) == (1, done.tokens_used)
    assert handler._store_page_releasing.cache_info().currsize == 1


def test_a_page_that_cannot_be_stored_still_frees_its_slot_and_counts_its_tokens_once(configure, monkeypatch):
    from jobs.llm import handler

    configure({"name": "sim", "max_concurrency": 1})
    monkeypatch.setattr(handler, "_store_page_releasing", lambda: "SELECT 1 / 0")  # the statement fails whole
    job = page_job("Oolong", "apikey:8", max_attempts=1)

    done = run(job)

    assert done.state == "dead" and "division by zero" in done.error_message
    assert not ProviderSlot.objects.filter(provider="sim", job_id__isnull=False).exists()
    assert limits.in_use("sim") == 0
    usage = TokenUsage.objects.get(owner="apikey:8")
    assert usage.requests == 1 and done.tokens_used > 0
    assert usage.prompt_tokens + usage.completion_tokens == done.tokens_used
    assert Batch.objects.get(id=done.batch_id).tokens_used == done.tokens_used


def test_storing_a_page_again_rewrites_the_same_row():
    """The page is keyed by (batch, slug), also without a batch: a job that
    runs again overwrites its page in one statement, keeping id and created_at."""
    from jobs.llm.handler import store_page
    from jobs.models import Page

    batch = Batch.objects.create(name="again")
    first_job = services.submit_job("demo.noop", {}).job
    second_job = services.submit_job("demo.noop", {}).job
    values = {"keyword": "Tea", "title": "One", "meta_description": "d", "body_markdown": "# One", "word_count": 2}
    counts = {"prompt_tokens": 3, "completion_tokens": 4, "simulated": True}

    first = store_page(batch.id, "tea", job_id=first_job.id, **values, **counts)
    created = Page.objects.get(id=first).created_at
    again = store_page(batch.id, "tea", job_id=second_job.id, **{**values, "title": "Two"}, **counts)
    alone = [store_page(None, "tea", job_id=None, **values, **counts) for _ in range(2)]

    assert again == first and alone[0] == alone[1] != first
    page = Page.objects.get(id=first)
    assert (page.title, page.job_id, page.created_at) == ("Two", second_job.id, created)
    assert page.updated_at >= created
    assert Page.objects.count() == 2
