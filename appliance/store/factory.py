"""Which store a process opens: the one ``store.url`` names.

| ``store.url``              | store                                                |
| -------------------------- | ---------------------------------------------------- |
| unset                      | SQLite, ``<data_dir>/appliance.db``                  |
| ``sqlite:///ABS/PATH.db``  | SQLite, that file                                    |
| ``postgresql://…``         | refused: this build has no PostgreSQL backend yet    |

The settings have already checked the URL's form (``StoreSettings``).
"""

from __future__ import annotations

from pathlib import Path

from appliance.errors import InvalidSetting
from appliance.settings import POSTGRES_SCHEMES, Settings
from appliance.store.base import Store
from appliance.store.sqlite import SqliteStore

__all__ = ["open_store"]


def open_store(settings: Settings) -> Store:
    url = settings.store.url
    if url is None:
        return SqliteStore(settings.data_dir / "appliance.db")
    scheme, _, rest = url.partition("://")
    if scheme == "sqlite":
        return SqliteStore(Path(rest))
    if scheme in POSTGRES_SCHEMES:
        raise InvalidSetting(
            "store.url names a PostgreSQL database, and this build has no PostgreSQL backend yet",
            hint="unset store.url (APPLIANCE_STORE__URL) to use the SQLite file in the data dir,"
            " or set it to sqlite:///ABS/PATH.db",
        )
    # Settings built without validation (model_construct) can still get here.
    raise InvalidSetting(f"store.url: {scheme}:// is not a store", hint="use sqlite:///ABS/PATH.db")
