"""Operator controls in a real browser against a real Daphne and qcluster:
pause a queue from its card, see a job wait, resume, see it run; cancel a
batch from its page; the jobs list's bulk buttons and the API keys page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from tests.conftest import wait_until
from tests.e2e.test_browser import browser, context, operator, shot, sign_in  # noqa: F401 - fixtures
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes

# The broker's wait (jobs/djangoq/broker.py `_NEXT_DUE`) follows every claim
# that found nothing; Postgres shows when a backend last ran it.
_LAST_IDLE_POLL = (
    "SELECT max(query_start) FROM pg_stat_activity WHERE datname = current_database()"
    " AND query LIKE 'SELECT extract(epoch FROM min(lock) - now()) FROM django_q_ormq%%'"
)


def db_now():
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]


def last_idle_poll():
    with connection.cursor() as cursor:
        cursor.execute(_LAST_IDLE_POLL)
        return cursor.fetchone()[0]


def polled_twice_since(moment) -> None:
    """Wait until the cluster's broker has finished a claim that started after
    `moment`: a wait began after `moment`, then another one after that."""
    first = wait_until(lambda: (t := last_idle_poll()) and t > moment and t, timeout=30, message="no broker poll")
    wait_until(lambda: (t := last_idle_poll()) and t > first, timeout=30, message="no second broker poll")


def keep(page, name: str) -> None:
    shot(page, f"queues-{name}")


def test_an_operator_pauses_a_queue_and_cancels_a_batch(processes, context, operator, make_job):  # noqa: F811
    from jobs import services
    from jobs.models import Job, State

    base = start_daphne(processes)
    processes.qcluster()
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, base)
    page.locator("#live.on").wait_for()

    # Pause from the queue's card: the card shows it live.
    card = page.locator("#queue-default")
    card.locator("button:has-text('Pause')").click()
    card.locator(".pill.paused").wait_for()
    assert services.get_control("default").paused
    keep(page, "overview-paused")

    # A job submitted now waits: still queued after the cluster has polled.
    submitted_at = db_now()
    job = make_job("demo.noop")
    polled_twice_since(submitted_at)
    job.refresh_from_db()
    assert job.state == State.QUEUED
    page.goto(f"{base}/jobs/{job.id}/")
    page.locator(".state.queued").first.wait_for()

    # Resume from the overview: it runs.
    page.goto(f"{base}/")
    page.locator("#queue-default button:has-text('Resume')").click()
    wait_until(lambda: Job.objects.get(id=job.id).state == State.SUCCEEDED, timeout=30, message="never ran")
    page.locator("#queue-default .pill.paused").wait_for(state="detached")

    # A limit, set on the card.
    page.fill("#queue-default input[name=max_running]", "2")
    page.locator("#queue-default button:has-text('Set')").click()
    page.locator("#queue-default .pill.limit").wait_for()
    assert services.get_control("default").max_running == 2
    keep(page, "overview-limited")

    # Cancel a batch from its page (paused, so that its jobs wait).
    services.pause_queue("default")
    batch = services.submit_batch("to cancel", [{"kind": "demo.noop", "payload": {}}] * 3, owner="user:x").batch
    page.goto(f"{base}/batches/{batch.id}/")
    keep(page, "batch-cancel")
    page.click("button:has-text('Cancel batch')")
    wait_until(
        lambda: set(Job.objects.filter(batch=batch).values_list("state", flat=True)) == {State.CANCELLED},
        timeout=30,
        message="the batch's jobs were not cancelled",
    )
    page.locator(".state.cancelled").first.wait_for()

    # Run now, from the page of a scheduled job.
    later = make_job("demo.noop", run_after=timezone.now() + timedelta(hours=1))
    page.goto(f"{base}/jobs/{later.id}/")
    keep(page, "job-run-now")
    services.resume_queue("default")
    page.click("button:has-text('Run now')")
    wait_until(lambda: Job.objects.get(id=later.id).state == State.SUCCEEDED, timeout=30, message="not run now")

    # The jobs list: cancel a selected job, then all matching, each confirmed.
    services.pause_queue("default")
    sleepers = [make_job("demo.sleep", {"seconds": 1}) for _ in range(3)]
    page.goto(f"{base}/jobs/?kind=demo.sleep&state=queued")
    page.check(f"#select-{sleepers[0].id}")
    keep(page, "jobs-bulk")
    page.click("button:has-text('Cancel selected')")
    page.locator("button:has-text('Cancel all matching (2)')").wait_for()
    assert Job.objects.get(id=sleepers[0].id).state == State.CANCELLED
    page.click("button:has-text('Cancel all matching (2)')")
    page.locator("button:has-text('Cancel all matching (0)')").wait_for()
    assert Job.objects.filter(kind="demo.sleep", state=State.CANCELLED).count() == 3

    # API keys: create (shown once), then revoke.
    page.goto(f"{base}/api-keys/")
    page.fill("input[name=name]", "ci")
    page.click("button:has-text('Create key')")
    key = page.locator("#new-key").inner_text()
    assert key.startswith("cvk_")
    keep(page, "api-keys")
    page.locator("tr:has-text('ci') button:has-text('Revoke')").click()
    page.wait_for_load_state()
    assert services.verify_api_key(key) is None
    services.resume_queue("default")
    assert not errors, errors
