"""Submitting batches: the rows a batch writes are those single submissions write."""

from __future__ import annotations

import gc
from datetime import timedelta

import pytest
from django.db import connection
from django.forms.models import model_to_dict
from django.utils import timezone
from django_q.signing import SignedPackage

from jobs.engine.batches import InvalidBatch, gc_paused, submit_batch
from jobs.engine.submission import submit_job
from jobs.models import Job, JobEvent

pytestmark = pytest.mark.django_db

# Fields a batch job and a single job legitimately differ in.
OWN = {"id", "batch", "created_at", "updated_at", "request_fingerprint"}


def test_batch_jobs_are_written_as_single_submissions_write_them():
    run_after = timezone.now() + timedelta(minutes=5)
    items = [
        {"kind": "demo.noop", "payload": {}},
        {
            "kind": "demo.fail",
            "payload": {"message": 'naïve ✓ 😀 "quoted" \\ back\nslash\ttab', "mode": "permanent"},
            "queue": "other.q-1",
            "priority": -7,
            "max_attempts": 3,
            "backoff_base": 0.25,
            "backoff_max": 1e-1 + 30,
            "run_after": run_after,
            "callback_url": "https://example.com/hook?a=1&b=é",
        },
        {
            "kind": "content.page",
            "payload": {"template": "Write {keyword}", "variables": {"keyword": "tea", "n": 2**53 + 1, "x": None}},
        },
    ]

    batch = submit_batch("mixed", items, owner="olga").batch
    singles = [submit_job(item["kind"], item["payload"], owner="olga", **_options(item)).job for item in items]

    broker_rows = _broker_rows()
    for item, single in zip(items, singles, strict=True):
        batched = Job.objects.get(batch=batch, kind=item["kind"])
        single.refresh_from_db()
        assert _fields(batched) == _fields(single)
        assert batched.created_at == batched.updated_at
        assert batched.request_fingerprint == ""
        assert JobEvent.objects.get(job=batched).data == JobEvent.objects.get(job=single).data
        ours, theirs = broker_rows[str(batched.id)], broker_rows[str(single.id)]
        assert (ours["key"], ours["priority"], ours["timeout"]) == (
            theirs["key"],
            theirs["priority"],
            theirs["timeout"],
        )
        if "run_after" in item:
            assert ours["lock"] == theirs["lock"] == run_after
    assert Job.objects.get(batch=batch, kind="demo.fail").state == "scheduled"


def _broker_rows() -> dict[str, dict]:
    """Each broker row by the job it runs."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT key, payload, lock, priority FROM django_q_ormq")
        rows = cursor.fetchall()
    by_job = {}
    for key, payload, lock, priority in rows:
        task = SignedPackage.loads(payload)
        by_job[task["args"][0]] = {"key": key, "lock": lock, "priority": priority, "timeout": task["timeout"]}
    return by_job


def _options(item: dict) -> dict:
    return {k: v for k, v in item.items() if k not in ("kind", "payload")}


def _fields(job: Job) -> dict:
    return {k: v for k, v in model_to_dict(job).items() if k not in OWN}


def test_the_garbage_collector_is_paused_for_a_batch_and_restored_after():
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(InvalidBatch):
        submit_batch("bad", [{"kind": "nope", "payload": {}}])
    assert gc.isenabled()


def test_a_collector_turned_off_elsewhere_stays_off():
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
