"""An LLM job's text and log lines, live on its page in a real browser: a real
Daphne (serving the dashboard and the simulated provider), a real qcluster on
the `llm` queue, Debian's Chromium. Screenshots go to test-artifacts/screenshots/."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from jobs.models import Job
from tests.conftest import wait_until
from tests.e2e.test_browser import browser, context, operator, shot, sign_in  # noqa: F401 - fixtures
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes

# ~120 tokens at 12 a second: ten seconds of streaming to watch.
SLOW_MODEL = "simulated@tps=12,ttft_ms=200"


def output_length(page, job_id: str) -> int:
    return page.evaluate(f"document.querySelector('#job-output-{job_id}').textContent.length")


def test_an_llm_job_s_text_grows_on_its_page_and_survives_a_reload(processes, context, operator, make_job):  # noqa: F811
    base = start_daphne(processes)
    job = make_job("llm.generate", {"prompt": "Write about queues", "max_tokens": 120, "model": SLOW_MODEL})
    job_id = str(job.id)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, base)
    page.goto(f"{base}/jobs/{job_id}/")
    page.locator("#live.on").wait_for()
    processes.qcluster("llm", PORT=str(urlsplit(base).port))

    # The text arrives in pieces, without a reload.
    page.evaluate("window.__notReloaded = true")
    lengths = set()

    def grown() -> bool:
        lengths.add(output_length(page, job_id))
        return len(lengths - {0}) >= 3

    wait_until(grown, timeout=60, message="the text to grow three times")
    assert page.evaluate("window.__notReloaded") is True
    assert page.locator(f"#job-output-panel-{job_id}").is_visible()
    assert page.locator(f"#job-summary-{job_id} .state.running").count() == 1
    shot(page, "output-01-streaming")

    # A reload mid-stream: the page's text from the database, then the stream
    # replays what came after, overlapping: nothing doubled, nothing missing.
    before = output_length(page, job_id)
    page.reload()
    page.locator("#live.on").wait_for()
    assert output_length(page, job_id) >= before
    page.locator(f"#job-summary-{job_id} .state.succeeded").wait_for(timeout=60_000)
    job = Job.objects.get(id=job_id)
    text = job.result["text"]
    page.wait_for_function(
        f"document.querySelector('#job-output-{job_id}').textContent.length === {len(text)}", polling=100
    )
    assert page.locator(f"#job-output-{job_id}").text_content() == text
    # Its log lines: the handler's own, live.
    logs = page.locator(f"#job-logs-{job_id} li")
    assert logs.count() >= 1 and "calling simulated" in logs.first.inner_text()
    shot(page, "output-02-succeeded-with-logs")

    # The attempt history keeps the text, with a copy button.
    page.locator("#attempt-1-output summary").click()
    page.locator("#attempt-1-logs summary").click()
    assert page.locator("#attempt-1-output-text").text_content() == text
    page.locator("#attempt-1-output").scroll_into_view_if_needed()
    shot(page, "output-03-attempt-history")
    assert errors == []
