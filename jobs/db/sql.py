"""Hot-path statements as server-side prepared statements.

Django sends every query as text with its parameters merged in, so Postgres
parses and plans it each time. The statements a job runs through (submit,
claim, progress, finish, the broker's claim and acknowledgement, the provider
slots) are a handful of fixed texts, run thousands of times per connection,
and planning the claim's five CTEs costs Postgres more than running them.
`cursor()` binds parameters server-side and prepares each text once per
connection (psycopg keeps the names, at most `prepared_max` per connection).
The cursor class overrides a Django internal, so it lives with the other
patches in config/server/prepared_cursor.py.

It is a Django cursor in every other way: errors become Django's, the
connection's transaction applies, and queries are logged when Django logs
them. `CONVEYOR_PREPARED_STATEMENTS=0` falls back to Django's cursor.

Parameters are bound with their Python types, so a text that Postgres must
read as another type says so in SQL (`%s::jsonb`), as it already must for
Django's client-side binding wherever the context does not tell.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.utils import CursorWrapper

from config.server import prepared_cursor

if TYPE_CHECKING:
    from django.db.models import Model

    from jobs.models import Job


class Sql:
    """A SET value or condition written as SQL (e.g. `Sql("attempts + 1")`)
    rather than a parameter."""

    def __init__(self, expression: str, *params: Any) -> None:
        self.expression = expression
        self.params = list(params)


def cursor() -> CursorWrapper:
    """A cursor of the current thread's Django connection whose statements
    are prepared (use as `with sql.cursor() as cursor:`)."""
    db = connections[DEFAULT_DB_ALIAS]  # the proxy `connection` costs a lookup per attribute
    if settings.CONVEYOR["PREPARED_STATEMENTS"] and db.vendor == "postgresql":
        # None on a Django the patch was not written for: Django's cursor then.
        wrapper = prepared_cursor.prepared(db)
        if wrapper is not None:
            return wrapper
    return db.cursor()


@functools.cache
def literals(values: tuple[str, ...]) -> str:
    """`values` as SQL string literals, comma-separated. Literals rather than
    an array parameter: psycopg builds a list dumper per array parameter and
    execution. (standard_conforming_strings is on.)"""
    return ", ".join("'" + value.replace("'", "''") + "'" for value in values)


def by_id(column: str) -> str:
    """`column` in a condition of a statement that finds its rows by primary
    key (a batch of job ids), written so that no index on the column matches
    it (`state || ''`). Postgres otherwise trusted statistics from before a
    burst (autovacuum analyzes a minute or more after one): "1 running job",
    so it walked the state index over every running job, hundreds, and joined
    the ids to them in each statement, instead of one lookup per id."""
    return f"({column} || '')"


def fetchone(statement: str, params: list[Any] | tuple[Any, ...]) -> tuple | None:
    """The statement's first row (or None), prepared, through a cursor the
    connection keeps for these calls (config/server/prepared_cursor.py)."""
    db = connections[DEFAULT_DB_ALIAS]
    if settings.CONVEYOR["PREPARED_STATEMENTS"] and db.vendor == "postgresql" and prepared_cursor.available():
        return prepared_cursor.fetchone(db, statement, params)
    with cursor() as c:
        c.execute(statement, params)
        return c.fetchone()


# --- rows of the jobs table -------------------------------------------------


@functools.cache
def model_columns(model: type[Model]) -> tuple[str, list[str], list[tuple[int, Any, list[Callable]]]]:
    """The model's table columns in field order, the fields' attribute names,
    and the converters Django's ORM applies to what those columns return
    (by position, for the fields that have any)."""
    fields = model._meta.concrete_fields
    converters = []
    for position, field in enumerate(fields):
        col = field.get_col(model._meta.db_table)
        found = connection.ops.get_db_converters(col) + col.get_db_converters(connection)
        if found:
            converters.append((position, col, found))
    columns = ", ".join(connection.ops.quote_name(field.column) for field in fields)
    return columns, [field.attname for field in fields], converters


def model_from_row(model: type[Model], row: tuple) -> Model:
    """An instance from a row that starts with `model_columns(model)`, as the ORM builds it."""
    _, names, converters = model_columns(model)
    db = connections[DEFAULT_DB_ALIAS]
    values = list(row[: len(names)])
    for position, col, found in converters:
        for convert in found:
            values[position] = convert(values[position], col, db)
    return model.from_db(DEFAULT_DB_ALIAS, names, values)


def job_columns() -> tuple[str, list[str], list[tuple[int, Any, list[Callable]]]]:
    """`model_columns(Job)`."""
    from jobs.models import Job

    return model_columns(Job)


def job_from_row(row: tuple) -> Job:
    """A Job from a row that starts with `job_columns()`, as the ORM builds it."""
    from jobs.models import Job

    return model_from_row(Job, row)
