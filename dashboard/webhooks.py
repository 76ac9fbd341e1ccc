"""The dashboard's webhook pages: endpoints (list, create, rotate, enable,
disable, delete), an endpoint's deliveries, and Redeliver, which the job and
batch pages use too.

Everyone signed in may look; changes need `jobs.operate_job` (as for jobs).
A secret is rendered once, in the answer to the POST that created or rotated
it, never stored anywhere else (no session, no message) and never shown again.
"""

from __future__ import annotations

from uuid import UUID

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_http_methods, require_POST
from django_htmx.http import HttpResponseClientRedirect

from dashboard import queries
from dashboard.permissions import can_operate, owner_of
from jobs import services
from jobs.errors import InvalidState
from jobs.models import WebhookDelivery, WebhookEndpoint

RECENT = 5  # deliveries shown with each endpoint on the list
DELIVERIES = 50  # deliveries on an endpoint's page


class EndpointForm(forms.Form):
    url = forms.CharField(
        label="URL",
        max_length=2000,
        widget=forms.URLInput(attrs={"placeholder": "https://example.com/hooks/conveyor"}),
        help_text="http or https; it must resolve to a public address.",
    )
    event_types = forms.MultipleChoiceField(
        label="Event types",
        choices=[(name, name) for name in services.WEBHOOK_EVENT_TYPES],
        widget=forms.CheckboxSelectMultiple,
    )
    description = forms.CharField(max_length=200, required=False)

    def add_engine_errors(self, errors: list[dict[str, str]]) -> None:
        """Put `InvalidEndpoint`'s errors next to the fields they name ("event_types[1]" too)."""
        for error in errors:
            name = error["field"].split("[", 1)[0]
            self.add_error(name if name in self.fields else None, error["message"])


# --- pages -----------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def endpoint_list(request: HttpRequest) -> HttpResponse:
    """The endpoints; operators create one here (POST)."""
    form = EndpointForm()
    if request.method == "POST":
        _operator(request)
        form = EndpointForm(request.POST)
        if form.is_valid():
            try:
                created = services.create_endpoint(
                    owner=owner_of(request.user),
                    url=form.cleaned_data["url"],
                    event_types=form.cleaned_data["event_types"],
                    description=form.cleaned_data["description"],
                )
            except services.InvalidEndpoint as exc:
                form.add_engine_errors(exc.errors)
            else:
                return _secret_page(request, created.endpoint, created.secret, created=True)
    found = services.list_endpoints()
    recent = services.recent_deliveries([e.id for e in found], per_endpoint=RECENT)
    response = _page(
        request,
        "dashboard/webhooks.html",
        {"endpoints": [(e, recent.get(e.id, [])) for e in found], "form": form},
        title="Webhooks",
    )
    if form.errors:
        response.status_code = 422
    return response


@login_required
def endpoint_detail(request: HttpRequest, endpoint_id: UUID) -> HttpResponse:
    return _endpoint_page(request, _get_endpoint(endpoint_id))


def _endpoint_page(
    request: HttpRequest, endpoint: WebhookEndpoint, *, secret: str = "", created: bool = False
) -> HttpResponse:
    context = {
        "endpoint": endpoint,
        "deliveries": services.endpoint_deliveries(endpoint.id, limit=DELIVERIES),
        "secret": secret,
        "created": created,
        "on_detail": True,
    }
    return _page(request, "dashboard/webhook.html", context, title=f"Webhook {endpoint.url}")


def _secret_page(request: HttpRequest, endpoint: WebhookEndpoint, secret: str, *, created: bool) -> HttpResponse:
    """The endpoint's page showing `secret`, the one time it is ever shown.

    It is the POST's own answer, not a redirect: a redirect would need the
    secret kept somewhere (session, message) until the next request."""
    response = _endpoint_page(request, endpoint, secret=secret, created=created)
    if created:
        response.status_code = 201
    add_never_cache_headers(response)  # nor kept in the browser's cache
    return response


@login_required
def delivery_row(request: HttpRequest, delivery_id: UUID) -> HttpResponse:
    """One delivery's row (pending rows poll it until they settle)."""
    return _delivery_row(request, _get_delivery(delivery_id))


# --- actions -------------------------------------------------------------------


@login_required
@require_POST
def rotate_secret(request: HttpRequest, endpoint_id: UUID) -> HttpResponse:
    _operator(request)
    endpoint = _get_endpoint(endpoint_id)
    rotated = services.rotate_endpoint_secret(endpoint.id)
    endpoint.refresh_from_db()
    if request.htmx:
        secret = render_to_string(
            "dashboard/partials/webhooks.html#endpoint-secret",
            {"endpoint": endpoint, "secret": rotated.secret, "oob": True},
            request=request,
        )
        response = HttpResponse(secret + _endpoint_fragment(request, endpoint))
        add_never_cache_headers(response)
        return response
    return _secret_page(request, endpoint, rotated.secret, created=False)


@login_required
@require_POST
def set_enabled(request: HttpRequest, endpoint_id: UUID, *, enabled: bool) -> HttpResponse:
    _operator(request)
    endpoint = _get_endpoint(endpoint_id)
    if enabled:
        endpoint = services.enable_endpoint(endpoint.id)
        text = f"Enabled {endpoint.url}: it gets the messages of jobs that finish from now on."
    else:
        endpoint = services.disable_endpoint(endpoint.id, reason=f"disabled by {request.user.get_username()}")
        text = f"Disabled {endpoint.url}: its pending messages end unsent."
    if request.htmx:
        return HttpResponse(_endpoint_fragment(request, endpoint) + _notice(text))
    messages.info(request, text)
    if _on_detail(request):
        return redirect("dashboard:webhook", endpoint.id)
    return redirect("dashboard:webhooks")


@login_required
@require_POST
def delete_endpoint(request: HttpRequest, endpoint_id: UUID) -> HttpResponse:
    _operator(request)
    endpoint = _get_endpoint(endpoint_id)
    services.delete_endpoint(endpoint.id)
    messages.info(request, f"Deleted the endpoint {endpoint.url} and its delivery history.")
    if request.htmx:
        return HttpResponseClientRedirect(reverse("dashboard:webhooks"))
    return redirect("dashboard:webhooks")


@login_required
@require_POST
def redeliver(request: HttpRequest, delivery_id: UUID) -> HttpResponse:
    """Send a message again with the same webhook-id (a new `webhook.deliver` job)."""
    _operator(request)
    delivery = _get_delivery(delivery_id)
    level = "info"
    try:
        delivery = services.redeliver(delivery.id)
        text = f"Redelivering {delivery.message_id} to {delivery.url}."
    except InvalidState as exc:
        text, level = exc.message, "error"
    if request.htmx:
        response = _delivery_row(request, delivery)
        response.content += _notice(text, level=level).encode()
        return response
    messages.add_message(request, messages.ERROR if level == "error" else messages.INFO, text)
    if _on_detail(request):
        return redirect("dashboard:webhook", delivery.endpoint_id)
    return redirect(_page_of(delivery))


# --- helpers -------------------------------------------------------------------


def _page(request: HttpRequest, template: str, context: dict, *, title: str) -> HttpResponse:
    context = {
        "page_title": title,
        "nav": "webhooks",
        "stream_url": None,
        "dead_count": queries.dead_total(),
        "can_operate": can_operate(request.user),
        **context,
    }
    return render(request, template, context)


def _operator(request: HttpRequest) -> None:
    if not can_operate(request.user):
        raise PermissionDenied("You may look, not act: changing webhooks needs the jobs.operate_job permission.")


def _get_endpoint(endpoint_id: UUID) -> WebhookEndpoint:
    try:
        return services.get_endpoint(endpoint_id)
    except services.EndpointNotFound:
        raise Http404("no such webhook endpoint") from None


def _get_delivery(delivery_id: UUID) -> WebhookDelivery:
    try:
        return services.get_delivery(delivery_id)
    except services.DeliveryNotFound:
        raise Http404("no such webhook delivery") from None


def _endpoint_fragment(request: HttpRequest, endpoint: WebhookEndpoint) -> str:
    """The endpoint's card, as the list and its own page show it."""
    on_detail = _on_detail(request)
    recent = [] if on_detail else services.recent_deliveries([endpoint.id], per_endpoint=RECENT).get(endpoint.id, [])
    context = {
        "endpoint": endpoint,
        "recent": recent,
        "on_detail": on_detail,
        "can_operate": can_operate(request.user),
    }
    return render_to_string("dashboard/partials/webhooks.html#endpoint", context, request=request)


def _delivery_row(request: HttpRequest, delivery: WebhookDelivery) -> HttpResponse:
    context = {"delivery": delivery, "can_operate": can_operate(request.user), "on_detail": _on_detail(request)}
    return render(request, "dashboard/partials/webhooks.html#delivery-row", context)


def _notice(text: str, *, level: str = "info") -> str:
    return render_to_string("dashboard/partials/chrome.html#notice", {"notice": text, "level": level, "oob": True})


def _page_of(delivery: WebhookDelivery) -> str:
    """The page a delivery is listed on: its job's, its batch's or its endpoint's."""
    if delivery.job_id:
        return reverse("dashboard:job", args=[delivery.job_id])
    if delivery.batch_id:
        return reverse("dashboard:batch", args=[delivery.batch_id])
    return reverse("dashboard:webhook", args=[delivery.endpoint_id])


def _on_detail(request: HttpRequest) -> bool:
    """Whether the control was on the endpoint's own page (`on=detail`), not the list or a job's page."""
    return (request.POST.get("on") or request.GET.get("on")) == "detail"
