"""The webhook pages in a real browser, against a real Daphne, real workers
and a real receiver on loopback that verifies every message. Screenshots go
to test-artifacts/screenshots/."""

from __future__ import annotations

import pytest

from jobs import services
from jobs.models import WebhookDelivery
from tests.conftest import wait_until
from tests.e2e.test_browser import browser, context, operator, shot  # noqa: F401 - fixtures
from tests.e2e.test_sse_two_daphnes import start_daphne
from tests.jobs.webhooks.conftest import Receiver

pytestmark = pytest.mark.processes

LOOPBACK = {"CONVEYOR_WEBHOOK_ALLOW_PRIVATE": "1"}
FAST_SCHEDULE = {**LOOPBACK, "CONVEYOR_WEBHOOK_BACKOFF_SCALE": "0.0001"}


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_an_operator_registers_an_endpoint_and_redelivers_from_the_job_page(
    processes,
    context,  # noqa: F811
    operator,  # noqa: F811
    receiver,
    settings,
):
    base = start_daphne(processes, **LOOPBACK)
    processes.qcluster(queue="default")
    processes.qcluster(queue="webhooks", **FAST_SCHEDULE)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    page.goto(f"{base}/accounts/login/?next=/webhooks/")
    page.fill("input[name=username]", "olga")
    page.fill("input[name=password]", "conveyor-pw")
    page.click("button[type=submit]")
    page.wait_for_url(f"{base}/webhooks/")

    # Register an endpoint: its secret is shown once, on the page that follows.
    page.fill("input[name=url]", receiver.url("/hook"))
    page.check("input[value='job.succeeded']")
    page.check("input[value='job.dead']")
    page.fill("input[name=description]", "order service")
    page.click("button:has-text('Create endpoint')")
    page.locator(".secret-value").wait_for()
    secret = page.locator(".secret-value").inner_text().strip()
    assert secret.startswith("whsec_")
    shot(page, "webhooks-01-endpoint-created")
    receiver.expect("/hook", secret)
    receiver.answer("/hook", 500, 200)  # the first attempt fails, the retry succeeds

    # A job finishes: its message reaches the endpoint after one retry.
    page.goto(f"{base}/submit/?kind=demo.noop")
    page.click("button:has-text('Submit job')")
    page.wait_for_url(lambda url: "/jobs/" in url)
    job_id = page.url.rstrip("/").rsplit("/", 1)[1]
    wait_until(lambda: len(receiver.received("/hook")) == 2, timeout=60, message="the message and its retry")
    (delivery,) = WebhookDelivery.objects.filter(job_id=job_id)
    page.reload()
    row = page.locator(f"#delivery-{delivery.id}")
    row.locator(".state.delivered").wait_for(timeout=30_000)
    assert delivery.message_id in row.inner_text() and "500" in row.inner_text() and "200" in row.inner_text()
    shot(page, "webhooks-02-job-deliveries")

    # Redeliver: the row turns pending in place, then delivered, with the same webhook-id.
    row.get_by_role("button", name="Redeliver").click()
    page.locator("#notice").get_by_text("Redelivering").wait_for()
    wait_until(lambda: len(receiver.received("/hook")) == 3, timeout=60, message="the redelivery")
    row.locator(".state.delivered").wait_for(timeout=30_000)
    messages = receiver.received("/hook")
    assert [m.message_id for m in messages] == [delivery.message_id] * 3
    assert all(m.verified == {secret: True} for m in messages)
    assert row.locator("ol.webhook-attempts li").count() == 3
    shot(page, "webhooks-03-job-redelivered")

    # The list shows the endpoint with its recent deliveries, and never the secret.
    page.goto(f"{base}/webhooks/")
    assert secret not in page.content()
    assert "order service" in page.locator("#endpoints").inner_text()
    shot(page, "webhooks-04-endpoints")
    page.click(f"a:has-text('{receiver.url('/hook')}')")
    page.locator("#webhook-deliveries").wait_for()
    shot(page, "webhooks-05-endpoint")
    page.get_by_role("button", name="Disable").click()
    page.locator(".endpoint .state.failed").wait_for()
    assert "disabled by olga" in page.locator(".endpoint").inner_text()
    shot(page, "webhooks-06-endpoint-disabled")

    # A batch's callback gets batch.completed; its page lists the delivery.
    settings.CONVEYOR_WEBHOOKS = {**settings.CONVEYOR_WEBHOOKS, "ALLOW_PRIVATE": True}  # this process submits
    batch = services.submit_batch(
        "nightly", [{"kind": "demo.noop", "payload": {}}], callback_url=receiver.url("/batch")
    ).batch
    wait_until(lambda: len(receiver.received("/batch")) == 1, timeout=60, message="batch.completed")
    (delivery,) = WebhookDelivery.objects.filter(batch=batch)
    page.goto(f"{base}/batches/{batch.id}/")
    page.locator(f"#delivery-{delivery.id} .state.delivered").wait_for(timeout=30_000)
    assert "batch.completed" in page.locator("#webhook-deliveries").inner_text()
    shot(page, "webhooks-07-batch-deliveries")
    assert not errors, errors
