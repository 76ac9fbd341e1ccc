from django.db import migrations, models


class Migration(migrations.Migration):
    """Operator controls of a queue: paused, a concurrency limit, and the
    places (slots) its running jobs hold under that limit.

    And: the metric counters' statement triggers (0009) join their two
    transition tables, which the planner takes for one row each; a statement
    that changes 10,000 jobs (a bulk cancel or retry) then ran a nested loop
    of 10,000 x 10,000 rows, tens of seconds. They plan without nested loops."""

    dependencies = [("jobs", "0014_workflows")]

    operations = [
        migrations.CreateModel(
            name="QueueControl",
            fields=[
                ("name", models.CharField(max_length=100, primary_key=True, serialize=False)),
                ("paused", models.BooleanField(default=False)),
                ("max_running", models.PositiveIntegerField(blank=True, null=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
            ],
            options={
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("max_running__isnull", True), ("max_running__gte", 1), _connector="OR"),
                        name="queuecontrol_max_running_min",
                    )
                ]
            },
        ),
        migrations.CreateModel(
            name="QueueSlot",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("queue", models.CharField(max_length=100)),
                ("slot", models.PositiveIntegerField()),
                ("job_id", models.UUIDField(blank=True, null=True)),
                ("taken_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={"constraints": [models.UniqueConstraint(fields=("queue", "slot"), name="queueslot_unique")]},
        ),
        migrations.RunSQL(
            [
                "ALTER FUNCTION conveyor_count_finished() SET enable_nestloop = off",
                "ALTER FUNCTION conveyor_count_attempts() SET enable_nestloop = off",
            ],
            [
                "ALTER FUNCTION conveyor_count_finished() RESET enable_nestloop",
                "ALTER FUNCTION conveyor_count_attempts() RESET enable_nestloop",
            ],
        ),
    ]
