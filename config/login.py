"""The answer to a login that django-axes has locked out: the sign-in page
again, saying why and for how long (429 Too Many Requests)."""

from __future__ import annotations

from axes.helpers import get_cool_off
from django.contrib.auth.forms import AuthenticationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render


def locked_out(request: HttpRequest, original_response: HttpResponse | None = None, credentials=None) -> HttpResponse:
    cool_off = get_cool_off(request)
    minutes = max(1, round(cool_off.total_seconds() / 60)) if cool_off else None
    context = {
        "form": AuthenticationForm(request),
        "next": request.POST.get("next", "") or request.GET.get("next", ""),
        "locked_out": True,
        "cool_off_minutes": minutes,
    }
    return render(request, "registration/login.html", context, status=429)
