from django.db import migrations


class Migration(migrations.Migration):
    """Give Django-Q2's broker table a priority and the index the Postgres
    broker claims through (see jobs/broker.py). Django-Q2's ORM model does not
    know the column; its default keeps the stock broker working."""

    dependencies = [("jobs", "0003_apikey_batchidempotencykey"), ("django_q", "0019_alter_task_options_alter_ormq_key_alter_ormq_lock_and_more")]

    operations = [
        migrations.RunSQL(
            [
                "ALTER TABLE django_q_ormq ADD COLUMN priority smallint NOT NULL DEFAULT 0",
                "CREATE INDEX conveyor_ormq_claim ON django_q_ormq (key, priority DESC, lock, id)",
                "CREATE INDEX conveyor_ormq_due ON django_q_ormq (key, lock)",
            ],
            [
                "DROP INDEX conveyor_ormq_due",
                "DROP INDEX conveyor_ormq_claim",
                "ALTER TABLE django_q_ormq DROP COLUMN priority",
            ],
        )
    ]
