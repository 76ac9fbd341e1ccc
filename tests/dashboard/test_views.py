"""The dashboard's pages and actions through Django's test client."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from dashboard import queries
from jobs.models import Batch, Job, JobEvent, State


def run_job(job, *, outcome: str = "dead", error_type: str = "Boom", message: str = "it broke", **fields) -> Job:
    """Move a submitted job through running to `outcome`, as the runner would."""
    from jobs.engine.states import Sql, transition
    from jobs.models import Attempt

    running = transition(
        job.id, target=State.RUNNING, event="job.started", attempts=Sql("attempts + 1"), started_at=Sql("now()")
    )
    Attempt.objects.create(job=running, number=running.attempts, worker="test:1", started_at=timezone.now())
    if outcome == "dead":
        fields |= {"error_type": error_type, "error_message": message, "error_traceback": "Traceback …"}
    done = transition(job.id, target=State(outcome), finished_at=Sql("now()"), **fields)
    Attempt.objects.filter(job=job).update(
        finished_at=timezone.now(), outcome="failed" if outcome == "dead" else outcome
    )
    return done


def htmx(**headers):
    return {"HTTP_HX_REQUEST": "true", **headers}


# --- access ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/", "/jobs/", "/dead-letter/", "/submit/", "/batches/"])
def test_anonymous_visitors_are_sent_to_sign_in(client, db, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


def test_the_sign_in_page_reads_well(client, db):
    response = client.get("/accounts/login/")
    assert response.status_code == 200
    assert b"<title>Sign in \xc2\xb7 Conveyor</title>" in response.content


def test_readers_may_not_act(reader_client, make_job):
    job = make_job()
    assert reader_client.post(f"/jobs/{job.id}/cancel").status_code == 403
    assert reader_client.post("/dead-letter/retry", {"job": str(job.id)}).status_code == 403
    assert Job.objects.get(id=job.id).state == State.QUEUED


def test_actions_refuse_get(operator_client, make_job):
    job = make_job()
    assert operator_client.get(f"/jobs/{job.id}/cancel").status_code == 405


# --- overview -------------------------------------------------------------------


def test_the_overview_shows_queue_cards_a_chart_workers_and_the_dead_count(operator_client, make_job):
    from dashboard.live.publisher import publish_queue_stats

    make_job()
    run_job(make_job())
    publish_queue_stats()
    response = operator_client.get("/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "<title>(1 dead) Overview · Conveyor</title>" in html
    assert 'id="queue-default"' in html and 'sse-swap="queue-cards"' in html
    assert "<svg" in html and "Queue depth" in html and "Throughput" in html
    assert "No worker is online" in html
    assert re.search(r'sse-connect="/events/overview\?after=\d+"', html)


# --- jobs -----------------------------------------------------------------------


def test_the_jobs_list_filters_searches_and_streams_its_rows(operator_client, make_job):
    sleeper = make_job("demo.sleep", {"seconds": 1}, idempotency_key="nightly-42")
    noop = make_job()
    html = operator_client.get("/jobs/?kind=demo.sleep").content.decode()
    assert f'id="job-{sleeper.id}"' in html and f'id="job-{noop.id}"' not in html
    assert f"ids={sleeper.id}" in html and "kind=demo.sleep" in html

    for term in (str(sleeper.id), str(sleeper.id)[:8], "nightly-42"):
        html = operator_client.get("/jobs/", {"q": term}).content.decode()
        assert f'id="job-{sleeper.id}"' in html and f'id="job-{noop.id}"' not in html, term


def _link(html: str, label: str) -> str:
    """The query of the pagination link `label` ("older" or "newer")."""
    nav = html.split('<nav class="pagination">')[1].split("</nav>")[0]
    href = nav.split(f">{'← newer' if label == 'newer' else 'older →'}</a>")[0].rsplit('href="', 1)[1].split('"')[0]
    return href.replace("&amp;", "&")


def _rows(html: str) -> list[str]:
    return [part.split('"')[0] for part in html.split('<tr id="job-')[1:]]


def test_the_jobs_list_pages_by_position_both_ways(operator_client, make_job):
    jobs = [make_job() for _ in range(51)]
    Job.objects.update(created_at=Job.objects.get(id=jobs[0].id).created_at)  # all tied: the id breaks the tie

    first = operator_client.get("/jobs/").content.decode()
    assert len(_rows(first)) == 50 and "50 of 51" in first and "older →</a>" in first
    assert '<span class="muted">← newer</span>' in first
    second = operator_client.get("/jobs/" + _link(first, "older")).content.decode()
    assert len(_rows(second)) == 1 and set(_rows(second)).isdisjoint(_rows(first))
    assert {*_rows(first), *_rows(second)} == {str(job.id) for job in jobs}
    back = operator_client.get("/jobs/" + _link(second, "newer")).content.decode()
    assert _rows(back) == _rows(first)


def test_the_jobs_list_counts_up_to_a_cap(operator_client, make_job, monkeypatch):
    monkeypatch.setattr(queries, "COUNT_CAP", 3)
    for _ in range(5):
        make_job()

    html = operator_client.get("/jobs/").content.decode()

    assert "more than 3 in all" in html


def test_a_page_position_the_list_did_not_give_is_an_error_not_a_500(operator_client, make_job):
    job = make_job()

    response = operator_client.get("/jobs/", {"before": "yesterday~nonsense"})

    assert response.status_code == 200
    html = response.content.decode()
    assert "that page position is not one this list gave" in html and f'id="job-{job.id}"' in html


def test_htmx_asks_for_the_table_alone(operator_client, make_job):
    make_job()
    html = operator_client.get("/jobs/", **htmx()).content.decode()
    assert html.startswith('<section id="job-table">') and "<html" not in html


def test_an_unknown_state_filter_is_reported_not_fatal(operator_client, db):
    response = operator_client.get("/jobs/?state=bogus&batch=nope")
    assert response.status_code == 200
    assert b"unknown state" in response.content and b"is not a batch id" in response.content


# --- job detail -----------------------------------------------------------------


def test_the_job_page_shows_payload_progress_timeline_and_the_right_buttons(operator_client, make_job):
    job = make_job("demo.sleep", {"seconds": 2, "steps": 4})
    html = operator_client.get(f"/jobs/{job.id}/").content.decode()
    assert "&quot;seconds&quot;: 2" in html or '"seconds": 2' in html
    assert f'id="job-summary-{job.id}"' in html and f'sse-swap="job-timeline-{job.id}"' in html
    assert ">created<" in html
    assert "Cancel</button>" in html and "Retry</button>" not in html
    # A queued job says why it waits.
    assert "Why it waits:" in html and "No worker is online" in html
    last = JobEvent.objects.filter(job=job).order_by("-id").first()
    assert f'sse-connect="/events/jobs/{job.id}?after={last.id}"' in html


def test_a_dead_job_shows_its_error_and_a_retry_button(operator_client, make_job):
    job = run_job(make_job("demo.fail", {"mode": "permanent"}))
    html = operator_client.get(f"/jobs/{job.id}/").content.decode()
    assert "Boom" in html and "it broke" in html and "Traceback" in html
    assert "Retry</button>" in html and "Cancel</button>" not in html


def test_a_reader_sees_the_job_without_buttons(reader_client, make_job):
    job = make_job()
    html = reader_client.get(f"/jobs/{job.id}/").content.decode()
    assert "Cancel</button>" not in html and "read-only" in html


def test_a_scheduled_job_says_when_it_runs(operator_client, make_job):
    job = make_job(run_after=timezone.now() + timedelta(hours=1))
    html = operator_client.get(f"/jobs/{job.id}/").content.decode()
    assert "Scheduled to run" in html and ("in 59 min" in html or "in 1 h" in html)


def test_an_unknown_job_is_404(operator_client, db):
    assert operator_client.get("/jobs/00000000-0000-0000-0000-000000000000/").status_code == 404


def test_cancel_with_htmx_answers_with_a_notice_the_stream_brings_the_rest(operator_client, make_job):
    job = make_job()
    response = operator_client.post(f"/jobs/{job.id}/cancel", **htmx())
    html = response.content.decode()
    assert response.status_code == 200
    assert html.startswith('<div id="notice"') and 'hx-swap-oob="true"' in html and "Cancelled: job" in html
    assert Job.objects.get(id=job.id).state == State.CANCELLED
    assert JobEvent.objects.filter(job=job, type="job.cancelled").get().data["actor"] == "olga"


def test_retry_without_javascript_redirects_back_with_a_message(operator_client, make_job):
    job = run_job(make_job())
    response = operator_client.post(f"/jobs/{job.id}/retry", follow=True)
    assert response.redirect_chain == [(f"/jobs/{job.id}/", 302)]
    assert b"Queued again" in response.content
    assert Job.objects.get(id=job.id).state == State.QUEUED


def test_retrying_a_job_that_is_not_dead_says_why(operator_client, make_job):
    job = make_job()
    html = operator_client.post(f"/jobs/{job.id}/retry", **htmx()).content.decode()
    assert "only dead or cancelled jobs can be retried" in html


# --- dead-letter queue ------------------------------------------------------------


def test_the_dead_letter_queue_groups_by_kind_and_error_type(operator_client, make_job):
    for _ in range(3):
        run_job(make_job("demo.fail"), error_type="Timeout")
    run_job(make_job("demo.fail"), error_type="ValueError")
    run_job(make_job("demo.noop"), error_type="Timeout")
    html = operator_client.get("/dead-letter/").content.decode()
    assert "<title>(5 dead) Dead letter · Conveyor</title>" in html
    groups = re.findall(
        r'<span class="mono">([\w.]+)</span> <span class="muted">·</span> <span class="mono err">(\w+)</span></h2>\s*<span class="pill dead">(\d+)</span>',
        html,
    )
    assert sorted(groups) == [
        ("demo.fail", "Timeout", "3"),
        ("demo.fail", "ValueError", "1"),
        ("demo.noop", "Timeout", "1"),
    ]


def test_retry_one_a_selection_or_a_whole_group(operator_client, make_job):
    timeouts = [run_job(make_job("demo.fail"), error_type="Timeout") for _ in range(3)]
    other = run_job(make_job("demo.fail"), error_type="ValueError")

    html = operator_client.post("/dead-letter/retry", {"job": str(other.id)}, **htmx()).content.decode()
    assert html.startswith('<div id="notice"') and "Retried 1 job." in html
    assert Job.objects.get(id=other.id).state == State.QUEUED

    operator_client.post("/dead-letter/discard", {"ids": [str(timeouts[0].id)]}, **htmx())
    assert Job.objects.get(id=timeouts[0].id).state == State.DISCARDED

    html = operator_client.post("/dead-letter/retry", {"group": "demo.fail|Timeout"}, **htmx()).content.decode()
    assert "Retried 2 jobs." in html
    assert {Job.objects.get(id=j.id).state for j in timeouts[1:]} == {State.QUEUED}


def test_an_empty_selection_is_nothing_to_do(operator_client, db):
    response = operator_client.post("/dead-letter/retry", {}, follow=True)
    assert b"Nothing to do" in response.content


# --- submit ----------------------------------------------------------------------


def test_the_submit_form_is_generated_from_the_payload_schema(operator_client, db):
    html = operator_client.get("/submit/?kind=demo.sleep").content.decode()
    assert 'name="payload-seconds"' in html and 'step="any"' in html and 'max="3600"' in html
    assert 'name="payload-steps"' in html and 'value="10"' in html
    assert "How long to sleep in total." in html
    html = operator_client.get("/submit/?kind=demo.fail").content.decode()
    assert '<select name="payload-mode"' in html and '<option value="permanent">' in html


def test_every_kind_a_client_may_submit_gets_a_form(operator_client, db):
    from jobs.services import all_handlers

    for handler in all_handlers():
        if handler.internal:
            continue
        response = operator_client.get("/submit/", {"kind": handler.kind})
        assert response.status_code == 200 and b"Submit job" in response.content, handler.kind


def test_internal_kinds_are_not_listed_and_cannot_be_submitted(operator_client, db):
    page = operator_client.get("/submit/").content.decode()
    assert "?kind=demo.sleep" in page and "webhook.deliver" not in page

    shown = operator_client.get("/submit/", {"kind": "webhook.deliver"})
    assert shown.status_code == 422 and b"Submit job" not in shown.content
    assert "&#x27;webhook.deliver&#x27; is internal: only the engine submits it" in shown.content.decode()

    posted = operator_client.post(
        "/submit/?kind=webhook.deliver",
        {"kind": "webhook.deliver", "payload-delivery": "8f0c6a3e-2d6a-4b8e-9d59-0e7f1b1c2a3d"},
    )
    assert posted.status_code == 422 and "is internal: only the engine submits it" in posted.content.decode()
    assert Job.objects.count() == 0


def test_json_fields_take_json(operator_client, db):
    from dashboard.forms import payload_form

    schema = {
        "properties": {"tags": {"type": "array", "items": {"type": "string"}, "default": []}},
        "required": [],
    }
    form = payload_form(schema, data={"payload-tags": '["a", "b"]'})
    assert form.is_valid() and form.payload() == {"tags": ["a", "b"]}
    assert "[]" in str(payload_form(schema)["tags"]) and '"[]"' not in str(payload_form(schema)["tags"])


def test_submitting_goes_to_the_live_job_page(operator_client, operator, db):
    response = operator_client.post(
        "/submit/?kind=demo.sleep",
        {"kind": "demo.sleep", "payload-seconds": "1.5", "payload-steps": "", "options-idempotency_key": "k-1"},
    )
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/jobs/{job.id}/"
    assert job.payload == {"seconds": 1.5, "steps": 10}
    assert (job.owner, job.idempotency_key) == (f"user:{operator.pk}", "k-1")

    again = operator_client.post(
        "/submit/?kind=demo.sleep",
        {"kind": "demo.sleep", "payload-seconds": "1.5", "options-idempotency_key": "k-1"},
        follow=True,
    )
    assert Job.objects.count() == 1 and b"already exists" in again.content


def test_errors_show_next_to_their_fields(operator_client, db):
    response = operator_client.post(
        "/submit/?kind=demo.sleep",
        {"kind": "demo.sleep", "payload-seconds": "9999", "options-queue": "no spaces allowed"},
    )
    html = response.content.decode()
    assert response.status_code == 422
    assert re.search(
        r'name="payload-seconds".*?field-error">Ensure this value is less than or equal to 3600', html, re.S
    )
    assert Job.objects.count() == 0


def test_the_engine_errors_land_on_their_fields_too(operator_client, db):
    html = operator_client.post(
        "/submit/?kind=demo.sleep", {"kind": "demo.sleep", "payload-seconds": "1", "options-queue": "bad queue!"}
    ).content.decode()
    assert re.search(r'name="options-queue".*?field-error">must be 1-100 letters', html, re.S)


# --- batches ---------------------------------------------------------------------


def test_batches_show_their_aggregate_progress(operator_client, make_job):
    batch = Batch.objects.create(name="nightly", total=4)
    jobs = [make_job(batch=batch) for _ in range(4)]
    run_job(jobs[0], outcome="succeeded", result={})
    run_job(jobs[1])
    Job.objects.filter(id=jobs[2].id).update(progress_percent=50)
    html = operator_client.get("/batches/").content.decode()
    assert f'id="batch-{batch.id}"' in html and "2/4" in html
    assert f"ids={batch.id}" in html
    html = operator_client.get(f"/batches/{batch.id}/").content.decode()
    # 2 finished × 100 + 50 of a running one over 4 jobs
    assert 'aria-valuenow="62"' in html and "2 of 4 jobs finished" in html
    assert html.count('<tr id="job-') == 4


# --- publisher, charts -------------------------------------------------------------


def test_queue_statistics_are_published_at_most_once_a_second(transactional_db):
    from dashboard.live.publisher import publish_queue_stats

    first = publish_queue_stats()
    assert first is not None
    assert publish_queue_stats() is None  # less than a second ago
    event = JobEvent.objects.get(id=first)
    assert event.job_id is None and event.type == "queue.stats"
    assert event.data["queues"][0]["queue"] == "default" and event.data["dead"] == 0
    # Older than the interval but unchanged: still nothing until the heartbeat.
    JobEvent.objects.filter(id=first).update(created_at=timezone.now() - timedelta(seconds=5))
    assert publish_queue_stats() is None
    assert publish_queue_stats(heartbeat=1) is not None


def test_only_one_process_publishes_at_a_time(transactional_db):
    import psycopg
    from django.db import connection

    from dashboard.live.hub import _conninfo
    from dashboard.live.publisher import LOCK_KEY, publish_queue_stats

    connection.ensure_connection()
    with psycopg.connect(_conninfo(), autocommit=False) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
        assert publish_queue_stats() is None
    assert publish_queue_stats() is not None


def test_a_backlog_that_keeps_getting_older_is_flagged():
    from dashboard.charts import backlog_warnings

    start = timezone.now()

    def sample(second, age, queue="llm"):
        return (start + timedelta(seconds=second), {"queues": [{"queue": queue, "oldest_queued_age_seconds": age}]})

    growing = [sample(s, 100 + s) for s in range(0, 91, 10)]
    steady = [sample(s, 100 + (s % 20)) for s in range(0, 91, 10)]
    young = [sample(s, 5 + s / 10) for s in range(0, 91, 10)]
    assert backlog_warnings(growing) == {"llm": 190}
    assert backlog_warnings(steady) == {}
    assert backlog_warnings(young) == {}
    assert backlog_warnings(growing[-2:]) == {}  # not enough history to say


def test_the_chart_draws_steps_over_the_last_fifteen_minutes():
    from dashboard.charts import HEIGHT, overview_charts

    now = timezone.now()
    samples = [
        (now - timedelta(minutes=20), {"queues": [{"queued": 4}]}),
        (now - timedelta(minutes=5), {"queues": [{"queued": 8, "running": 2}]}),
    ]
    depth, throughput = overview_charts(samples, now=now)
    waiting = depth.series[0]
    assert (waiting.name, waiting.last, depth.y_max) == ("to run", 8.0, 10.0)
    points = waiting.points.split()
    assert len(points) == 4  # left edge (held from before), step, new value, held until now
    assert float(points[-1].split(",")[0]) == pytest.approx(554.0)
    assert throughput.series[0].last == 0.0 and throughput.y_max == 1.0
    assert all(0 <= float(p.split(",")[1]) <= HEIGHT for p in points)


# --- admin -------------------------------------------------------------------------


def test_the_admin_lists_searches_and_acts_through_the_services(client, make_job):
    from django.contrib.auth.models import User

    admin = User.objects.create_superuser("ada", password="pw")
    client.force_login(admin)
    dead = run_job(make_job("demo.fail"))
    queued = make_job(idempotency_key="admin-key")

    html = client.get("/admin/jobs/job/").content.decode()
    assert str(dead.id)[:8] in html and "demo.fail" in html
    html = client.get("/admin/jobs/job/", {"q": str(queued.id)[:8]}).content.decode()
    assert str(queued.id)[:8] in html and str(dead.id)[:8] not in html
    html = client.get("/admin/jobs/job/", {"q": "admin-key"}).content.decode()
    assert str(queued.id)[:8] in html

    assert client.get(f"/admin/jobs/job/{dead.id}/change/").status_code == 200
    client.post("/admin/jobs/job/", {"action": "retry_jobs", "_selected_action": [str(dead.id), str(queued.id)]})
    client.post("/admin/jobs/job/", {"action": "cancel_jobs", "_selected_action": [str(queued.id)]})
    assert Job.objects.get(id=dead.id).state == State.QUEUED
    assert Job.objects.get(id=queued.id).state == State.CANCELLED
    assert JobEvent.objects.filter(job=dead, type="job.queued", data__actor="ada").exists()
    assert client.get("/admin/jobs/batch/").status_code == 200


def test_api_keys_are_listed_and_revoked_in_the_admin(client, db):
    from django.contrib.auth.models import User

    from jobs.models import ApiKey
    from jobs.services import create_api_key

    client.force_login(User.objects.create_superuser("ada", password="pw"))
    created = create_api_key("ci", scopes=["read"])
    html = client.get("/admin/jobs/apikey/").content.decode()
    assert f"cvk_{created.api_key.prefix}…" in html and created.key not in html
    client.post("/admin/jobs/apikey/", {"action": "revoke_keys", "_selected_action": [created.api_key.pk]})
    assert ApiKey.objects.get(pk=created.api_key.pk).revoked_at is not None


def test_a_job_of_a_paused_or_full_queue_says_so(reader_client, make_job, heartbeat):
    from jobs import services
    from jobs.worker import claims

    job = make_job("demo.noop", queue="held")
    services.pause_queue("held")
    html = reader_client.get(f"/jobs/{job.id}/").content.decode()
    assert "Queue “held” is paused by an operator" in html
    services.resume_queue("held")
    services.set_max_running("held", 1)
    claims.claim(str(make_job("demo.noop", queue="held").id), "w:1")
    html = reader_client.get(f"/jobs/{job.id}/").content.decode()
    assert "runs at most 1 jobs at once" in html


def test_the_queue_cards_offer_controls_to_operators_only(client, operator, reader):
    from jobs import services

    services.pause_queue("default")
    client.force_login(operator)
    html = client.get("/").content.decode()
    assert "Resume</button>" in html and 'name="max_running"' in html and "paused</span>" in html
    client.force_login(reader)
    html = client.get("/").content.decode()
    assert "paused</span>" in html and "Resume</button>" not in html


def test_retry_all_matching_takes_the_dead_jobs_of_a_kind_since_a_time(operator_client, make_job):
    """Every dead job of a kind since a time, from the jobs list's filters: the count
    on the button, then exactly those jobs queued again."""
    old, recent, other_kind = (
        run_job(make_job("demo.noop")),
        run_job(make_job("demo.noop")),
        run_job(make_job("demo.sleep", {"seconds": 1})),
    )
    Job.objects.filter(id=old.id).update(updated_at=timezone.now() - timedelta(days=2))
    since = (timezone.now() - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M")

    page = operator_client.get("/jobs/", {"state": "dead", "kind": "demo.noop", "since": since})
    assert [row.id for row in page.context["jobs"]] == [recent.id]
    assert "Retry all matching (1)" in page.content.decode()

    answer = operator_client.post(
        "/jobs/retry", {"all": "1", "state": "dead", "kind": "demo.noop", "since": since}, **htmx()
    )
    assert answer.status_code == 200 and "Queued again: 1 job." in answer.content.decode()
    states = dict(Job.objects.values_list("id", "state"))
    assert (states[old.id], states[recent.id], states[other_kind.id]) == ("dead", "queued", "dead")


def test_a_since_that_is_not_a_time_is_reported_not_fatal(operator_client, db):
    page = operator_client.get("/jobs/", {"since": "yesterday"})
    assert page.status_code == 200
    assert "&#x27;yesterday&#x27; is not a time (YYYY-MM-DDTHH:MM, UTC)" in page.content.decode()
