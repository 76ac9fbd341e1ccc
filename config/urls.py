from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from config import health
from jobs.metrics import metrics_view

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/", include("jobs.api.urls")),
    path("simulated/v1/", include("config.simulator.urls")),
    path("", include("dashboard.urls")),
]
