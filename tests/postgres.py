"""A PostgreSQL schema of its own for a test: the tests of the PostgreSQL store and of several
servers on one database use it. The schema is named in the URL's ``search_path`` (so every
connection a store opens lands in it) and dropped after the test. Where no PostgreSQL is
reachable, the tests that need one skip and say why; CI has one on loopback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from urllib.parse import quote

import psycopg
import pytest

# The server the tests use: the machine's own on loopback (user postgres, database test, trust).
# Not an APPLIANCE_* variable: the tests clear those before this module is imported.
SERVER_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@cache
def unreachable_reason() -> str | None:
    """Why no test can reach PostgreSQL at SERVER_URL, or None when it can."""
    try:
        with psycopg.connect(SERVER_URL, connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"no PostgreSQL reachable at {SERVER_URL}: {str(exc).strip() or type(exc).__name__}"
    return None


def schema_url(schema: str) -> str:
    """SERVER_URL, with every connection's search_path set to ``schema``."""
    separator = "&" if "?" in SERVER_URL else "?"
    return f"{SERVER_URL}{separator}options={quote(f'-csearch_path={schema}')}"


@contextmanager
def fresh_schema() -> Iterator[str]:
    """A new, empty schema's URL; the schema (and all in it) is dropped afterwards."""
    reason = unreachable_reason()
    if reason is not None:
        pytest.skip(reason)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(SERVER_URL, autocommit=True) as connection:
        connection.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema_url(schema)
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as connection:
            connection.execute(f'DROP SCHEMA "{schema}" CASCADE')
