from django.db import models


class PageAudit(models.Model):
    """One audit of a page, keyed by the job that made it: a job delivered
    twice (delivery is at least once) writes one row."""

    job_id = models.UUIDField(unique=True)
    url = models.URLField(max_length=2000)
    score = models.PositiveSmallIntegerField()
    problems = models.JSONField(default=list)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.url}: {self.score}"
