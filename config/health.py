from __future__ import annotations

from django.db import connection
from django.db.utils import Error as DatabaseError
from django.http import JsonResponse


def healthz(request):
    """200 when this process is alive and the database answers, 503 otherwise."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError as exc:
        return JsonResponse({"status": "error", "database": str(exc).strip()}, status=503)
    return JsonResponse({"status": "ok"})
