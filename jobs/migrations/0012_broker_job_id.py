from django.db import migrations


class Migration(migrations.Migration):
    """Give each of Django-Q2's broker rows the job it names, so a worker can
    claim ready jobs straight through their rows (the lane fills itself, see
    jobs/runner.py `_fill_lane`). Rows written before this, or by code that does
    not know the column, have none; they are only delivered as usual."""

    dependencies = [("jobs", "0011_jobevent_one_job_index")]

    operations = [
        migrations.RunSQL(
            ["ALTER TABLE django_q_ormq ADD COLUMN job_id uuid"],
            ["ALTER TABLE django_q_ormq DROP COLUMN job_id"],
        )
    ]
