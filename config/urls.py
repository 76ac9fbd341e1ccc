from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

from config import health

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/", include("jobs.api.urls")),
    path("simulated/v1/", include("jobs.llm.urls")),
    path("", include("dashboard.urls")),
]
