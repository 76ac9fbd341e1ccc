from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from jobs import services


@login_required
def overview(request):
    return render(request, "dashboard/overview.html", {"queues": services.queue_stats(always=["default"])})
