"""GET /healthz and GET /readyz."""

from __future__ import annotations

import pytest
from django.db import connection

pytestmark = pytest.mark.django_db


def test_healthz_answers_ok_when_the_database_answers(client):
    response = client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_readyz_is_ready_with_migrations_applied_and_a_fresh_cluster_per_queue(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default", "llm"]
    heartbeat("default", workers=2)
    heartbeat("default", workers=1, age_seconds=12)
    heartbeat("llm", workers=4, age_seconds=25)
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok"
    assert body["migrations"] == {"status": "ok"}
    assert body["queues"]["default"]["status"] == "ok"
    assert (body["queues"]["default"]["clusters"], body["queues"]["default"]["workers"]) == (2, 3)
    assert body["queues"]["default"]["last_heartbeat_seconds_ago"] < 5
    assert body["queues"]["llm"]["clusters"] == 1


def test_readyz_fails_for_a_queue_without_a_cluster(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default", "llm"]
    heartbeat("default")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "error"
    assert body["queues"]["default"]["status"] == "ok"
    assert body["queues"]["llm"]["status"] == "error"
    assert "no worker cluster" in body["queues"]["llm"]["reason"]
    assert "Q_CLUSTER_NAME=llm" in body["queues"]["llm"]["reason"]


def test_readyz_fails_when_the_only_heartbeat_is_older_than_30_seconds(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default"]
    heartbeat("default", age_seconds=31)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["queues"]["default"]["status"] == "error"


def test_readyz_does_not_count_a_stopping_cluster(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default"]
    heartbeat("default", status="Stopping")
    assert client.get("/readyz").status_code == 503


def test_readyz_does_not_count_a_heartbeat_that_names_no_queue(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default"]
    heartbeat(None)
    assert client.get("/readyz").status_code == 503


def test_readyz_checks_only_the_configured_queues(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default"]
    heartbeat("default")
    response = client.get("/readyz")
    assert response.status_code == 200
    assert list(response.json()["queues"]) == ["default"]


def test_readyz_fails_while_a_migration_is_unapplied(client, heartbeat, settings):
    settings.CONVEYOR_QUEUES = ["default"]
    heartbeat("default")
    with connection.cursor() as cursor:  # rolled back with the test
        # The newest one: an older one missing under an applied newer one reads as applied.
        cursor.execute("SELECT max(name) FROM django_migrations WHERE app = 'jobs'")
        latest = cursor.fetchone()[0]
        cursor.execute("DELETE FROM django_migrations WHERE app = 'jobs' AND name = %s", [latest])
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["migrations"]["status"] == "error"
    assert f"jobs.{latest}" in body["migrations"]["unapplied"]
    assert "migrate" in body["migrations"]["reason"]
    assert body["queues"]["default"]["status"] == "ok"


def test_a_real_cluster_heartbeat_names_its_queue():
    """The Stat a cluster saves carries its queue (jobs/djangoq/cluster.py)."""
    from types import SimpleNamespace

    from django_q.status import Stat

    broker = SimpleNamespace(list_key="llm")
    sentinel = SimpleNamespace(
        parent_pid=None,
        pid=1,
        cluster_id="c",
        broker=broker,
        tob=None,
        reincarnations=0,
        status=lambda: "Idle",
        monitor=None,
        pusher=None,
        pool=[],
        result_queue=SimpleNamespace(qsize=lambda: 0),
        task_queue=SimpleNamespace(qsize=lambda: 0),
        queue_name=lambda: broker.list_key,
    )
    assert Stat(sentinel).queue == "llm"


@pytest.fixture
def database_down(monkeypatch, caplog):
    """Django's connection points at a socket directory that does not exist,
    as when the database is down; the raw error names it."""
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "HOST", "/nonexistent/conveyor-db-socket")
    caplog.set_level("WARNING", logger="config.health")
    yield caplog
    connection.close()  # the next query reconnects with the real settings


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_a_database_failure_is_answered_without_its_text_which_goes_to_the_log(client, database_down, path):
    response = client.get(path)

    assert response.status_code == 503
    assert response.json() == {"status": "error", "database": "unavailable"}
    assert "conveyor-db-socket" not in response.content.decode()
    assert any("conveyor-db-socket" in record.getMessage() for record in database_down.records)
