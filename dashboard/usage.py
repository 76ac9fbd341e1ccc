"""The batch page's token budget form (templates/dashboard/partials/usage.html)."""

from __future__ import annotations

from uuid import UUID

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_POST

from dashboard.views import _operator
from jobs import services


@login_required
@require_POST
def set_budget(request: HttpRequest, batch_id: UUID) -> HttpResponse:
    actor = _operator(request)
    raw = request.POST.get("token_budget", "").strip()
    try:
        budget = None if raw == "" else int(raw)
    except ValueError:
        messages.error(request, f"The token budget must be a whole number of tokens, not {raw[:40]!r}.")
        return redirect("dashboard:batch", batch_id=batch_id)
    try:
        batch = services.set_batch_budget(batch_id, budget, actor=actor)
    except services.BatchNotFound:
        raise Http404("no such batch") from None
    except services.InvalidBatch as exc:
        messages.error(request, f"Token budget {exc.errors[0]['message']}.")
        return redirect("dashboard:batch", batch_id=batch_id)
    if batch.token_budget is None:
        messages.info(request, "The token budget is removed; waiting jobs run now.")
    else:
        messages.info(request, f"The token budget is {batch.token_budget} tokens ({batch.tokens_used} used).")
    return redirect("dashboard:batch", batch_id=batch_id)
