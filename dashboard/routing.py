"""The SSE routes, served by Channels consumers (see config/asgi.py)."""

from __future__ import annotations

from django.urls import path

from dashboard.consumers import ApiEventsConsumer, DashboardEventsConsumer

dashboard_events = DashboardEventsConsumer.as_asgi()

http_urlpatterns = [
    path("events/overview", dashboard_events, {"page": "overview"}),
    path("events/jobs", dashboard_events, {"page": "jobs"}),
    path("events/jobs/<uuid:job_id>", dashboard_events, {"page": "job"}),
    path("events/dead-letter", dashboard_events, {"page": "dead-letter"}),
    path("events/batches", dashboard_events, {"page": "batches"}),
    path("events/batches/<uuid:batch_id>", dashboard_events, {"page": "batch"}),
    path("api/v1/events", ApiEventsConsumer.as_asgi()),
]
