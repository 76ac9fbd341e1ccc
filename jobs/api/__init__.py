"""The REST API, /api/v1/ (django-ninja): `api` is the NinjaAPI, `urls.py` mounts it."""

from jobs.api.app import api

__all__ = ["api"]
