from __future__ import annotations

from django.urls import path

from dashboard import content, views

app_name = "dashboard"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/<uuid:job_id>/", views.job, name="job"),
    path("jobs/<uuid:job_id>/cancel", views.cancel_job, name="cancel-job"),
    path("jobs/<uuid:job_id>/retry", views.retry_job, name="retry-job"),
    path("dead-letter/", views.dead_letter, name="dead-letter"),
    path("dead-letter/retry", views.dead_letter_action, {"action": "retry"}, name="dead-letter-retry"),
    path("dead-letter/discard", views.dead_letter_action, {"action": "discard"}, name="dead-letter-discard"),
    path("submit/", views.submit, name="submit"),
    path("batches/", views.batches, name="batches"),
    path("batches/<uuid:batch_id>/", views.batch, name="batch"),
    path("batches/content/", content.new_content_batch, name="content-new"),
    path("batches/content/preview", content.preview_content_batch, name="content-preview"),
    path("batches/<uuid:batch_id>/content", content.batch_content, name="batch-content"),
    path("batches/<uuid:batch_id>/pages/<slug:slug>/", content.batch_page, name="batch-page"),
    path("batches/<uuid:batch_id>/export.<str:fmt>", content.export_batch, name="batch-export"),
    path("batches/<uuid:batch_id>/retry", content.retry_batch_jobs, name="batch-retry"),
]
