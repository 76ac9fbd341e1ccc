"""The dashboard in a real browser: Playwright drives Debian's Chromium against
a real Daphne and a real qcluster on the test database. Screenshots of every
page go to test-artifacts/screenshots/."""

from __future__ import annotations

import re
import shutil

import pytest
from django.db import connections
from playwright.sync_api import expect

from tests.conftest import ARTIFACTS
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SHOTS = ARTIFACTS / "screenshots"
TIMEOUT_MS = 60_000


@pytest.fixture
def browser(monkeypatch):
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    # Playwright's sync API runs an event loop in this thread; the test's own
    # ORM calls are still plain synchronous ones.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
        # With Playwright's loop running, Django keeps this thread's database
        # connection per context (asgiref.local): close the test's own before
        # the loop stops, or it outlives the test and the test database.
        connections.close_all()


@pytest.fixture
def operator(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("olga", password="conveyor-pw", is_staff=True)
    codenames = ["operate_job", "view_job", "view_batch", "view_attempt", "view_jobevent"]
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames, content_type__app_label="jobs"))
    return user


def sign_in(page, base: str, path: str = "/") -> None:
    """Sign in as the `operator` fixture's user and land on `path`."""
    page.goto(f"{base}/accounts/login/?next={path}")
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", "conveyor-pw")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}{path}")


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def context(browser, request):
    """A browser context whose pages are photographed if the test fails."""
    context = browser.new_context(viewport={"width": 1320, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    failed_before = request.session.testsfailed
    yield context
    if request.session.testsfailed > failed_before:
        for i, page in enumerate(context.pages):
            shot(page, f"failed-{request.node.name}-{i}")
    context.close()


def test_an_operator_watches_jobs_live_and_retries_a_dead_one(processes, context, operator, make_job):
    from jobs.models import Batch, Job

    base = start_daphne(processes)
    processes.qcluster()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda message: print("console:", message.type, message.text[:300]))

    # Anonymous visitors land on the sign-in page.
    page.goto(f"{base}/")
    assert "/accounts/login/" in page.url
    shot(page, "01-sign-in")
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", "conveyor-pw")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/")
    page.locator("#live.on").wait_for()
    shot(page, "02-overview-empty")

    # Submit demo.sleep from the form generated from its schema.
    page.goto(f"{base}/submit/")
    page.click("text=demo.sleep")
    page.fill("input[name=payload-seconds]", "3")
    page.fill("input[name=payload-steps]", "6")
    shot(page, "03-submit-form")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}/$"))
    job_id = page.url.rstrip("/").rsplit("/", 1)[1]
    page.evaluate("window.__notReloaded = true")

    # The progress bar fills and the state turns, without a reload.
    summary = page.locator(f"#job-summary-{job_id}")
    page.wait_for_function(
        f"""() => {{
            const bar = document.querySelector('#job-summary-{job_id} [role=progressbar]');
            window.__seen = (window.__seen || new Set());
            if (bar) window.__seen.add(bar.getAttribute('aria-valuenow'));
            return document.querySelector('#job-summary-{job_id} .state.running') !== null
                && Number(bar.getAttribute('aria-valuenow')) > 0;
        }}""",
        polling=50,
    )
    shot(page, "04-job-running")
    page.wait_for_function(
        f"""() => {{
            const bar = document.querySelector('#job-summary-{job_id} [role=progressbar]');
            if (bar) window.__seen.add(bar.getAttribute('aria-valuenow'));
            return document.querySelector('#job-summary-{job_id} .state.succeeded') !== null;
        }}""",
        polling=50,
    )
    seen = set(page.evaluate("Array.from(window.__seen)"))
    assert summary.locator("[role=progressbar]").get_attribute("aria-valuenow") == "100"
    assert summary.locator(".percent").inner_text() == "100%"
    assert len(seen - {"0", "100"}) >= 2, f"expected intermediate progress, saw {sorted(seen)}"
    assert page.evaluate("window.__notReloaded") is True
    assert '"slept": 3.0' in page.locator(f"#job-outcome-{job_id}").inner_text()
    assert page.locator(f"#job-timeline-{job_id} li").count() >= 9  # created, started, 6 × progress, succeeded
    shot(page, "05-job-succeeded")

    # A permanent failure lands in the dead-letter queue.
    page.goto(f"{base}/submit/?kind=demo.fail")
    page.select_option("select[name=payload-mode]", "permanent")
    page.fill("textarea[name=payload-message]", "the provider said no")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(re.compile(r"/jobs/[0-9a-f-]{36}/$"))
    dead_id = page.url.rstrip("/").rsplit("/", 1)[1]
    page.locator(f"#job-summary-{dead_id} .state.dead").wait_for()
    assert page.locator(f"#job-outcome-{dead_id} .error-message").inner_text() == "the provider said no"
    shot(page, "06-job-dead")

    # A second tab keeps the dead job's page open while the first retries it.
    watcher = context.new_page()
    watcher.goto(f"{base}/jobs/{dead_id}/")
    watcher.locator("#live.on").wait_for()

    page.goto(f"{base}/dead-letter/")
    row = page.locator(f"#dead-job-{dead_id}")
    row.wait_for()
    assert "DemoPermanentError" in page.locator("#dead-letter").inner_text()
    # The row may arrive live, just before the title's own update.
    expect(page).to_have_title(re.compile(r"^\(1 dead\) "), timeout=10_000)
    page.locator("#live.on").wait_for()
    shot(page, "07-dead-letter")
    row.get_by_role("button", name="Retry").click()
    page.locator("#notice").get_by_text("Retried 1 job.").wait_for()

    # The other tab sees the retry, the new attempt and its second death, live.
    timeline = watcher.locator(f"#job-timeline-{dead_id}")
    timeline.get_by_text("retried by olga").wait_for()
    watcher.wait_for_function(
        f"document.querySelectorAll('#job-attempts-{dead_id} tbody tr').length === 2", polling=100
    )
    watcher.locator(f"#job-summary-{dead_id} .state.dead").wait_for()
    assert [t.strip() for t in timeline.locator(".ev-type").all_inner_texts()] == [
        "created",
        "started",
        "dead",
        "queued",
        "started",
        "dead",
    ]
    shot(watcher, "08-job-retried-and-dead-again")
    # Back in the dead-letter queue (it died again): the row returns, live.
    row.wait_for()
    shot(page, "09-dead-letter-after-retry")

    # The remaining pages.
    batch = Batch.objects.create(name="nightly summaries", owner="olga", total=3)
    for seconds in (0.2, 0.4, 6):
        make_job("demo.sleep", {"seconds": seconds, "steps": 2}, batch=batch)
    page.goto(f"{base}/batches/")
    page.locator(f"#batch-{batch.id}").wait_for()
    page.wait_for_function(f"document.querySelector('#batch-{batch.id}').innerText.includes('2/3')", polling=100)
    shot(page, "10-batches")
    page.goto(f"{base}/batches/{batch.id}/")
    page.locator(f"#batch-summary-{batch.id}").wait_for()
    shot(page, "11-batch")
    page.goto(f"{base}/jobs/")
    page.locator(f"#job-{job_id}").wait_for()
    shot(page, "12-jobs")
    page.goto(f"{base}/")
    page.locator("#queue-default").wait_for()
    page.wait_for_timeout(1500)  # a statistics sample or two for the chart
    shot(page, "13-overview")
    page.goto(f"{base}/admin/jobs/job/")
    shot(page, "14-admin-jobs")

    assert errors == []
    assert Job.objects.get(id=dead_id).state == "dead"
