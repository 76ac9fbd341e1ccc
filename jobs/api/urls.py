"""/api/: the v1 API, and a problem+json 404 for anything else under /api/."""

from __future__ import annotations

from django.urls import URLPattern, include, path, re_path
from django.views.decorators.csrf import csrf_exempt

from jobs.api.app import api
from jobs.api.problems import ensure_problem, not_found

# Not named app_name: include("jobs.api.urls") would read it as this module's.
_v1_patterns, _v1_app, _v1_namespace = api.urls

urlpatterns = [
    path(
        "v1/",
        include(
            (
                # django-ninja answers some errors itself (405 as text/html):
                # every view is wrapped so that they leave as problems too.
                [URLPattern(p.pattern, ensure_problem(p.callback), p.default_args, p.name) for p in _v1_patterns],
                _v1_app,
            ),
            namespace=_v1_namespace,
        ),
    ),
    re_path(r"", csrf_exempt(not_found)),
]
