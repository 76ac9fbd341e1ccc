import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    """JobEvent.job loses its own index: `jobevent_job_id` (job, id) serves every
    lookup by job, and each index is one more write per event. Only the index
    is dropped; Django's AlterField would drop and re-add the foreign key too,
    which re-checks every row of the event log."""

    dependencies = [
        ("jobs", "0010_llm_limits_usage"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    'DROP INDEX IF EXISTS "jobs_jobevent_job_id_79067df7"',
                    'CREATE INDEX IF NOT EXISTS "jobs_jobevent_job_id_79067df7" ON "jobs_jobevent" ("job_id")',
                ),
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="jobevent",
                    name="job",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="events",
                        to="jobs.job",
                    ),
                ),
            ],
        ),
    ]
