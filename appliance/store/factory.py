"""Which store a process opens: the one ``store.url`` names.

| ``store.url``              | store                                                      |
| -------------------------- | ---------------------------------------------------------- |
| unset                      | SQLite, ``<data_dir>/appliance.db``                        |
| ``sqlite:///ABS/PATH.db``  | SQLite, that file                                          |
| ``postgresql://…``         | PostgreSQL: the schema the URL's search_path names (else   |
| (or ``postgres://…``)      | ``public``), which several servers may share               |

The settings have already checked the URL's form (``StoreSettings``).
"""

from __future__ import annotations

from pathlib import Path

from appliance.errors import InvalidSetting, StorageFailure
from appliance.settings import POSTGRES_SCHEMES, Settings
from appliance.store.base import Store
from appliance.store.cache import BlobCache
from appliance.store.sqlite import SqliteStore

__all__ = ["open_data_dir", "open_store"]


def open_data_dir(settings: Settings) -> tuple[BlobCache, Store]:
    """The data dir (made when missing), its blob cache and its store: what a runtime opens first,
    and all ``serve`` checks before it binds its port."""
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageFailure(
            f"cannot create the data dir {settings.data_dir}: {exc.strerror or exc}",
            hint="pass --data-dir or set APPLIANCE_DATA_DIR to a writable directory",
        ) from exc
    cache = BlobCache(settings.data_dir)  # first: it refuses a data dir of a newer layout
    return cache, open_store(settings)


def open_store(settings: Settings) -> Store:
    url = settings.store.url
    if url is None:
        return SqliteStore(settings.data_dir / "appliance.db")
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        return SqliteStore(Path(rest))
    if scheme in POSTGRES_SCHEMES:
        from appliance.store.postgres import PostgresStore  # psycopg only where it is used

        return PostgresStore(url)
    # Settings built without validation (model_construct) can still get here.
    raise InvalidSetting(
        f"store.url: {scheme}:// is not a store", hint="use sqlite:///ABS/PATH.db or postgresql://…"
    )
