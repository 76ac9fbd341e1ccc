"""The /metrics counter triggers' cost on the hot path, before and after
migration 0019 (shard = pg_backend_pid() % 16, then the whole pid), in one run.

The trigger functions are switched back and forth on the scratch database
(with 0019's own rewrite) and each variant is timed in interleaved rounds:
`submit_job` (the W1 path: one INSERT statement whose trigger counts the
submission; commits without waiting for the WAL flush, so that the disk does
not drown the difference) and a finish (a one-row UPDATE queued -> cancelled,
whose trigger counts it; timed inside Postgres, N statements in one function
call), N of each per round, on one connection. "none" has the counter
triggers disabled: the difference to it is what counting costs. "pid + gone
rows" is the new sharding with 10,000 rows of backends that are gone and not
yet compacted in the table. Usage: python -m bench counters
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench.harness import Table, analyze, reset

N = 600
ROUNDS = 7
GONE_ROWS = 10_000
OLD, NEW = "pg_backend_pid() % 16", "pg_backend_pid()"
TRIGGERS = ("conveyor_count_submitted", "conveyor_count_finished")


def _execute(sql: str, params: list | None = None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@contextmanager
def _variant(name: str) -> Iterator[None]:
    reshard = importlib.import_module("jobs.migrations.0019_counter_shards")._reshard
    _execute("DELETE FROM conveyor_counter")
    if name == "none":
        for trigger in TRIGGERS:
            _execute(f"ALTER TABLE jobs_job DISABLE TRIGGER {trigger}")
    elif name == "pid % 16":
        _execute(reshard(NEW, OLD))
    elif name == "pid + gone rows":  # pids no backend has (Linux pids stop at 2^22)
        _execute(
            "INSERT INTO conveyor_counter (metric, kind, queue, label, shard, n)"
            " SELECT 'submitted', 'demo.noop', 'default', '', 4194304 + g, 1 FROM generate_series(1, %s) g",
            [GONE_ROWS],
        )
    _execute("ANALYZE conveyor_counter")
    try:
        yield
    finally:
        if name == "none":
            for trigger in TRIGGERS:
                _execute(f"ALTER TABLE jobs_job ENABLE TRIGGER {trigger}")
        elif name == "pid % 16":
            _execute(reshard(OLD, NEW))


_FINISH_ALL = """
CREATE OR REPLACE FUNCTION pg_temp.finish_all() RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    started timestamptz := clock_timestamp();
    job uuid;
    n int := 0;
BEGIN
    FOR job IN SELECT id FROM jobs_job WHERE state = 'queued' LOOP
        UPDATE jobs_job SET state = 'cancelled', finished_at = now() WHERE id = job;
        n := n + 1;
    END LOOP;
    RETURN extract(epoch FROM clock_timestamp() - started) * 1e6 / greatest(n, 1);
END $$
"""


def _round() -> tuple[float, float]:
    """(µs per submit_job, µs per one-row finishing UPDATE)."""
    from django.db import connection

    from jobs.services import submit_job

    reset()
    # Without a WAL flush per commit, whose time on a shared disk would drown
    # the triggers' few microseconds.
    _execute("SET synchronous_commit = off")
    started = time.perf_counter()
    for _ in range(N):
        submit_job("demo.noop", {})
    submit = (time.perf_counter() - started) / N * 1e6
    analyze()
    # The finishes timed inside Postgres: N one-row UPDATE statements, each
    # firing the statement trigger, in one function call (one transaction).
    _execute(_FINISH_ALL)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_temp.finish_all()")
        finish = cursor.fetchone()[0]
    return submit, finish


def counters(table: Table) -> None:
    variants = ("none", "pid % 16", "pid", "pid + gone rows")
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name in variants:
            with _variant(name):
                times[name].append(_round())
    _execute("DELETE FROM conveyor_counter")
    # Medians of the rounds; the fastest round of each (less disturbed by
    # whatever else the machine runs) in the detail.
    for i, what in enumerate(("submit_job", "finishing UPDATE")):
        medians = {name: statistics.median(t[i] for t in runs) for name, runs in times.items()}
        fastest = {name: min(t[i] for t in runs) for name, runs in times.items()}
        for name in ("pid", "pid + gone rows"):
            table.add(
                f"counters: {what}, shard = {name}",
                "µs",
                medians[name],
                medians["pid % 16"],
                higher_is_better=False,
                detail=f"stock = pid % 16; fastest {fastest[name]:.0f} vs {fastest['pid % 16']:.0f};"
                f" counting off: {medians['none']:.0f} (fastest {fastest['none']:.0f})",
            )
