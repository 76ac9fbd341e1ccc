"""CONVEYOR_APPS: parsing, and a bad entry stopping the start with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.own_apps import parse_apps
from tests.conftest import ROOT, process_env

BUILT_IN = ["django.contrib.admin", "jobs", "dashboard"]


def test_unset_or_empty_adds_no_apps():
    assert parse_apps(None, BUILT_IN) == []
    assert parse_apps(" , ", BUILT_IN) == []


def test_entries_are_kept_in_order_and_stripped(tmp_path, monkeypatch):
    for name in ("shop", "seo_app"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert parse_apps(" seo_app , shop.apps.ShopConfig,", BUILT_IN) == ["seo_app", "shop.apps.ShopConfig"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("seo app", "CONVEYOR_APPS entry 'seo app' is not a dotted Python path"),
        ("seo.", "CONVEYOR_APPS entry 'seo.' is not a dotted Python path"),
        ("9seo", "CONVEYOR_APPS entry '9seo' is not a dotted Python path"),
        ("jobs", "CONVEYOR_APPS entry 'jobs' is given twice or is one of Conveyor's own apps"),
        ("json,json", "CONVEYOR_APPS entry 'json' is given twice"),
        (
            "no_such_app_anywhere",
            "CONVEYOR_APPS entry 'no_such_app_anywhere': no module named 'no_such_app_anywhere' on the Python path "
            "(add the folder that contains it to PYTHONPATH)",
        ),
    ],
)
def test_a_bad_entry_is_refused_naming_it(raw, message):
    with pytest.raises(ImproperlyConfigured) as caught:
        parse_apps(raw, BUILT_IN)
    assert str(caught.value).startswith(message)


def test_the_setting_adds_the_apps_after_conveyor_s_own_and_before_axes(tmp_path):
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    script = "from django.conf import settings; print(','.join(settings.INSTALLED_APPS))"
    env = process_env(CONVEYOR_APPS="shop", PYTHONPATH=str(tmp_path), DJANGO_SETTINGS_MODULE="config.settings")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    installed = result.stdout.strip().split(",")
    assert installed[-3:] == ["dashboard", "shop", "axes"]


@pytest.mark.parametrize("command", [["check"], ["up", "--port", "8999"], ["qcluster"]])
def test_a_bad_entry_stops_every_command_with_one_line_and_no_traceback(command):
    env = process_env(CONVEYOR_APPS="seo,not_installed_anywhere")
    result = subprocess.run(
        [sys.executable, "manage.py", *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "Conveyor is not configured correctly: CONVEYOR_APPS entry 'seo': no module named 'seo' on the Python path "
        "(add the folder that contains it to PYTHONPATH)"
    )
