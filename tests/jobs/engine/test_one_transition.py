"""One transition: only jobs/engine/states.py changes a job's state.

Every module under jobs/ and dashboard/ (not migrations, not tests) is read
for code that sets a job's state: SQL `UPDATE jobs_job SET ... state = ...`
(its string literals joined in source order, so a statement split over
several literals or f-strings is still seen), the ORM's `.update(state=...)`,
`bulk_update`/`save(update_fields=...)` naming `state`, and an assignment to
a job's `.state`. A state changed anywhere else escapes the state machine's
checks, its event and its finish hooks.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
STATES = ROOT / "jobs" / "engine" / "states.py"

# The SET list of an UPDATE of jobs_job: from SET to the first keyword that ends it.
_UPDATE_JOBS = re.compile(
    r"\bUPDATE\s+jobs_job\b(?:\s+(?:AS\s+)?(?!SET\b)\w+)?\s+SET\b(?P<sets>.*?)(?:\bWHERE\b|\bFROM\b|\bRETURNING\b|$)",
    re.IGNORECASE | re.DOTALL,
)
_SETS_STATE = re.compile(r"(?<![\w.])state\s*=(?!=)", re.IGNORECASE)


def _strings_in_order(tree: ast.AST) -> str:
    found = [
        (node.lineno, node.col_offset, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    return " ".join(value for _, _, value in sorted(found))


def _names_state(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == "state" for n in ast.walk(node))


def _is_job(node: ast.AST) -> bool:
    return "job" in ast.unparse(node).lower()


def state_changes(source: str) -> list[str]:
    """What in `source` sets a job's state, one line each."""
    tree = ast.parse(source)
    found = []
    for match in _UPDATE_JOBS.finditer(_strings_in_order(tree)):
        if _SETS_STATE.search(match.group("sets")):
            found.append("SQL: " + " ".join(match.group(0).split())[:120])
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            if method == "update" and any(k.arg == "state" for k in node.keywords):
                found.append(f"line {node.lineno}: .update(state=...)")
            elif method == "bulk_update" and any(_names_state(a) for a in [*node.args[1:], *node.keywords]):
                found.append(f"line {node.lineno}: bulk_update of state")
            elif method == "save" and any(k.arg == "update_fields" and _names_state(k.value) for k in node.keywords):
                found.append(f"line {node.lineno}: save(update_fields=[... 'state' ...])")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
            if len(node.args) >= 2 and _is_job(node.args[0]) and _names_state(node.args[1]):
                found.append(f"line {node.lineno}: setattr(job, 'state', ...)")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "state" and _is_job(target.value):
                    found.append(f"line {node.lineno}: {ast.unparse(target)} = ...")
    return found


def _modules() -> list[Path]:
    paths = []
    for package in ("jobs", "dashboard"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).parts
            if "migrations" in parts or "tests" in parts:
                continue
            paths.append(path)
    return paths


def test_only_the_state_machine_changes_a_jobs_state():
    offenders = {
        str(path.relative_to(ROOT)): changes
        for path in _modules()
        if path != STATES and (changes := state_changes(path.read_text()))
    }
    assert offenders == {}


def test_the_state_machine_holds_the_batched_transitions():
    # The scan sees real code: the worker's batched claim, its batch of quiet
    # successes and its release of unstarted jobs are written in states.py.
    changes = " ".join(state_changes(STATES.read_text()))
    assert "SET state = 'running'" in changes
    assert "SET state = 'succeeded'" in changes
    assert "SET state = 'queued'" in changes


@pytest.mark.parametrize(
    "source",
    [
        "q = 'UPDATE jobs_job SET state = %s WHERE id = %s'",
        "q = ('WITH r AS (UPDATE jobs_job SET updated_at = now(),'\n     \" state = 'queued' WHERE id = %s)\")",
        "q = f\"UPDATE jobs_job SET state = '{target}', lease_owner = '' FROM v WHERE jobs_job.id = v.id\"",
        "q = 'update jobs_job j set STATE=%s'",
        "Job.objects.filter(id=job_id).update(state=State.DEAD)",
        "job.state = State.QUEUED",
        "self.job.state = 'dead'",
        "job.save(update_fields=['state', 'updated_at'])",
        "Job.objects.bulk_update(jobs, ['state'])",
        "setattr(job, 'state', 'dead')",
    ],
)
def test_the_scan_finds_a_state_change(source):
    assert state_changes(source)


@pytest.mark.parametrize(
    "source",
    [
        "q = 'UPDATE jobs_job SET progress_percent = %s WHERE id = %s AND state = %s'",
        "q = 'UPDATE jobs_job SET run_after = now() FROM p WHERE jobs_job.state = p.state'",
        "q = 'UPDATE jobs_attempt SET state = %s'",
        "q = 'SELECT count(*) FILTER (WHERE state = %s) FROM jobs_job'",
        "Job.objects.filter(state=State.DEAD).update(run_after=None)",
        "Job.objects.create(kind='demo.noop', state=State.QUEUED)",
        "filters.state = ''",
        "same = job.state == State.DEAD",
    ],
)
def test_the_scan_passes_what_changes_no_state(source):
    assert state_changes(source) == []
