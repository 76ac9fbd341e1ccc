from django.db import migrations

# The row every compaction folds into (jobs/engine/counters.py).
_FOLDED = -1

_TRIGGER_FUNCTIONS = ("conveyor_count_submitted", "conveyor_count_finished", "conveyor_count_attempts")


def _reshard(old: str, new: str) -> str:
    """Rewrites the three counter trigger functions (0009, with 0015's
    enable_nestloop = off, which their definition carries) to write to the
    shard `new` instead of `old` (SQL expressions), and nothing else of them."""
    names = ", ".join(f"'{name}()'" for name in _TRIGGER_FUNCTIONS)
    return f"""
    DO $do$
    DECLARE
        fn regprocedure;
        definition text;
    BEGIN
        FOREACH fn IN ARRAY ARRAY[{names}]::regprocedure[] LOOP
            definition := pg_get_functiondef(fn);
            IF position('{old}' IN definition) = 0 THEN
                RAISE EXCEPTION '% does not write to the shard %', fn, '{old}';
            END IF;
            EXECUTE replace(definition, '{old}', '{new}');
        END LOOP;
    END $do$
    """


def _regroup(shard: str) -> str:
    """Sums every row into one per counter and `shard` (an SQL expression of
    the row's old shard). The ALTER TABLE or LOCK before it locks the table."""
    return f"""
    WITH gone AS (DELETE FROM conveyor_counter RETURNING *)
    INSERT INTO conveyor_counter (metric, kind, queue, label, shard, n, seconds)
    SELECT metric, kind, queue, label, {shard}, sum(n), sum(seconds)
    FROM gone GROUP BY 1, 2, 3, 4, 5
    """


_FORWARD = [
    # pids do not fit a smallint (Linux allows up to 2^22).
    "ALTER TABLE conveyor_counter ALTER COLUMN shard TYPE integer",
    # The old shards (pid % 16) name no backend: they all become the folded row.
    _regroup(str(_FOLDED)),
    _reshard("pg_backend_pid() % 16", "pg_backend_pid()"),
]

_BACKWARD = [
    "LOCK TABLE conveyor_counter IN ACCESS EXCLUSIVE MODE",
    _regroup("greatest(shard, 0) % 16"),
    "ALTER TABLE conveyor_counter ALTER COLUMN shard TYPE smallint",
    _reshard("pg_backend_pid()", "pg_backend_pid() % 16"),
]


class Migration(migrations.Migration):
    """The metric counters (0009) are sharded by the writer's whole backend
    pid instead of pid % 16. A counter row is locked from its upsert until
    its transaction ends; with pid % 16 one transaction held open after a
    submit (transactional enqueue) or a finish made every other backend of
    the same residue wait for it. A backend runs one transaction at a time, so
    a row of its own pid is never locked by anyone else. The rows of backends
    that have gone are folded into shard -1 (jobs.engine.counters.compact, a
    maintenance schedule); the rows already here are folded there now."""

    dependencies = [("jobs", "0017_rollup")]

    operations = [migrations.RunSQL(_FORWARD, _BACKWARD)]
