"""An app of your own, outside the repository, run by `manage.py up`: its
migration applied, its kind registered in Daphne and the workers, submitted
through the API and from Python, and succeeding."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_until
from tests.e2e.test_up import data_dir, manage, start_up, up_env, wait_healthy  # noqa: F401 - data_dir is a fixture

pytestmark = pytest.mark.processes

APP = {
    "__init__.py": "",
    "apps.py": """
        from django.apps import AppConfig


        class ShelfConfig(AppConfig):
            name = "shelf"
            default_auto_field = "django.db.models.BigAutoField"
        """,
    "models.py": """
        from django.db import models


        class Book(models.Model):
            job_id = models.UUIDField(unique=True)
            title = models.CharField(max_length=200)
        """,
    "migrations/__init__.py": "",
    "migrations/0001_initial.py": """
        from django.db import migrations, models


        class Migration(migrations.Migration):
            initial = True
            dependencies = []
            operations = [
                migrations.CreateModel(
                    name="Book",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False)),
                        ("job_id", models.UUIDField(unique=True)),
                        ("title", models.CharField(max_length=200)),
                    ],
                ),
            ]
        """,
    "tasks.py": """
        import os

        from jobs import Payload, handler


        class Shelve(Payload):
            title: str


        @handler("shelf.shelve", schema=Shelve, max_attempts=2, timeout=30)
        def shelve(ctx, payload: Shelve) -> dict:
            \"\"\"Puts a book on the shelf.\"\"\"
            from shelf.models import Book

            Book.objects.update_or_create(job_id=ctx.job_id, defaults={"title": payload.title})
            return {"title": payload.title, "books": Book.objects.count(), "worker_pid": os.getpid()}
        """,
}


def write_app(folder: Path) -> None:
    for name, text in APP.items():
        path = folder / "shelf" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def test_up_runs_an_app_of_your_own_from_outside_the_repository(data_dir, tmp_path):  # noqa: F811
    apps_folder = tmp_path / "apps"
    write_app(apps_folder)
    port = free_port()
    env = up_env(data_dir, port)
    env.update(CONVEYOR_APPS="shelf", PYTHONPATH=str(apps_folder))
    log_path = tmp_path / "up.log"
    up = start_up(env, log_path)
    try:
        wait_healthy(up, port, log_path, path="/readyz")  # migrations applied, the cluster up
        base = f"http://127.0.0.1:{port}"

        created = manage(env, "createapikey", "own-app")
        assert created.returncode == 0, created.stderr
        headers = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}

        refused = httpx.post(f"{base}/api/v1/jobs", json={"kind": "shelf.shelve", "payload": {}}, headers=headers)
        assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "payload.title"

        answer = httpx.post(
            f"{base}/api/v1/jobs", json={"kind": "shelf.shelve", "payload": {"title": "Dune"}}, headers=headers
        )
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]

        def job_state() -> dict:
            return httpx.get(f"{base}/api/v1/jobs/{job_id}", headers=headers).json()

        wait_until(lambda: job_state()["state"] == "succeeded", timeout=60, interval=0.5, message="shelf.shelve")
        result = job_state()["result"]
        assert (result["title"], result["books"]) == ("Dune", 1)

        # From Python, in a process of its own (a management command).
        shell = manage(env, "shell", "-c", "import jobs; print(jobs.submit('shelf.shelve', {'title': 'Emma'}).id)")
        assert shell.returncode == 0, shell.stderr
        second = shell.stdout.strip().splitlines()[-1]

        def shown() -> dict:
            out = manage(env, "jobs", "show", second)
            return json.loads(out.stdout) if out.returncode == 0 else {}

        wait_until(lambda: shown().get("state") == "succeeded", timeout=60, interval=0.5, message="the Python job")
        assert shown()["result"]["books"] == 2

        openapi = httpx.get(f"{base}/api/v1/openapi.json").json()
        assert (
            "- `shelf.shelve`: Puts a book on the shelf."
            in (openapi["components"]["schemas"]["JobIn"]["properties"]["kind"]["description"])
        )
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    output = log_path.read_text(errors="replace")
    assert code == 0, output
