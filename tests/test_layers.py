"""The import contracts of pyproject.toml ([tool.importlinter]): the layers of
docs/ARCHITECTURE.md, and no circle between sibling modules. A new upward
import or circle fails here, not only in `make lint`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_the_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    # --no-cache: a cache left by an earlier run must not hide a new import.
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", result.stdout), result.stdout
