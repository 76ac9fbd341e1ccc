"""The NinjaAPI of /api/v1/ and its OpenAPI document."""

from __future__ import annotations

from typing import Any

from ninja import NinjaAPI
from pydantic import BaseModel

from jobs import services
from jobs.api import problems
from jobs.api.content import router as content_router
from jobs.api.parsing import ApiParser
from jobs.api.schedules import router as schedules_router
from jobs.api.schemas import BatchCsvForm, BatchIn, ProblemOut
from jobs.api.views import router
from jobs.api.webhooks import router as webhooks_router

DESCRIPTION = """\
Submit and watch Conveyor jobs.

Authenticate with `Authorization: Bearer <API key>` (`manage.py createapikey`),
or with a dashboard login session (unsafe methods then need the CSRF token in
`X-CSRFToken`). Every error is `application/problem+json` (RFC 9457); times
are UTC ISO 8601; lists are pages, newest first, with an opaque `next_cursor`.
"""


class ConveyorAPI(NinjaAPI):
    def get_openapi_schema(self, *args: Any, **kwargs: Any):
        schema = super().get_openapi_schema(*args, **kwargs)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # Referenced from the hand-written parts of operations (problem
        # responses, the batch body), which django-ninja does not collect.
        for model in (ProblemOut, BatchIn):
            _add_component(components, model)
        upload = BatchCsvForm.model_json_schema(ref_template="#/components/schemas/{model}")
        upload["title"] = "BatchCsvUpload"
        upload["properties"]["file"] = {"type": "string", "format": "binary", "description": "The CSV file."}
        upload["required"] = [*upload.get("required", []), "file"]
        components["BatchCsvUpload"] = upload
        _describe_kinds(components)
        return schema


def _describe_kinds(components: dict[str, Any]) -> None:
    """List the kinds a client may submit, read from the registry when the
    document is asked for: an app's own kinds (CONVEYOR_APPS) are there too."""
    kind = components.get("JobIn", {}).get("properties", {}).get("kind")
    if kind is None:
        return
    lines = [f"- `{h.kind}`" + (f": {h.description}" if h.description else "") for h in services.client_handlers()]
    kind["description"] = "The job kind; its payload schema is checked at submission. Kinds:\n\n" + "\n".join(lines)


def _add_component(components: dict[str, Any], model: type[BaseModel]) -> None:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components.setdefault(model.__name__, schema)


api = ConveyorAPI(
    title="Conveyor API",
    version="1",
    description=DESCRIPTION,
    urls_namespace="api-v1",
    parser=ApiParser(),
)
problems.install(api)
# Before `router`: its /batches/{batch_id} would otherwise take /batches/content.
api.add_router("", content_router)
api.add_router("", router)
api.add_router("", webhooks_router)
api.add_router("", schedules_router)
