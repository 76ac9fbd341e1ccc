"""The dashboard's Schedules page: list, create and edit forms with field
errors, the preview of the next runs, and the actions."""

from __future__ import annotations

import re

import pytest

from jobs.engine import scheduling
from jobs.models import Job, Schedule

FORM = {
    "name": "nightly",
    "kind": "demo.sleep",
    "payload": '{"seconds": 1}',
    "cron": "0 3 * * *",
    "interval_seconds": "",
    "timezone": "Europe/Berlin",
    "overlap": "skip",
    "queue": "",
    "priority": "0",
    "max_attempts": "",
    "enabled": "on",
}


def test_the_page_lists_schedules_with_their_last_job_and_links_it(operator_client):
    scheduling.create_schedule(name="nightly", kind="demo.noop", cron="@daily")
    job = scheduling.run_now("nightly")
    page = operator_client.get("/schedules/").content.decode()
    assert 'aria-current="page">Schedules</a>' in page
    assert "nightly" in page and "@daily" in page
    assert f'href="/jobs/{job.id}/"' in page
    assert '<span class="state queued">queued</span>' in page
    rows = operator_client.get("/schedules/rows").content.decode()
    assert f'href="/jobs/{job.id}/"' in rows


def test_an_operator_creates_a_schedule_owned_by_them(operator_client, operator):
    response = operator_client.post("/schedules/", FORM)
    assert response.status_code == 302
    schedule = Schedule.objects.get()
    assert (schedule.owner, schedule.timezone, schedule.payload["seconds"]) == (
        f"user:{operator.pk}",
        "Europe/Berlin",
        1,
    )
    assert schedule.next_run_at is not None


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"cron": "0 99 * * *"}, "cron", "is not a valid cron expression"),
        ({"timezone": "Moon/Base"}, "timezone", "IANA time zone"),
        ({"payload": '{"seconds": "x"}'}, "payload", "payload.seconds"),
        ({"payload": "{nope"}, "payload", "is not valid JSON"),
        ({"kind": "no.such"}, "kind", "Select a valid choice"),
        ({"cron": "", "interval_seconds": ""}, "cron", "give cron or interval_seconds"),
    ],
)
def test_invalid_input_is_shown_next_to_its_field(operator_client, changes, field, message):
    response = operator_client.post("/schedules/", {**FORM, **changes})
    assert response.status_code == 422
    page = response.content.decode()
    block = re.search(rf'<input[^>]*name="{field}"|<textarea[^>]*name="{field}"|<select[^>]*name="{field}"', page)
    assert block, page
    after = page[block.start() :]
    error = re.search(r'<p class="field-error">([^<]*)</p>', after)
    assert error and message in error.group(1).replace("&#x27;", "'"), after[:800]
    assert not Schedule.objects.exists()


def test_the_preview_shows_the_next_five_runs_in_the_zone(operator_client):
    page = operator_client.get("/schedules/preview", {"cron": "0 9 * * *", "timezone": "Europe/Berlin"}).content
    page = page.decode()
    assert page.count("<li>") == 5
    assert page.count(" 09:00:00 CE") == 5  # CET or CEST: 09:00 local, whatever the season
    error = operator_client.get("/schedules/preview", {"cron": "0 9 * *"}).content.decode()
    assert "field-error" in error and "five fields" in error
    interval = operator_client.get("/schedules/preview", {"interval_seconds": "90"}).content.decode()
    assert interval.count("<li>") == 5
    zone = operator_client.get("/schedules/preview", {"cron": "@hourly", "timezone": "Nowhere"}).content.decode()
    assert "IANA" in zone


def test_edit_enable_disable_run_now_and_delete(operator_client):
    scheduling.create_schedule(name="nightly", kind="demo.noop", cron="@daily")
    edit = operator_client.get("/schedules/nightly/")
    assert edit.status_code == 200 and "@daily" in edit.content.decode()
    saved = operator_client.post(
        "/schedules/nightly/", {**FORM, "kind": "demo.noop", "payload": "{}", "cron": "@hourly"}
    )
    assert saved.status_code == 302
    assert Schedule.objects.get().cron == "@hourly"
    invalid = operator_client.post("/schedules/nightly/", {**FORM, "cron": "bad"})
    assert invalid.status_code == 422
    assert operator_client.post("/schedules/nightly/disable").status_code == 302
    assert Schedule.objects.get().enabled is False
    assert operator_client.post("/schedules/nightly/enable").status_code == 302
    assert Schedule.objects.get().enabled is True
    assert operator_client.post("/schedules/nightly/run").status_code == 302
    assert Job.objects.get().kind == "demo.noop"
    assert operator_client.post("/schedules/nightly/delete").status_code == 302
    assert not Schedule.objects.exists()
    assert operator_client.get("/schedules/nightly/").status_code == 404


def test_a_reader_sees_the_schedules_but_not_the_form(reader_client):
    scheduling.create_schedule(name="nightly", kind="demo.noop", cron="@daily")
    page = reader_client.get("/schedules/").content.decode()
    assert "nightly" in page and "Create schedule" not in page and "Run now" not in page
    assert reader_client.post("/schedules/nightly/run").status_code == 403
    assert not Job.objects.exists()
