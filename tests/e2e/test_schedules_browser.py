"""The Schedules page in a real browser against a real Daphne and a real
cluster: the next runs are previewed as the expression is typed, a new
schedule's jobs appear in its row without a reload. Screenshots go to
test-artifacts/screenshots/."""

from __future__ import annotations

import pytest

from jobs.models import Job, Schedule
from tests.conftest import wait_until
from tests.e2e.test_browser import browser, context, operator, shot, sign_in  # noqa: F401 - fixtures
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes


def test_an_operator_previews_creates_and_watches_a_schedule(
    processes,
    context,  # noqa: F811
    operator,  # noqa: F811
):
    base = start_daphne(processes)
    processes.qcluster()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, base, "/schedules/")
    assert page.locator("nav a[aria-current=page]").inner_text() == "Schedules"

    # The preview follows the typing: an incomplete expression is refused,
    # a whole one shows its next five runs in the chosen zone.
    page.fill("input[name=name]", "berlin-morning")
    page.select_option("select[name=kind]", "demo.noop")
    page.fill("input[name=timezone]", "Europe/Berlin")
    page.locator("input[name=cron]").press_sequentially("0 9 * *", delay=30)
    page.locator("#preview .field-error").get_by_text("five fields").wait_for()
    page.locator("input[name=cron]").press_sequentially(" 1-5", delay=30)
    page.locator("#preview ol.ticks li").nth(4).wait_for()
    ticks = page.locator("#preview ol.ticks li").all_inner_texts()
    assert len(ticks) == 5 and all(" 09:00:00 CE" in t for t in ticks), ticks
    assert not any(t.startswith(("Sat", "Sun")) for t in ticks), ticks
    shot(page, "schedules-01-preview")
    page.click("button:has-text('Create schedule')")
    page.locator("#notice").get_by_text("Created the schedule berlin-morning").wait_for()

    # An every-second schedule: its row shows each new job and its state, live.
    page.fill("input[name=name]", "every-second")
    page.select_option("select[name=kind]", "demo.noop")
    page.fill("input[name=interval_seconds]", "1")
    page.locator("#preview ol.ticks li").nth(4).wait_for()
    page.click("button:has-text('Create schedule')")
    page.locator("#notice").get_by_text("Created the schedule every-second").wait_for()
    wait_until(
        lambda: Job.objects.filter(idempotency_key__startswith="schedule:every-second:").count() >= 3, timeout=30
    )
    row = page.locator("tr", has=page.locator("a", has_text="every-second"))
    row.locator(".last-job .state.succeeded").wait_for(timeout=15_000)
    href = row.locator(".last-job a").get_attribute("href")
    assert Job.objects.get(id=href.strip("/").rsplit("/", 1)[1]).idempotency_key.startswith("schedule:every-second:")
    shot(page, "schedules-02-live")

    # Disable it from its row: no more jobs.
    row.get_by_role("button", name="Disable").click()
    page.locator("#notice").get_by_text("Disabled every-second").wait_for()
    assert not Schedule.objects.get(name="every-second").enabled
    assert errors == []
