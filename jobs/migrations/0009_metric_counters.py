from django.db import migrations

# Keep in step with jobs.metrics.DURATION_BUCKETS (a bound's label is its text here).
_BUCKETS = "{0.01,0.05,0.1,0.25,0.5,1,2.5,5,10,30,60,120,300,600,1800,3600}"

_FORWARD = [
    # The counters /metrics reports (jobs/metrics.py). Triggers add to them in
    # the transaction of the change that counts, so every process's work is
    # counted exactly once, a rolled-back change not at all, and purging old
    # jobs takes nothing away. `shard` (the writer's backend pid mod 16)
    # spreads concurrent writers over rows: workers finishing jobs of one kind
    # at once do not queue on one row lock. A scrape sums the shards.
    """
    CREATE TABLE conveyor_counter (
        metric text NOT NULL,
        kind text NOT NULL,
        queue text NOT NULL,
        label text NOT NULL,
        shard smallint NOT NULL,
        n bigint NOT NULL DEFAULT 0,
        seconds double precision NOT NULL DEFAULT 0,
        PRIMARY KEY (metric, kind, queue, label, shard)
    ) WITH (fillfactor = 50)
    """,
    # Submitted: once per INSERT statement (a batch is COPYed in at once).
    """
    CREATE FUNCTION conveyor_count_submitted() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO conveyor_counter AS c (metric, kind, queue, label, shard, n)
        SELECT 'submitted', kind, queue, '', pg_backend_pid() % 16, count(*) FROM new_jobs GROUP BY kind, queue
        ON CONFLICT (metric, kind, queue, label, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER conveyor_count_submitted AFTER INSERT ON jobs_job
    REFERENCING NEW TABLE AS new_jobs FOR EACH STATEMENT EXECUTE FUNCTION conveyor_count_submitted()
    """,
    # Finished: active jobs that entered a final state (dead -> discarded is
    # not a second finish). Per statement, not per row: a row trigger would
    # upsert one counter row once per job, and a statement that finishes
    # thousands of jobs in one transaction would pile up that row's versions
    # (quadratic). An UPDATE that finishes nothing (progress, lease renewal)
    # joins two one-row transition tables and writes nothing.
    """
    CREATE FUNCTION conveyor_count_finished() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO conveyor_counter AS c (metric, kind, queue, label, shard, n)
        SELECT 'finished', n.kind, n.queue, n.state, pg_backend_pid() % 16, count(*)
        FROM new_jobs n JOIN old_jobs o ON o.id = n.id
        WHERE o.state IN ('queued', 'scheduled', 'running', 'retrying')
          AND n.state IN ('succeeded', 'dead', 'cancelled', 'discarded')
        GROUP BY n.kind, n.queue, n.state
        ON CONFLICT (metric, kind, queue, label, shard) DO UPDATE SET n = c.n + EXCLUDED.n;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER conveyor_count_finished AFTER UPDATE ON jobs_job
    REFERENCING OLD TABLE AS old_jobs NEW TABLE AS new_jobs FOR EACH STATEMENT
    EXECUTE FUNCTION conveyor_count_finished()
    """,
    # Attempts that ended, by outcome, and the duration histogram of those
    # that ran to an end of their own (succeeded or failed; a lost attempt's
    # "duration" is how long its lease took to expire). One row per bucket,
    # not cumulative: the scrape accumulates.
    f"""
    CREATE FUNCTION conveyor_count_attempts() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        WITH ended AS (
            SELECT n.job_id, n.outcome, greatest(extract(epoch FROM n.finished_at - n.started_at), 0)::float8 AS elapsed
            FROM new_attempts n JOIN old_attempts o ON o.id = n.id
            WHERE o.finished_at IS NULL AND n.finished_at IS NOT NULL
        ), counted AS (
            SELECT job_id, 'attempts' AS metric, outcome AS label, 0::float8 AS seconds FROM ended
            UNION ALL
            SELECT job_id, 'attempt_seconds', coalesce(
                (SELECT b::text FROM unnest('{_BUCKETS}'::float8[]) b WHERE elapsed <= b ORDER BY b LIMIT 1), '+Inf'),
                elapsed
            FROM ended WHERE outcome IN ('succeeded', 'failed')
        )
        INSERT INTO conveyor_counter AS c (metric, kind, queue, label, shard, n, seconds)
        SELECT counted.metric, j.kind, j.queue, counted.label, pg_backend_pid() % 16, count(*), sum(counted.seconds)
        FROM counted JOIN jobs_job j ON j.id = counted.job_id
        GROUP BY counted.metric, j.kind, j.queue, counted.label
        ON CONFLICT (metric, kind, queue, label, shard)
        DO UPDATE SET n = c.n + EXCLUDED.n, seconds = c.seconds + EXCLUDED.seconds;
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER conveyor_count_attempts AFTER UPDATE ON jobs_attempt
    REFERENCING OLD TABLE AS old_attempts NEW TABLE AS new_attempts FOR EACH STATEMENT
    EXECUTE FUNCTION conveyor_count_attempts()
    """,
]

_BACKWARD = [
    "DROP TRIGGER conveyor_count_attempts ON jobs_attempt",
    "DROP FUNCTION conveyor_count_attempts()",
    "DROP TRIGGER conveyor_count_finished ON jobs_job",
    "DROP FUNCTION conveyor_count_finished()",
    "DROP TRIGGER conveyor_count_submitted ON jobs_job",
    "DROP FUNCTION conveyor_count_submitted()",
    "DROP TABLE conveyor_counter",
]


class Migration(migrations.Migration):
    """Database-side counters for /metrics (see jobs/metrics.py). No model:
    only the triggers write the table and only the metrics scrape reads it.
    Counting starts when this migration is applied; jobs already in the
    database are not counted."""

    dependencies = [("jobs", "0008_webhooks")]

    operations = [migrations.RunSQL(_FORWARD, _BACKWARD)]
