"""The submit form: payload fields generated from the kind's JSON schema
(`handler.schema.model_json_schema()`), and the job options."""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

from django import forms

from jobs.content.service import MAX_CSV_BYTES, MAX_PAGES

# Schema types a plain input can edit; anything else (objects, arrays,
# unions of several types) is edited as JSON.
_SIMPLE = {"string", "integer", "number", "boolean"}


class PayloadForm(forms.Form):
    """Built by `payload_form`; `payload()` returns the cleaned payload dict."""

    schema: dict[str, Any] = {}

    def payload(self) -> dict[str, Any]:
        payload = {}
        for name, value in self.cleaned_data.items():
            field = self.fields[name]
            # A blank optional field is left out, so the schema's default applies.
            if value in (None, "") and not field.required:
                continue
            payload[name] = value
        return payload


def payload_form(schema: dict[str, Any], data=None) -> PayloadForm:
    fields = {}
    required = set(schema.get("required", []))
    defs = schema.get("$defs", {})
    for name, prop in schema.get("properties", {}).items():
        fields[name] = _field(name, _resolve(prop, defs), required=name in required)
    form_class = type("PayloadForm", (PayloadForm,), {**fields, "schema": schema})
    return form_class(data, prefix="payload")


def _resolve(prop: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref and unwrap `X | None` (pydantic's anyOf with null)."""
    if "$ref" in prop:
        prop = {**defs.get(prop["$ref"].rsplit("/", 1)[-1], {}), **{k: v for k, v in prop.items() if k != "$ref"}}
    options = prop.get("anyOf")
    if options:
        non_null = [o for o in options if o.get("type") != "null"]
        if len(non_null) == 1 and len(options) == 2:
            inner = _resolve(non_null[0], defs)
            return {**inner, **{k: v for k, v in prop.items() if k != "anyOf"}, "nullable": True}
    return prop


def _field(name: str, prop: dict[str, Any], *, required: bool) -> forms.Field:
    label = prop.get("title") or name.replace("_", " ").capitalize()
    help_text = prop.get("description", "")
    default = prop.get("default")
    common = {"label": label, "help_text": help_text, "required": required and "default" not in prop}
    if default is not None:
        common["initial"] = default
    kind = prop.get("type")
    if "enum" in prop or "const" in prop:
        values = prop.get("enum") or [prop["const"]]
        choices = [(json.dumps(v) if not isinstance(v, str) else v, str(v)) for v in values]
        if not common["required"]:
            choices = [("", "— default —" if default is None else f"— default ({default}) —"), *choices]
        field: forms.Field = forms.TypedChoiceField(
            choices=choices, coerce=lambda v, values=values: _enum_value(v, values), empty_value=None, **common
        )
        if default is not None:
            field.initial = default if isinstance(default, str) else json.dumps(default)
        return field
    if kind == "boolean":
        common["required"] = False
        return forms.BooleanField(**common)
    if kind == "integer":
        return forms.IntegerField(min_value=prop.get("minimum"), max_value=prop.get("maximum"), **common)
    if kind == "number":
        field = forms.FloatField(min_value=prop.get("minimum"), max_value=prop.get("maximum"), **common)
        field.widget.attrs["step"] = "any"
        return field
    if kind == "string" and prop.get("format") == "date-time":
        return forms.DateTimeField(widget=forms.DateTimeInput(attrs={"type": "datetime-local"}), **common)
    if kind == "string" and prop.get("format") in ("uri", "url"):
        return forms.URLField(max_length=prop.get("maxLength"), assume_scheme="https", **common)
    if kind == "string":
        max_length = prop.get("maxLength")
        widget = forms.Textarea(attrs={"rows": 3}) if max_length is None or max_length > 200 else None
        return forms.CharField(
            max_length=max_length, min_length=prop.get("minLength"), widget=widget, strip=False, **common
        )
    # Objects, arrays and anything else: JSON.
    common["help_text"] = (help_text + " " if help_text else "") + "JSON."
    return forms.JSONField(widget=forms.Textarea(attrs={"rows": 4, "class": "code"}), **common)


def _enum_value(value: str, values: list[Any]) -> Any:
    for option in values:
        if (option if isinstance(option, str) else json.dumps(option)) == value:
            return option
    raise forms.ValidationError("Select one of the choices.")


class OptionsForm(forms.Form):
    """How to run the job, beyond its payload."""

    queue = forms.CharField(max_length=100, required=False, help_text="Default: the kind's queue.")
    priority = forms.IntegerField(
        min_value=-1000, max_value=1000, required=False, initial=0, help_text="Higher runs first."
    )
    max_attempts = forms.IntegerField(min_value=1, max_value=50, required=False)
    run_after = forms.DateTimeField(
        required=False,
        label="Run after (UTC)",
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S"],
        help_text="Leave empty to run now.",
    )
    idempotency_key = forms.CharField(
        max_length=255, required=False, help_text="Submitting again with the same key returns the same job."
    )

    def clean_run_after(self):
        value = self.cleaned_data.get("run_after")
        # The form says UTC, whatever the server's time zone.
        return value.astimezone(UTC) if value else None

    def submit_options(self) -> dict[str, Any]:
        data = self.cleaned_data
        options: dict[str, Any] = {"priority": data.get("priority") or 0}
        for name in ("queue", "max_attempts", "run_after", "idempotency_key"):
            if data.get(name) not in (None, ""):
                options[name] = data[name]
        return options


class ContentBatchForm(forms.Form):
    """A content batch: a CSV of keywords (uploaded or pasted) and a prompt
    template. The checks that matter are `jobs.content.service.plan_content`'s; its
    errors land on these fields through `add_plan_errors`."""

    name = forms.CharField(max_length=200, required=False, help_text="Required to submit.")
    file = forms.FileField(
        required=False,
        label="CSV file",
        help_text="UTF-8, one row per page: a keyword column and every column the template names; "
        f"at most {MAX_PAGES:,} rows.",
    )
    csv_text = forms.CharField(
        required=False,
        label="…or paste the CSV",
        strip=False,
        widget=forms.Textarea(attrs={"rows": 4, "class": "code", "spellcheck": "false"}),
    )
    template = forms.CharField(
        required=False,
        label="Prompt template",
        strip=False,
        widget=forms.Textarea(attrs={"rows": 5}),
        help_text="{keyword} and any other column in braces is filled from each row.",
    )
    provider = forms.ChoiceField(required=False, choices=())
    model = forms.CharField(max_length=200, required=False, help_text="Default: the provider's default model.")
    callback_url = forms.URLField(
        required=False,
        max_length=2000,
        assume_scheme="https",
        label="Callback URL",
        help_text="Called when the batch finishes.",
    )

    def __init__(self, *args, providers: list[str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        default = providers[0] if providers else "none configured"
        self.fields["provider"].choices = [("", f"default ({default})"), *((p, p) for p in providers)]

    def csv_data(self) -> bytes | str | None:
        """The uploaded file's bytes, else the pasted text, else None."""
        upload = self.cleaned_data.get("file")
        if upload is not None:
            upload.seek(0)  # read again for the submission after the plan
            return upload.read()
        return self.cleaned_data.get("csv_text") or None

    def clean_file(self):
        upload = self.cleaned_data.get("file")
        if upload is not None and upload.size > MAX_CSV_BYTES:
            raise forms.ValidationError(f"is over {MAX_CSV_BYTES // (1024 * 1024)} MiB")
        return upload

    def add_plan_errors(self, errors: list[dict[str, str]]) -> None:
        """Each error next to its field; a row's errors next to the CSV."""
        for error in errors:
            field, message = error["field"], error["message"]
            if field in self.fields:
                self.add_error(field, message)
            else:
                self.add_error("file", f"{field}: {message}")
