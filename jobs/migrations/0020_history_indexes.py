from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


def _rewrite(*changes: tuple[str, str]) -> str:
    """Rewrites the attempts' counter trigger function (0009, with 0015's
    enable_nestloop = off, which its definition carries, and 0019's shard):
    each (old, new) fragment of it replaced, and nothing else of it."""
    steps = "\n".join(
        f"""
        IF position($old${old}$old$ IN definition) = 0 THEN
            RAISE EXCEPTION 'conveyor_count_attempts() does not read as expected: %', $old${old}$old$;
        END IF;
        definition := replace(definition, $old${old}$old$, $new${new}$new$);"""
        for old, new in changes
    )
    return f"""
    DO $do$
    DECLARE
        definition text := pg_get_functiondef('conveyor_count_attempts()'::regprocedure);
    BEGIN
        {steps}
        EXECUTE definition;
    END $do$
    """


# Before: a join, which without nested loops is a hash of the whole jobs table
# for every finishing statement (80 ms at 200,000 jobs). After: each counted
# row looks its job up by primary key (a subquery is a subplan, not a join:
# enable_nestloop does not touch it), while the transition tables still join
# by hash (0015's reason for nested loops off).
_JOIN = "FROM counted JOIN jobs_job j ON j.id = counted.job_id"
_LOOKUP = """FROM (
            SELECT counted.*, (SELECT jj.kind FROM jobs_job jj WHERE jj.id = counted.job_id) AS kind,
                   (SELECT jj.queue FROM jobs_job jj WHERE jj.id = counted.job_id) AS queue
            FROM counted
        ) counted CROSS JOIN LATERAL (SELECT counted.kind, counted.queue) j"""
# The duration bucket: the first bound the attempt fits. "ORDER BY b" named the
# output column, b::text, so the bounds were ordered as text ('10' < '2.5'): an
# attempt of 1.5 s was filed under 10 s. An expression orders by the input column.
_TEXT_ORDER = "ORDER BY b LIMIT 1"
_NUMERIC_ORDER = "ORDER BY b::float8 LIMIT 1"


class Migration(migrations.Migration):
    """Indexes the pages need once the jobs table holds millions of finished
    jobs (bench/history.py): the dead-letter queue's groups (counts by an
    index-only scan, each group's newest jobs by a short walk), a batch's
    counts by state (index-only) and its jobs newest first. The batch ones are
    partial: jobs outside a batch pay nothing for them.

    Built CONCURRENTLY, so not in a transaction (atomic = False): on a live
    system with millions of jobs a plain CREATE INDEX would hold off every
    submission and transition for as long as each build takes. A build that
    fails leaves an INVALID index behind; drop it and migrate again.

    And the attempts' counter trigger finds a job by its key instead of
    hashing the whole jobs table (_LOOKUP), and files a duration under the
    first bucket bound it fits numerically, not as text (_NUMERIC_ORDER).
    Counts already in the table stay as they were filed."""

    atomic = False

    dependencies = [("jobs", "0019_counter_shards")]

    operations = [
        migrations.RunSQL(
            _rewrite((_JOIN, _LOOKUP), (_TEXT_ORDER, _NUMERIC_ORDER)),
            _rewrite((_LOOKUP, _JOIN), (_NUMERIC_ORDER, _TEXT_ORDER)),
        ),
        AddIndexConcurrently(
            model_name="job",
            index=models.Index(
                condition=models.Q(("state", "dead")),
                fields=["kind", "error_type", "-finished_at", "-id"],
                name="job_dead_group",
            ),
        ),
        AddIndexConcurrently(
            model_name="job",
            index=models.Index(
                condition=models.Q(("batch__isnull", False)), fields=["batch", "state"], name="job_batch_state"
            ),
        ),
        AddIndexConcurrently(
            model_name="job",
            index=models.Index(
                condition=models.Q(("batch__isnull", False)),
                fields=["batch", "-created_at", "-id"],
                name="job_batch_created_at",
            ),
        ),
    ]
