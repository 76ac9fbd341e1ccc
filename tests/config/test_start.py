"""How a process starts: the cyclic garbage collector is off while Django
loads (nothing it allocates is garbage) and on, with what was loaded frozen,
once it has (manage.py, config/asgi.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, process_env

# After the start: is the collector on, and were the start's objects frozen?
PROBE = "import gc; print(gc.isenabled(), gc.get_freeze_count() > 10000)"


def _run(*args: str) -> str:
    done = subprocess.run(args, cwd=ROOT, env=process_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.django_db
def test_a_management_command_collects_garbage_once_django_has_started():
    assert _run(sys.executable, "manage.py", "shell", "--no-imports", "-c", PROBE) == "True True"


@pytest.mark.django_db
def test_daphne_s_application_collects_garbage_once_it_has_loaded():
    assert _run(sys.executable, "-c", f"import config.asgi; {PROBE}") == "True True"
