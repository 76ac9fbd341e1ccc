from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("jobs", "0015_queue_controls")]

    operations = [
        migrations.AddField(
            model_name="attempt",
            name="logs",
            field=models.TextField(
                blank=True, default="", help_text="Lines the handler logged (the last 1,000 lines or 64 KiB)."
            ),
        ),
    ]
