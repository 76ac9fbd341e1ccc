"""The workers page, the rollup charts and the dead-letter table in a real
browser against a real Daphne (and a real qcluster for the workers page).
Screenshots go to test-artifacts/screenshots/observe-*.png."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.conftest import wait_until
from tests.e2e.test_browser import browser, context, operator, shot, sign_in  # noqa: F401 - fixtures
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes


def test_the_workers_page_shows_a_real_clusters_running_job_live(processes, context, operator):  # noqa: F811
    from jobs.models import Job, State
    from jobs.services import submit_job

    base = start_daphne(processes)
    processes.qcluster()
    job = submit_job("demo.sleep", {"seconds": 8, "steps": 8}).job
    wait_until(
        lambda: Job.objects.filter(id=job.id, state=State.RUNNING).exists(), timeout=60, message="the job to run"
    )
    worker_pid = int(Job.objects.get(id=job.id).lease_owner.rsplit(":", 1)[1])
    page = context.new_page()
    sign_in(page, base)
    page.click("nav >> text=Workers")
    page.wait_for_url(f"{base}/workers/")
    page.evaluate("window.__notReloaded = true")

    row = page.locator(f"#worker-{worker_pid}")
    link = row.locator(f"a[href='/jobs/{job.id}/']")
    link.wait_for()
    assert "demo.sleep" in row.inner_text()
    cluster = page.locator("section.cluster").filter(has=row)
    head = cluster.locator(".cluster-head").inner_text()
    assert "queue default" in head and "heartbeat" in head
    # The heartbeat carries each worker's memory: RSS and PSS in MB.
    cells = row.locator("td.num").all_inner_texts()
    assert all(text.endswith("MB") for text in cells), cells
    shot(page, "observe-workers")

    # The job ends; the page shows the worker idle without a reload.
    wait_until(
        lambda: Job.objects.filter(id=job.id, state=State.SUCCEEDED).exists(), timeout=60, message="the job to end"
    )
    page.wait_for_function(
        f"() => document.querySelector('#worker-{worker_pid}')?.innerText.includes('idle')", timeout=15_000
    )
    assert page.evaluate("window.__notReloaded") is True


def _finished_attempts() -> None:
    """Attempts with known run times over the last day, rolled up."""
    from jobs.engine.rollup import roll_up
    from jobs.models import Attempt, Job, State

    now = timezone.now()
    for i in range(120):
        finished = now - timedelta(minutes=2 + (i * 11) % (23 * 60))
        run_ms = 200 + (i % 7) * 150 if i % 9 else 4000
        queue, kind = ("llm", "llm.generate") if i % 3 == 0 else ("default", "demo.sleep")
        outcome = "failed" if i % 10 == 0 else "succeeded"
        job = Job.objects.create(kind=kind, queue=queue, state=State.SUCCEEDED, finished_at=finished, attempts=1)
        started = finished - timedelta(milliseconds=run_ms)
        Job.objects.filter(id=job.id).update(created_at=started - timedelta(milliseconds=50 + i * 10))
        Attempt.objects.create(job=job, number=1, started_at=started, finished_at=finished, outcome=outcome)
    roll_up()


def test_the_charts_page_switches_range_and_queue(processes, context, operator):  # noqa: F811
    _finished_attempts()
    base = start_daphne(processes)
    page = context.new_page()
    sign_in(page, base)
    page.click("nav >> text=Charts")
    page.wait_for_url(f"{base}/charts/")
    page.evaluate("window.__notReloaded = true")
    table = page.locator("table.kinds").nth(1)  # the last 24 hours
    assert "demo.sleep" in table.inner_text() and "llm.generate" in table.inner_text()

    page.select_option("select[name=range]", "24h")
    page.wait_for_url(f"{base}/charts/?range=24h&queue=")
    page.locator("svg[aria-label='Throughput over the last 24h']").wait_for()
    page.select_option("select[name=queue]", "llm")
    page.wait_for_url(f"{base}/charts/?range=24h&queue=llm")
    page.locator("#rollup h2:has-text('llm')").first.wait_for()
    table = page.locator("table.kinds").nth(1)
    assert "llm.generate" in table.inner_text() and "demo.sleep" not in table.inner_text()
    assert page.evaluate("window.__notReloaded") is True
    path = page.locator("svg[aria-label='Throughput over the last 24h'] path.s-succeeded").get_attribute("d")
    assert path and path.startswith("M") and path.count("L") >= 2
    shot(page, "observe-charts")


def test_the_dead_letter_tables_rows_keep_their_borders(processes, context, operator, make_job):  # noqa: F811
    """The action column is a table cell like the others: every cell of a row
    spans the row's full height, so the row's bottom border is one line."""
    from tests.jobs.api.conftest import make_dead

    for i in range(3):
        job = make_job("demo.noop", {})
        make_dead(job.id)
        if i == 0:
            from jobs.models import Job

            Job.objects.filter(id=job.id).update(error_message="a long error message " * 12)
    base = start_daphne(processes)
    page = context.new_page()
    sign_in(page, base)
    page.goto(f"{base}/dead-letter/")
    page.locator("td.actions").first.wait_for()
    shot(page, "observe-dead-letter")
    misfits = page.evaluate(
        """() => [...document.querySelectorAll('#dead-letter tbody tr')].flatMap(tr => {
            const row = tr.getBoundingClientRect();
            return [...tr.children].filter(td => {
                const cell = td.getBoundingClientRect();
                return getComputedStyle(td).display !== 'table-cell'
                    || Math.abs(cell.top - row.top) > 1 || Math.abs(cell.bottom - row.bottom) > 1;
            }).map(td => td.className || td.tagName);
        })"""
    )
    assert misfits == []
