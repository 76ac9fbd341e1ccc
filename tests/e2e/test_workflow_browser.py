"""A workflow on the job page, in a real browser: the dependencies and
dependents of a job with their states, updated live as they run (real
Daphne, real qcluster, Debian's Chromium)."""

from __future__ import annotations

import pytest

from tests.e2e.test_browser import browser, context, operator, shot, sign_in  # noqa: F401 - fixtures
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes


def test_the_job_page_shows_dependencies_and_dependents_live(processes, context, operator, make_job):  # noqa: F811
    first = make_job("demo.sleep", {"seconds": 1.5, "steps": 3})
    second = make_job("demo.sleep", {"seconds": 0.5, "steps": 1})
    collect = make_job("demo.collect", {}, depends_on=[first.id, second.id])
    after = make_job("demo.noop", {}, depends_on=[collect.id])
    base = start_daphne(processes)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, base)

    page.goto(f"{base}/jobs/{collect.id}/")
    page.locator("#live.on").wait_for()
    page.evaluate("window.__notReloaded = true")
    panel = page.locator(f"#job-workflow-{collect.id}")
    assert "Waits for" in panel.inner_text() and "Needed by" in panel.inner_text()
    assert panel.locator(f"#workflow-{collect.id}-{first.id} .state.queued").count() == 1
    assert panel.locator(f"#workflow-{collect.id}-{after.id} .state.waiting").count() == 1
    assert "Waiting for 2 jobs it depends on" in page.locator(f"#job-summary-{collect.id}").inner_text()
    shot(page, "workflows-job-waiting")

    processes.qcluster()
    page.locator(f"#workflow-{collect.id}-{first.id} .state.running").wait_for()
    page.locator(f"#workflow-{collect.id}-{first.id} .state.succeeded").wait_for()
    page.locator(f"#job-summary-{collect.id} .state.succeeded").wait_for()
    page.locator(f"#workflow-{collect.id}-{after.id} .state.succeeded").wait_for()
    assert page.evaluate("window.__notReloaded") is True
    assert str(first.id) in page.locator(f"#job-outcome-{collect.id}").inner_text()
    shot(page, "workflows-job-done")

    page.goto(f"{base}/jobs/?state=waiting")
    assert page.locator("select[name=state] option", has_text="waiting").count() == 1
    assert errors == []
