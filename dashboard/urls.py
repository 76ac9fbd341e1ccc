from __future__ import annotations

from django.urls import path

from dashboard import content, operations, usage, views, webhooks

app_name = "dashboard"
urlpatterns = [
    path("", views.overview, name="overview"),
    path("jobs/", views.jobs, name="jobs"),
    path("jobs/<uuid:job_id>/", views.job, name="job"),
    path("jobs/cancel", operations.bulk_jobs, {"action": "cancel"}, name="jobs-cancel"),
    path("jobs/retry", operations.bulk_jobs, {"action": "retry"}, name="jobs-retry"),
    path("jobs/<uuid:job_id>/cancel", views.cancel_job, name="cancel-job"),
    path("jobs/<uuid:job_id>/run-now", operations.run_now, name="run-now"),
    path("queues/<str:name>/pause", operations.queue_control, {"action": "pause"}, name="queue-pause"),
    path("queues/<str:name>/resume", operations.queue_control, {"action": "resume"}, name="queue-resume"),
    path("queues/<str:name>/limit", operations.queue_control, {"action": "limit"}, name="queue-limit"),
    path("batches/<uuid:batch_id>/cancel", operations.cancel_batch, name="batch-cancel"),
    path("api-keys/", operations.api_keys, name="api-keys"),
    path("api-keys/<int:key_id>/revoke", operations.revoke_api_key, name="api-key-revoke"),
    path("jobs/<uuid:job_id>/retry", views.retry_job, name="retry-job"),
    path("dead-letter/", views.dead_letter, name="dead-letter"),
    path("dead-letter/retry", views.dead_letter_action, {"action": "retry"}, name="dead-letter-retry"),
    path("dead-letter/discard", views.dead_letter_action, {"action": "discard"}, name="dead-letter-discard"),
    path("submit/", views.submit, name="submit"),
    path("batches/", views.batches, name="batches"),
    path("batches/<uuid:batch_id>/", views.batch, name="batch"),
    path("webhooks/", webhooks.endpoint_list, name="webhooks"),
    path("webhooks/<uuid:endpoint_id>/", webhooks.endpoint_detail, name="webhook"),
    path("webhooks/<uuid:endpoint_id>/rotate", webhooks.rotate_secret, name="webhook-rotate"),
    path("webhooks/<uuid:endpoint_id>/enable", webhooks.set_enabled, {"enabled": True}, name="webhook-enable"),
    path("webhooks/<uuid:endpoint_id>/disable", webhooks.set_enabled, {"enabled": False}, name="webhook-disable"),
    path("webhooks/<uuid:endpoint_id>/delete", webhooks.delete_endpoint, name="webhook-delete"),
    path("webhooks/deliveries/<uuid:delivery_id>/", webhooks.delivery_row, name="webhook-delivery"),
    path("webhooks/deliveries/<uuid:delivery_id>/redeliver", webhooks.redeliver, name="webhook-redeliver"),
    path("batches/<uuid:batch_id>/budget", usage.set_budget, name="batch-budget"),
    path("batches/content/", content.new_content_batch, name="content-new"),
    path("batches/content/preview", content.preview_content_batch, name="content-preview"),
    path("batches/<uuid:batch_id>/content", content.batch_content, name="batch-content"),
    path("batches/<uuid:batch_id>/pages/<slug:slug>/", content.batch_page, name="batch-page"),
    path("batches/<uuid:batch_id>/export.<str:fmt>", content.export_batch, name="batch-export"),
    path("batches/<uuid:batch_id>/retry", content.retry_batch_jobs, name="batch-retry"),
]
