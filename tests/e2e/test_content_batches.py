"""A content batch end to end: uploaded and previewed in a real browser, run by
a real qcluster on the `llm` queue against the simulated provider, watched
live on its batch page, and exported over HTTP from a real Daphne."""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile

import httpx
import pytest

from jobs.models import Batch, Job, Page
from tests.e2e.test_browser import TIMEOUT_MS, browser, context, shot  # noqa: F401 (fixtures)
from tests.e2e.test_llm import simulator  # noqa: F401 (fixture)
from tests.e2e.test_sse_two_daphnes import session_cookie, start_daphne

pytestmark = pytest.mark.processes

KEYWORDS = [f"queue topic {i}" for i in range(10)]
ROWS = "keyword,audience\n" + "".join(f"{k},platform teams\n" for k in KEYWORDS)


@pytest.fixture
def operator(django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("olga", password="conveyor-pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate_job", content_type__app_label="jobs"))
    return user


def test_a_content_batch_is_previewed_run_watched_and_exported(processes, simulator, context, operator):  # noqa: F811
    base = start_daphne(processes)
    processes.qcluster("llm", CONVEYOR_WORKERS="2", **simulator)
    cookie = session_cookie(operator)
    context.add_cookies([{"name": "sessionid", "value": cookie, "url": base}])
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # Upload and preview: htmx posts the form as it changes.
    page.goto(f"{base}/batches/content/")
    page.fill("input[name=name]", "queue guides")
    page.set_input_files(
        "input[name=file]", files=[{"name": "guides.csv", "mimeType": "text/csv", "buffer": ROWS.encode()}]
    )
    page.fill("textarea[name=template]", "Write a short guide to {keyword} for {audience} and a {tone} reader.")
    page.locator("#errors-template").get_by_text("names {tone}, not a column of the file").wait_for()
    assert Batch.objects.count() == 0
    page.fill("textarea[name=template]", "Write a short guide to {keyword} for {audience}.")
    page.locator("#content-preview .ready").get_by_text("10 pages ready to queue").wait_for()
    assert page.locator("#errors-template").inner_text() == ""
    assert (
        page.locator("#content-preview pre").inner_text() == "Write a short guide to queue topic 0 for platform teams."
    )
    page.click("summary:has-text('Options')")
    page.fill("input[name=model]", "simulated@latency_ms=400")
    shot(page, "content-01-upload-preview")

    # Submit: the batch page fills in live, without a reload.
    page.click("button:has-text('Queue the pages')")
    page.wait_for_url(re.compile(r"/batches/[0-9a-f-]{36}/$"))
    batch_id = page.url.rstrip("/").rsplit("/", 1)[1]
    page.evaluate("window.__notReloaded = true")
    section = page.locator("#batch-content")
    section.get_by_text("10 of 10 pages done").wait_for(timeout=120_000)
    assert page.evaluate("window.__notReloaded") is True
    assert section.locator("table.pages tbody tr").count() == 10
    page.locator(f"#batch-summary-{batch_id}").get_by_text("the batch is complete").wait_for()
    shot(page, "content-02-batch-finished")

    batch = Batch.objects.get(id=batch_id)
    assert (batch.total, Job.objects.filter(batch=batch, kind="content.page", state="succeeded").count()) == (10, 10)
    slugs = sorted(Page.objects.filter(batch=batch).values_list("slug", flat=True))
    assert slugs == sorted(k.replace(" ", "-") for k in KEYWORDS)

    # A page's Markdown, from the table.
    section.get_by_role("link", name=".md").first.wait_for()
    page.locator("table.pages tbody tr a").first.click()
    page.locator("pre.markdown").wait_for()
    assert page.locator("pre.markdown").inner_text().startswith('---\ntitle: "')
    shot(page, "content-03-page")
    assert errors == []

    # Exports over HTTP, streamed by Daphne: parse each back.
    with httpx.Client(base_url=base, cookies={"sessionid": cookie}, timeout=30) as http:
        zipped = http.get(f"/api/v1/batches/{batch_id}/pages", params={"format": "zip"})
        as_csv = http.get(f"/batches/{batch_id}/export.csv")
        as_json = http.get(f"/api/v1/batches/{batch_id}/pages", params={"format": "json"})
    assert zipped.headers["content-type"] == "application/zip"
    assert zipped.headers["content-disposition"] == f'attachment; filename="queue-guides-{batch_id[:8]}-pages.zip"'
    archive = zipfile.ZipFile(io.BytesIO(zipped.content))
    assert archive.namelist() == [f"{slug}.md" for slug in slugs]
    stored = {p.slug: p for p in Page.objects.filter(batch=batch)}
    for slug in slugs:
        text = archive.read(f"{slug}.md").decode()
        assert text.startswith(f"---\ntitle: {json.dumps(stored[slug].title, ensure_ascii=False)}\n")
        assert text.endswith(stored[slug].body_markdown.strip() + "\n")
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert as_csv.headers["content-type"] == "text/csv; charset=utf-8"
    assert [(r["slug"], int(r["word_count"])) for r in rows] == [(s, stored[s].word_count) for s in slugs]
    assert [r["markdown"] for r in json.loads(as_json.content)] == [stored[s].body_markdown for s in slugs]


def test_an_operator_retries_a_batch_s_failed_pages_from_its_page(processes, simulator, context, operator):  # noqa: F811
    from jobs.content.service import submit_content
    from tests.conftest import wait_until

    base = start_daphne(processes)
    rows = "keyword\nalpha\nbeta\ngamma\n"
    batch = submit_content("rejected", rows, "About {keyword}", model="simulated@fail=400").batch
    processes.qcluster("llm", **simulator)
    dead = Job.objects.filter(batch=batch, state="dead")
    wait_until(lambda: dead.count() == 3, timeout=60, message="three dead pages")
    context.add_cookies([{"name": "sessionid", "value": session_cookie(operator), "url": base}])
    page = context.new_page()

    page.goto(f"{base}/batches/{batch.id}/")
    failures = page.locator("#batch-content .failures")
    assert failures.locator("tbody tr").count() == 3
    assert "ProviderRejected" in failures.inner_text()
    shot(page, "content-04-batch-failures")

    # One job: it runs again, dies again, and the section follows live.
    first = failures.locator("tbody tr").first
    job_id = first.get_attribute("id").removeprefix("failed-")
    first.get_by_role("button", name="Retry").click()
    page.locator("#notice").get_by_text(f"Queued job {job_id[:8]} again.").wait_for()
    wait_until(
        lambda: Job.objects.get(id=job_id).attempts == 1 and dead.count() == 3,
        timeout=60,
        message="the retried job to die again",
    )
    wait_until(
        lambda: Job.objects.get(id=job_id).events.filter(type="job.dead").count() == 2,
        timeout=60,
        message="a second death",
    )

    # All of them.
    page.get_by_role("button", name="Retry all 3 failed").click()
    page.locator("#notice").get_by_text("Queued 3 failed jobs again.").wait_for()
    wait_until(
        lambda: (
            dead.count() == 3
            and all(j.events.filter(type="job.dead").count() >= 2 for j in Job.objects.filter(batch=batch))
        ),
        timeout=60,
        message="every job to die again",
    )
    page.locator("#batch-content .failures tbody tr").nth(2).wait_for()
    shot(page, "content-05-batch-failures-after-retry")
