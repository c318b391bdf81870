"""Persistence: the Store protocol, its SQLite backend and the blob cache on disk."""

from appliance.store.base import Store
from appliance.store.cache import BlobCache
from appliance.store.sqlite import SqliteStore

__all__ = ["BlobCache", "SqliteStore", "Store"]
