"""The admin's schedule pages validate as the API does and save through the services."""

from __future__ import annotations

import pytest

from jobs.models import Job, Schedule


@pytest.mark.django_db
def test_the_admin_creates_validates_and_deletes_schedules(admin_client):
    form = {
        "name": "nightly",
        "kind": "demo.noop",
        "payload": "{}",
        "cron": "0 3 * * *",
        "timezone": "Europe/Berlin",
        "enabled": "on",
        "overlap": "skip",
        "queue": "",
        "priority": "0",
    }
    refused = admin_client.post("/admin/jobs/schedule/add/", {**form, "cron": "0 3 * *", "timezone": "Nowhere"})
    assert refused.status_code == 200
    assert "cron: must be five fields" in refused.content.decode()
    assert "timezone: must be an IANA" in refused.content.decode()
    assert not Schedule.objects.exists()
    created = admin_client.post("/admin/jobs/schedule/add/", form)
    assert created.status_code == 302, created.content.decode()[-2000:]
    schedule = Schedule.objects.get()
    assert schedule.next_run_at is not None and schedule.owner.startswith("user:")
    assert admin_client.get("/admin/jobs/schedule/").status_code == 200
    changed = admin_client.post(f"/admin/jobs/schedule/{schedule.pk}/change/", {**form, "cron": "@hourly"})
    assert changed.status_code == 302, changed.content.decode()[-2000:]
    schedule.refresh_from_db()
    assert (schedule.name, schedule.cron) == ("nightly", "@hourly")
    admin_client.post("/admin/jobs/schedule/", {"action": "run_now", "_selected_action": [schedule.pk]})
    assert Job.objects.filter(kind="demo.noop").count() == 1
    admin_client.post(f"/admin/jobs/schedule/{schedule.pk}/delete/", {"post": "yes"})
    assert not Schedule.objects.exists()
