"""Behind a transaction pooler (DATABASE_DIRECT_URL set, config/settings.py):
what holds session state is switched off on the pooled connection, LISTEN
connections go to the direct URL, and without DATABASE_DIRECT_URL nothing
changes. The whole path through a real PgBouncer is tests/e2e/test_pgbouncer.py."""

from __future__ import annotations

import json
import subprocess
import sys

import dj_database_url
import pytest
from django.db import connection

from jobs.db.durability import relax_commit_durability
from jobs.djangoq.broker import listen_params
from tests.conftest import ROOT, process_env

POOLED = "postgres://app:pooled-secret@127.0.0.1:6432/conveyor"
DIRECT = "postgres://owner@db.internal:5432/conveyor_main?sslmode=require"

_PRINT = """
import json, django
django.setup()
from django.conf import settings
db = settings.DATABASES["default"]
print(json.dumps({
    "pooled": settings.DATABASE_POOLED,
    "prepared": settings.CONVEYOR["PREPARED_STATEMENTS"],
    "server_side_cursors_off": db.get("DISABLE_SERVER_SIDE_CURSORS", False),
    "prepare_threshold": db.get("OPTIONS", {}).get("prepare_threshold", "unset"),
    "host": db["HOST"],
}))
"""


def _settings_of(**env: str) -> dict:
    """The database settings a process started with `env` computes (nothing connects)."""
    done = subprocess.run(
        [sys.executable, "-c", _PRINT],
        cwd=ROOT,
        env={**process_env(**env), "DJANGO_SETTINGS_MODULE": "config.settings"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.django_db
def test_a_direct_url_makes_the_database_url_a_pooled_one():
    assert _settings_of(DATABASE_URL=POOLED, DATABASE_DIRECT_URL=DIRECT) == {
        "pooled": True,
        "prepared": False,
        "server_side_cursors_off": True,
        "prepare_threshold": None,
        "host": "127.0.0.1",
    }


@pytest.mark.django_db
def test_without_a_direct_url_nothing_changes():
    assert _settings_of(DATABASE_URL=POOLED, DATABASE_DIRECT_URL="") == {
        "pooled": False,
        "prepared": True,
        "server_side_cursors_off": False,
        "prepare_threshold": "unset",
        "host": "127.0.0.1",
    }


@pytest.mark.django_db
def test_prepared_statements_stay_off_behind_a_pooler_even_when_asked_for():
    found = _settings_of(DATABASE_URL=POOLED, DATABASE_DIRECT_URL=DIRECT, CONVEYOR_PREPARED_STATEMENTS="1")
    assert found["prepared"] is False


@pytest.mark.django_db
def test_a_direct_url_without_a_database_url_is_refused():
    env = {**process_env(DATABASE_DIRECT_URL=DIRECT), "DJANGO_SETTINGS_MODULE": "config.settings"}
    del env["DATABASE_URL"]
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "DATABASE_DIRECT_URL needs DATABASE_URL (the pooler's URL) set too" in done.stderr


def test_listen_connections_reach_postgres_through_the_direct_url(settings):
    settings.DATABASE_DIRECT = dj_database_url.parse(DIRECT)
    params = listen_params("conveyor-event-hub")
    assert {k: params.get(k) for k in ("host", "port", "user", "password", "dbname", "sslmode")} == {
        "host": "db.internal",
        "port": "5432",
        "user": "owner",
        "password": None,  # the pooled URL's password is not sent to the direct server
        "dbname": "conveyor_main",
        "sslmode": "require",
    }
    assert params["application_name"] == "conveyor-event-hub"


def test_listen_connections_use_the_database_url_without_a_direct_one(settings):
    settings.DATABASE_DIRECT = None
    ours = connection.get_connection_params()
    params = listen_params("conveyor-event-hub")
    assert params["dbname"] == ours["dbname"]
    assert params.get("host") == (ours.get("host") or None)


@pytest.mark.django_db(transaction=True)
def test_workers_send_no_session_set_behind_a_pooler(settings):
    settings.DATABASE_POOLED = True
    connection.close()  # a fresh connection, not one an earlier test relaxed
    relax_commit_durability()
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    settings.DATABASE_POOLED = False
    relax_commit_durability()
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "off"
    connection.close()  # the next test gets a connection with the server's setting
