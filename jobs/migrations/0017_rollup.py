import django.contrib.postgres.fields
from django.db import migrations, models


class Migration(migrations.Migration):
    """The per-minute rollup of finished attempts behind the 1 h / 24 h / 7 d
    charts and the per-kind table (jobs/engine/rollup.py), and its cursor."""

    dependencies = [("jobs", "0016_job_logs")]

    operations = [
        migrations.CreateModel(
            name="MinuteRollup",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("minute", models.DateTimeField()),
                ("queue", models.CharField(max_length=100)),
                ("kind", models.CharField(max_length=100)),
                ("succeeded", models.IntegerField(default=0)),
                ("failed", models.IntegerField(default=0, help_text="Failed and lost attempts.")),
                ("cancelled", models.IntegerField(default=0)),
                ("run_count", models.IntegerField(default=0)),
                ("run_ms_sum", models.BigIntegerField(default=0)),
                ("run_buckets", django.contrib.postgres.fields.ArrayField(base_field=models.SmallIntegerField(), default=list, size=None)),
                ("run_counts", django.contrib.postgres.fields.ArrayField(base_field=models.IntegerField(), default=list, size=None)),
                ("wait_count", models.IntegerField(default=0, help_text="First attempts: from submission to start.")),
                ("wait_buckets", django.contrib.postgres.fields.ArrayField(base_field=models.SmallIntegerField(), default=list, size=None)),
                ("wait_counts", django.contrib.postgres.fields.ArrayField(base_field=models.IntegerField(), default=list, size=None)),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("minute", "queue", "kind"), name="minuterollup_unique_minute_queue_kind"
                    )
                ],
            },
        ),
        migrations.CreateModel(
            name="RollupCursor",
            fields=[
                ("id", models.SmallIntegerField(default=1, primary_key=True, serialize=False)),
                ("rolled_until", models.DateTimeField()),
            ],
        ),
    ]
