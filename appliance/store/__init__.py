"""Persistence: the Store protocol, its SQLite and PostgreSQL backends, the factory that picks one, and
the blob cache.

The names are loaded on first use: a command that only reads ``appliance.store.base`` (the CLI's
``--help`` does) should not pay for the database drivers and the settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.store.base import Store
    from appliance.store.cache import BlobCache
    from appliance.store.factory import open_store
    from appliance.store.postgres import PostgresStore
    from appliance.store.sqlite import SqliteStore

__all__ = ["BlobCache", "PostgresStore", "SqliteStore", "Store", "open_store"]

_HOMES = {
    "BlobCache": "appliance.store.cache",
    "PostgresStore": "appliance.store.postgres",
    "SqliteStore": "appliance.store.sqlite",
    "Store": "appliance.store.base",
    "open_store": "appliance.store.factory",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
