"""The overview's long-open-transaction warning in a real browser: a real
Daphne (threshold lowered to 2 s), a transaction held open on its own
connection; the warning comes and goes live, without a reload."""

from __future__ import annotations

import pytest

from tests.conftest import held_transaction
from tests.e2e.test_browser import browser, context, operator, shot  # noqa: F401 - fixtures
from tests.e2e.test_queue_controls_browser import sign_in
from tests.e2e.test_sse_two_daphnes import start_daphne

pytestmark = pytest.mark.processes


def test_the_overview_warns_live_of_a_long_open_transaction(processes, context, operator, make_job):  # noqa: F811
    base = start_daphne(processes, CONVEYOR_HORIZON_WARNING_SECONDS="2")
    make_job()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, base)
    page.locator("#live.on").wait_for()
    warning = page.locator("#horizon .warning")
    assert warning.count() == 0

    with held_transaction("nightly-report") as pid:
        warning.wait_for()
        text = warning.inner_text()
        assert "A transaction has been open for" in text and f"pid {pid}" in text
        assert "nightly-report" in text and "idle in transaction" in text
        assert "txid_current" in text  # staff see the query
        assert f"pg_terminate_backend({pid})" in text
        shot(page, "horizon-warning")
    warning.wait_for(state="detached")
    shot(page, "horizon-cleared")
    assert not errors
