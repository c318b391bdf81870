"""Persistence: the Store protocol, its SQLite backend, the factory that picks one, and the blob cache."""

from appliance.store.base import Store
from appliance.store.cache import BlobCache
from appliance.store.factory import open_store
from appliance.store.sqlite import SqliteStore

__all__ = ["BlobCache", "SqliteStore", "Store", "open_store"]
