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

from tests.conftest import ROOT, free_port, wait_until
from tests.e2e.test_up import (  # noqa: F401 - data_dir and migrated_server are fixtures
    data_dir,
    manage,
    migrated_server,
    start_up,
    up_env,
    wait_healthy,
)

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


def test_the_example_seo_app_audits_a_site_offline(data_dir, tmp_path):  # noqa: F811
    """examples/seo as README "Your own jobs" runs it: one seo.audit_site job
    submits a seo.audit_page job per page (from Python, in its transaction)."""
    port = free_port()
    env = up_env(data_dir, port)
    env.update(CONVEYOR_APPS="seo", PYTHONPATH=str(ROOT / "examples"))
    log_path = tmp_path / "up.log"
    up = start_up(env, log_path)
    try:
        wait_healthy(up, port, log_path, path="/readyz")
        base = f"http://127.0.0.1:{port}"
        created = manage(env, "createapikey", "seo")
        headers = {"Authorization": f"Bearer {created.stdout.strip().splitlines()[-1]}"}
        good = (
            '<html><head><title>Handmade oak tables</title><meta name="description" content="Tables made to order.">'
            '</head><body><h1>Oak tables</h1><img src="t.jpg" alt="A table"></body></html>'
        )
        poor = "<html><head><title>Hi</title></head><body><h1>A</h1><h1>B</h1><img src='x.png'></body></html>"
        site = {
            "pages": [{"url": "https://shop.example/", "html": good}, {"url": "https://shop.example/b", "html": poor}]
        }
        answer = httpx.post(f"{base}/api/v1/jobs", json={"kind": "seo.audit_site", "payload": site}, headers=headers)
        assert answer.status_code == 202, answer.text

        def job(job_id: str) -> dict:
            return httpx.get(f"{base}/api/v1/jobs/{job_id}", headers=headers).json()

        site_id = answer.json()["id"]
        wait_until(lambda: job(site_id)["state"] == "succeeded", timeout=60, interval=0.5, message="seo.audit_site")
        page_ids = job(site_id)["result"]["jobs"]
        assert len(page_ids) == 2
        wait_until(
            lambda: all(job(i)["state"] == "succeeded" for i in page_ids), timeout=60, interval=0.5, message="pages"
        )
        first, second = (job(i)["result"] for i in page_ids)
        assert first == {"url": "https://shop.example/", "score": 100, "problems": []}
        assert second == {
            "url": "https://shop.example/b",
            "score": 20,
            "problems": [
                "title is 2 characters; aim for 10-60",
                "no meta description",
                "2 <h1> headings; use exactly one",
                "images without alt text: 1",
            ],
        }
        stored = manage(
            env,
            "shell",
            "-c",
            "from seo.models import PageAudit; print(sorted(PageAudit.objects.values_list('score', flat=True)))",
        )
        assert stored.stdout.strip().splitlines()[-1] == "[20, 100]", stored.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
    assert code == 0, log_path.read_text(errors="replace")
