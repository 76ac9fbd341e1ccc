"""Stored XSS: jobs whose payload, result, errors, tracebacks, queue, batch
name and progress messages carry HTML and JavaScript, shown on every page and
fragment of the dashboard (and the live updates the SSE streams bring) in a
real Chromium against a real Daphne. Nothing injected may run, and the text
must be shown as text."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from django.utils import timezone

from jobs.models import Attempt, Job, State
from tests.e2e.test_browser import browser, context, shot  # noqa: F401 - fixtures
from tests.e2e.test_sse_two_daphnes import session_cookie, start_daphne

pytestmark = pytest.mark.processes

# Each bumps window.__xss if it runs; the alert() is caught as a dialog.
SCRIPT = "<script>window.__xss=(window.__xss||0)+1</script>"
IMAGE = '<img src=x onerror="window.__xss=(window.__xss||0)+1">'
ATTRIBUTE = "\"'><svg onload=alert(1)>"
XSS = SCRIPT + IMAGE + ATTRIBUTE
# A second set, for what arrives live over SSE after the page loaded.
LIVE = XSS.replace("+1", "+100")

# What the DOM must not contain once the text is escaped: elements the
# payloads would create.
INJECTED = """() => Array.from(document.querySelectorAll('img[src="x"], svg[onload], [onerror], [onload]'))
    .map(e => e.outerHTML)
    .concat(Array.from(document.scripts).filter(s => s.textContent.includes('__xss')).map(s => s.outerHTML))"""


def _seed() -> dict[str, str]:
    """Jobs in every state that shows hostile text, committed for Daphne."""
    from jobs.engine.states import Sql, transition
    from jobs.services import submit_batch, submit_job

    def run(job: Job, outcome: State, **fields) -> Job:
        running = transition(
            job.id, target=State.RUNNING, event="job.started", attempts=Sql("attempts + 1"), started_at=Sql("now()")
        )
        Attempt.objects.create(
            job=running, number=running.attempts, worker=XSS[:200], started_at=timezone.now(), output=XSS
        )
        if outcome == State.RUNNING:
            return running
        done = transition(job.id, target=outcome, finished_at=Sql("now()"), **fields)
        Attempt.objects.filter(job=job).update(
            finished_at=timezone.now(),
            outcome="failed" if outcome == State.DEAD else "succeeded",
            error_type=XSS[:200],
            error_message=XSS,
            traceback=XSS,
        )
        return done

    dead = submit_job("demo.fail", {"mode": "permanent", "message": XSS}, idempotency_key=XSS).job
    run(dead, State.DEAD, error_type=XSS[:200], error_message=XSS, error_traceback=XSS)
    batch = submit_batch(
        XSS[:200], [{"kind": "demo.fail", "payload": {"message": XSS}} for _ in range(2)], owner="tests"
    ).batch
    in_batch = Job.objects.filter(batch=batch).order_by("id")
    succeeded = run(in_batch[0], State.SUCCEEDED, result={XSS: XSS, "list": [XSS]})
    running = run(in_batch[1], State.RUNNING)
    Job.objects.filter(id=running.id).update(progress_percent=40, progress_message=XSS[:500])
    # A queue name the submission service would refuse; stored all the same,
    # as an older release or a direct write might have.
    queued = submit_job("demo.noop", {}).job
    Job.objects.filter(id=queued.id).update(queue=XSS[:100])
    return {
        "dead": str(dead.id),
        "succeeded": str(succeeded.id),
        "running": str(running.id),
        "queued": str(queued.id),
        "batch": str(batch.id),
    }


def _progress(job_id: str, message: str) -> None:
    from jobs.db import events

    job = Job.objects.get(id=job_id)
    Job.objects.filter(id=job_id).update(progress_percent=60, progress_message=message)
    events.record(job.id, "job.progress", {"percent": 60, "message": message}, queue=job.queue)


def _kill(job_id: str, message: str) -> None:
    from jobs.engine.states import Sql, transition

    transition(
        job_id,
        target=State.DEAD,
        finished_at=Sql("now()"),
        error_type=message[:200],
        error_message=message,
        error_traceback=message,
    )


def test_hostile_text_is_shown_escaped_on_every_page_fragment_and_live_update(
    processes,
    context,  # noqa: F811 - fixture
    django_user_model,
):
    ids = _seed()
    admin = django_user_model.objects.create_superuser("ada", password="pw")
    base = start_daphne(processes)
    context.add_cookies([{"name": "sessionid", "value": session_cookie(admin), "url": base}])
    dialogs: list[str] = []
    errors: list[str] = []
    page = context.new_page()
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def check(url: str, *, shows: str = XSS, headers: dict[str, str] | None = None, status: int | None = None) -> None:
        page.set_extra_http_headers(headers or {})
        response = page.goto(base + url)
        assert response is not None, url
        assert response.status == status if status else response.status < 400, (url, response.status)
        page.wait_for_load_state("load")
        page.wait_for_timeout(150)  # an onerror handler fires after the image fails
        assert page.evaluate("window.__xss") is None, url
        assert page.evaluate(INJECTED) == [], url
        assert shows in page.locator("body").inner_text(), f"{url} does not show the text"

    visited = []
    pages = [
        "/",
        "/jobs/",
        "/dead-letter/",
        "/batches/",
        f"/batches/{ids['batch']}/",
        *(f"/jobs/{ids[name]}/" for name in ("dead", "succeeded", "running", "queued")),
    ]
    for url in pages:
        check(url, shows=XSS[:100] if url == "/" else SCRIPT)
        visited.append(url)
    # Filters echo what was asked for: in the search field, as its value.
    check(f"/jobs/?q={quote(XSS)}&queue={quote(XSS)}&kind={quote(XSS)}&batch={quote(XSS)}", shows="")
    assert page.input_value("input[name=q]") == XSS
    visited.append("/jobs/?q=…")
    shot(page, "xss-job")
    # The htmx fragments of the same views.
    # The htmx fragments of the same views (a job's summary shows its
    # progress message, not its error).
    fragments = {
        "/jobs/": SCRIPT,
        "/dead-letter/": SCRIPT,
        f"/jobs/{ids['running']}/": SCRIPT,
        f"/jobs/{ids['dead']}/": "dead",
        f"/jobs/{ids['succeeded']}/": "succeeded",
    }
    for url, shows in fragments.items():
        check(url, shows=shows, headers={"HX-Request": "true"})
        visited.append(url + " (fragment)")
    page.set_extra_http_headers({})
    # A reflected one: an unknown kind is named in the message of the submit page.
    check(
        "/submit/?kind=%3Cscript%3Ewindow.__xss%3D1%3C%2Fscript%3E", shows="<script>window.__xss=1</script>", status=422
    )
    visited.append("/submit/?kind=…")

    # Live: the running job's page gets a hostile progress message, then the
    # job dies with a hostile error; both arrive over SSE.
    running = ids["running"]
    page.goto(f"{base}/jobs/{running}/")
    page.locator("#live.on").wait_for()
    _progress(running, LIVE[:500])
    page.wait_for_function(
        f"() => document.querySelector('#job-summary-{running}').innerText.includes({LIVE[:40]!r})", timeout=30_000
    )
    _kill(running, LIVE)
    page.locator(f"#job-summary-{running} .state.dead").wait_for()
    page.wait_for_function(
        f"() => document.querySelector('#job-outcome-{running}').innerText.includes({LIVE[:80]!r})", timeout=30_000
    )
    _assert_nothing_ran(page, "live job page")
    visited.append("live job page")
    shot(page, "xss-live-job")

    # Live lists: a job with a hostile queue name dies while the jobs list
    # watches; another with a hostile error while the dead-letter page does.
    victim = _seed_queued(queue=LIVE[:100])
    page.goto(f"{base}/jobs/")
    page.locator("#live.on").wait_for()
    _start_and_kill(victim, "plain")
    page.locator(f"#job-{victim} .state.dead").wait_for()
    assert LIVE[:60] in page.locator(f"#job-{victim}").inner_text()
    _assert_nothing_ran(page, "live jobs list")
    visited.append("live jobs list")

    victim = _seed_queued()
    page.goto(f"{base}/dead-letter/")
    page.locator("#live.on").wait_for()
    _start_and_kill(victim, LIVE)
    page.locator(f"#dead-job-{victim}").wait_for()
    assert LIVE[:60] in page.locator("#dead-letter").inner_text()
    _assert_nothing_ran(page, "live dead-letter page")
    visited.append("live dead-letter page")

    assert dialogs == []
    assert errors == []
    print(f"XSS: {len(visited)} pages, fragments and live updates checked: {visited}")


def _assert_nothing_ran(page, where: str) -> None:
    page.wait_for_timeout(300)  # an onerror handler fires after the image fails
    assert page.evaluate("window.__xss") is None, where
    assert page.evaluate(INJECTED) == [], where


def _seed_queued(*, queue: str | None = None) -> str:
    from jobs.services import submit_job

    job = submit_job("demo.fail", {"message": "x"}).job
    if queue is not None:
        Job.objects.filter(id=job.id).update(queue=queue)
    return str(job.id)


def _start_and_kill(job_id: str, message: str) -> None:
    from jobs.engine.states import Sql, transition

    transition(job_id, target=State.RUNNING, event="job.started", attempts=Sql("attempts + 1"), started_at=Sql("now()"))
    _kill(job_id, message)
