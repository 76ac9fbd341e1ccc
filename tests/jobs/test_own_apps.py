"""Apps of your own (CONVEYOR_APPS): their `tasks` modules are discovered at
start-up, and their kinds show wherever built-in kinds do, read from the
registry when asked (not a list frozen at import)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings

from jobs.engine import registry
from jobs.engine.apikeys import SCOPES, create_api_key
from jobs.models import Job
from tests.conftest import ROOT, process_env
from tests.jobs.api.conftest import ApiClient

TASKS = '''
from jobs import Payload, handler


class Greet(Payload):
    name: str


@handler("{kind}", schema=Greet, max_attempts=2, timeout=30)
def greet(ctx, payload: Greet) -> dict:
    """Greets someone by name."""
    return {{"greeting": "hello " + payload.name}}
'''


def write_app(folder: Path, name: str, tasks: str | None) -> None:
    package = folder / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if tasks is not None:
        (package / "tasks.py").write_text(textwrap.dedent(tasks))


@pytest.fixture
def isolated_registry(monkeypatch):
    """Kinds registered by a test go when it ends."""
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))


@pytest.fixture
def own_app(tmp_path, monkeypatch, isolated_registry):
    """An app outside the repository with a `tasks` module, installed and discovered: its kind."""
    name = f"own_{uuid.uuid4().hex[:8]}"
    kind = f"{name}.greet"
    write_app(tmp_path, name, TASKS.format(kind=kind))
    monkeypatch.syspath_prepend(str(tmp_path))
    # Django populates the apps again and runs JobsConfig.ready(), which discovers.
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, name]):
        yield kind


# --- discovery ------------------------------------------------------------------


def test_the_tasks_module_of_an_installed_app_registers_its_kinds(own_app):
    found = registry.get_handler(own_app)
    assert found is not None
    assert (found.queue, found.max_attempts, found.timeout, found.description) == (
        "default",
        2,
        30,
        "Greets someone by name.",
    )
    assert own_app in registry.client_kinds()


def test_an_app_without_a_tasks_module_is_skipped(tmp_path, monkeypatch, isolated_registry):
    name = f"plain_{uuid.uuid4().hex[:8]}"
    write_app(tmp_path, name, tasks=None)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = registry.known_kinds()
    with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, name]):
        assert registry.known_kinds() == before


def test_an_import_error_inside_an_app_s_tasks_module_is_raised_naming_the_app(
    tmp_path, monkeypatch, isolated_registry
):
    name = f"broken_{uuid.uuid4().hex[:8]}"
    write_app(tmp_path, name, tasks="import a_dependency_nobody_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_nobody_installed") as caught:
        with override_settings(INSTALLED_APPS=[*settings.INSTALLED_APPS, name]):
            pass
    assert caught.value.__notes__ == [f"while importing {name}.tasks (the job kinds of app {name!r})"]


def test_every_command_discovers_the_tasks_of_the_apps_in_conveyor_apps(tmp_path):
    write_app(tmp_path, "greeter", TASKS.format(kind="greeter.greet"))
    env = process_env(CONVEYOR_APPS="greeter", PYTHONPATH=str(tmp_path))
    listed = subprocess.run(
        [sys.executable, "manage.py", "jobs", "kinds"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "greeter.greet            default    Greets someone by name." in listed.stdout.splitlines()
    assert "demo.sleep" in listed.stdout


def test_a_broken_tasks_module_stops_the_command_and_says_where(tmp_path):
    write_app(tmp_path, "shaky", tasks="from jobs import handler\nimport a_dependency_nobody_installed\n")
    env = process_env(CONVEYOR_APPS="shaky", PYTHONPATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "manage.py", "jobs", "kinds"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'a_dependency_nobody_installed'" in result.stderr
    assert "while importing shaky.tasks (the job kinds of app 'shaky')" in result.stderr


# --- the kinds wherever built-in kinds show --------------------------------------


def test_the_submit_page_lists_and_submits_the_app_s_kind(own_app, client, django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("olga", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="operate_job", content_type__app_label="jobs"))
    user.user_permissions.add(Permission.objects.get(codename="add_job", content_type__app_label="jobs"))
    client.force_login(user)
    page = client.get("/submit/").content.decode()
    assert f"?kind={own_app}" in page
    form = client.get("/submit/", {"kind": own_app}).content.decode()
    assert 'name="payload-name"' in form and "Greets someone by name." in form
    posted = client.post(f"/submit/?kind={own_app}", {"kind": own_app, "payload-name": "Ada"})
    assert posted.status_code == 302, posted.content.decode()
    job = Job.objects.get(kind=own_app)
    assert job.payload == {"name": "Ada"} and job.max_attempts == 2


def test_the_api_accepts_validates_and_documents_the_app_s_kind(own_app, db):
    api = ApiClient(create_api_key("own app", scopes=SCOPES).key)
    created = api.post("/jobs", {"kind": own_app, "payload": {"name": "Ada"}})
    assert created.status_code == 202, created.content
    assert created.json()["kind"] == own_app and created.json()["max_attempts"] == 2

    refused = api.post("/jobs", {"kind": own_app, "payload": {"name": 3}})
    assert refused.status_code == 422
    assert refused.json()["errors"] == [{"field": "payload.name", "message": "Input should be a valid string"}]

    schema = api.get("/openapi.json").json()
    described = schema["components"]["schemas"]["JobIn"]["properties"]["kind"]["description"]
    assert f"- `{own_app}`: Greets someone by name." in described
    assert "- `demo.sleep`: Sleeps, reporting progress at each step." in described
    assert "webhook.deliver" not in described


def test_the_cli_lists_and_submits_the_app_s_kind(own_app, capsys, db):
    call_command("jobs", "kinds")
    assert f"{own_app:<24} default    Greets someone by name." in capsys.readouterr().out.splitlines()
    call_command("jobs", "submit", own_app, "--payload", '{"name": "Ada"}')
    job_id = capsys.readouterr().out.strip()
    assert Job.objects.get(id=job_id).kind == own_app


def test_the_admin_lists_the_app_s_jobs_and_filters_by_its_kind(own_app, admin_client):
    import jobs

    job = jobs.submit(own_app, {"name": "Ada"})
    listed = admin_client.get("/admin/jobs/job/").content.decode()
    assert f"?kind={own_app}" in listed and str(job.id)[:8] in listed
    filtered = admin_client.get("/admin/jobs/job/", {"kind": own_app})
    assert filtered.status_code == 200 and str(job.id)[:8] in filtered.content.decode()
