"""Property test of the submission service: whatever it is given (any JSON-ish
payload, unicode edge cases, deep nesting, huge numbers, NUL characters,
options of the wrong type), `submit_job` either creates exactly the job asked
for, or raises InvalidJob with a message, and never writes half a job."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict

from jobs.engine.registry import Payload, handler
from jobs.errors import InvalidJob
from jobs.models import Job, JobEvent
from jobs.services import submit_job

EXAMPLES = 120  # per test; both together take about 20 s


class AnyPayload(Payload):
    """Takes any JSON object as it is."""

    model_config = ConfigDict(extra="allow")


@handler("props.echo", schema=AnyPayload)
def echo(ctx, payload: AnyPayload) -> dict:
    """Accepts any payload (tests)."""
    return {}


# Text with what breaks storage or display: NUL, unpaired surrogates,
# astral characters, right-to-left marks, combining characters, line breaks.
edge_text = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(["\x00", "\ud800", "\udfff", "😀", "\u202e", "e\u0301", "\r\n", "\u2028", "'"])).map(
        "".join
    ),
    st.sampled_from(["", "<script>alert(1)</script>", "null", "\\u0000", "a" * 300]),
)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, 1e308, -1e-308, 2**63, -(2**63) - 1, 10**1000]),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | edge_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(edge_text, children, max_size=4),
    max_leaves=20,
)


def _nested(depth: int) -> dict:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"a": [value]}
    return value


payloads = st.one_of(
    st.dictionaries(edge_text, json_values, max_size=6),
    json_values,  # not an object, mostly
    st.one_of(st.sampled_from([62, 63, 64, 65, 3000]), st.integers(min_value=1, max_value=5000)).map(_nested),
    st.builds(lambda n: {"big": "x" * n}, st.integers(min_value=200_000, max_value=300_000)),
    st.fixed_dictionaries({"seconds": numbers | edge_text, "steps": numbers | edge_text}),  # demo.sleep's fields
)
anything = st.none() | st.booleans() | numbers | edge_text | st.lists(st.integers(), max_size=2)
options = st.fixed_dictionaries(
    {},
    optional={
        "queue": st.one_of(anything, st.from_regex(r"[A-Za-z0-9_.-]{1,100}", fullmatch=True)),
        "priority": st.one_of(anything, st.integers(min_value=-1000, max_value=1000)),
        "max_attempts": st.one_of(anything, st.integers(min_value=1, max_value=50)),
        "backoff_base": st.one_of(anything, st.floats(min_value=0.01, max_value=100)),
        "backoff_max": st.one_of(anything, st.floats(min_value=100, max_value=1000)),
        "idempotency_key": st.one_of(anything, edge_text),
        "callback_url": st.one_of(
            edge_text, st.sampled_from(["https://example.com/hook", "http://169.254.169.254/", "ftp://x", "https://"])
        ),
        "run_after": st.one_of(
            anything,
            st.datetimes(timezones=st.just(UTC)),
            st.datetimes(),  # naive
            st.just(datetime.now(UTC) + timedelta(days=400)),
        ),
    },
)
# Mostly well-formed: the "created exactly as submitted" half of the property.
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=15,
)
plain_options = st.fixed_dictionaries(
    {},
    optional={
        "queue": st.from_regex(r"[A-Za-z0-9_.-]{1,100}", fullmatch=True),
        "priority": st.integers(min_value=-1000, max_value=1000),
        "max_attempts": st.integers(min_value=1, max_value=50),
        "idempotency_key": st.text(min_size=1, max_size=255),
        "run_after": st.datetimes(
            min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
        ),
    },
)
kinds = st.one_of(st.sampled_from(["props.echo", "demo.sleep", "demo.fail", "demo.noop", "no.such-kind"]), anything)


def _counts() -> tuple[int, int, int]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_q_ormq")
        broker_rows = cursor.fetchone()[0]
    return Job.objects.count(), JobEvent.objects.count(), broker_rows


PROPERTY_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@pytest.mark.django_db
@PROPERTY_SETTINGS
@given(kind=kinds, payload=payloads, options=options)
def test_it_refuses_hostile_submissions_with_a_message_and_writes_nothing(kind, payload, options):
    _in_savepoint(kind, payload, options)


@pytest.mark.django_db
@PROPERTY_SETTINGS
@given(payload=st.dictionaries(st.text(max_size=10), plain_values, max_size=6), options=plain_options)
def test_it_creates_exactly_the_job_asked_for_or_refuses_it_with_a_message(payload, options):
    _in_savepoint("props.echo", payload, options)


def _in_savepoint(kind: Any, payload: Any, options: dict[str, Any]) -> None:
    # Each example in a savepoint rolled back after it: a database error in
    # one (the failure this test looks for) cannot poison the next.
    with transaction.atomic():
        _check_submission(kind, payload, options)
        transaction.set_rollback(True)


def _check_submission(kind: Any, payload: Any, options: dict[str, Any]) -> None:
    owner = f"props:{uuid.uuid4()}"
    before = _counts()
    try:
        submitted = submit_job(kind, payload, owner=owner, **options)
    except InvalidJob as exc:
        assert exc.errors, "InvalidJob names the fields"
        assert all(e["field"] and e["message"] for e in exc.errors)
        assert str(exc.message)
        assert _counts() == before, "a refused submission writes nothing"
        return
    assert submitted.created
    assert _counts() == (before[0] + 1, before[1] + 1, before[2] + 1)
    job = Job.objects.get(id=submitted.job.id)
    assert job.kind == kind and job.owner == owner
    if kind == "props.echo":
        assert _same(job.payload, payload), "the payload is stored as submitted"
    for name in ("queue", "priority", "max_attempts", "idempotency_key"):
        if options.get(name) not in (None, ""):
            assert getattr(job, name) == options[name], name
    if options.get("run_after") is not None:
        assert job.run_after == options["run_after"]


def _same(stored: Any, submitted: Any) -> bool:
    """Equal as JSON: -0.0 comes back as 0, and jsonb keeps ints and floats apart
    only by value."""
    if isinstance(submitted, float) and isinstance(stored, (int, float)):
        return math.isclose(stored, submitted, rel_tol=0, abs_tol=0) or stored == submitted
    if isinstance(submitted, dict):
        return (
            isinstance(stored, dict)
            and stored.keys() == submitted.keys()
            and all(_same(stored[k], v) for k, v in submitted.items())
        )
    if isinstance(submitted, list):
        return isinstance(stored, list) and len(stored) == len(submitted) and all(map(_same, stored, submitted))
    return stored == submitted and type(stored) is type(submitted)
