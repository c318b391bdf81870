"""Preferences: typed keys, read with effective(); the preference wins, else the setting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from appliance.audit import Context
from appliance.errors import InvalidSetting
from appliance.preferences import (
    EDITABLE,
    EVICT_POLICY,
    MAX_BYTES,
    OFFLINE,
    Key,
    PreferenceService,
)
from appliance.settings import Settings
from appliance.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(tmp_path / "appliance.db")
    yield opened
    opened.close()


def test_effective_is_the_preference_else_the_setting(settings: Settings, store: SqliteStore) -> None:
    preferences = PreferenceService(settings, store)
    assert preferences.effective(MAX_BYTES) is None
    assert preferences.effective(EVICT_POLICY) == "lru"
    preferences.set("models.cache.max_bytes", "2GB", Context(actor="admin"))
    preferences.set("models.cache.evict_policy", "none", Context(actor="admin"))
    assert preferences.effective(MAX_BYTES) == 2_000_000_000
    assert preferences.effective(EVICT_POLICY) == "none"
    preferences.set("models.cache.max_bytes", None, Context(actor="admin"))
    assert preferences.effective(MAX_BYTES) is None


def test_every_key_names_a_setting(settings: Settings) -> None:
    for key in EDITABLE.values():
        key.setting(settings)
    misspelt: Key[int] = Key("models.cache.max_byte", TypeAdapter(int), "a typo")
    with pytest.raises(AttributeError, match="max_byte"):
        misspelt.setting(settings)


def test_a_stored_preference_never_turns_offline_mode_off(data_dir: Path, store: SqliteStore) -> None:
    preferences = PreferenceService(Settings(data_dir=data_dir, offline=True), store)
    preferences.set("offline", False, Context(actor="admin"))
    assert preferences.effective(OFFLINE) is True
    listed = {preference.key: preference for preference in preferences.list()}
    assert (listed["offline"].value, listed["offline"].overridden) == (True, True)  # what is in effect


def test_a_stored_value_of_the_wrong_type_is_refused_with_a_hint(
    settings: Settings, store: SqliteStore
) -> None:
    store.set_preference("models.cache.evict_policy", "sometimes", actor="an older version")
    with pytest.raises(InvalidSetting, match=r"stored preference models\.cache\.evict_policy") as raised:
        PreferenceService(settings, store).effective(EVICT_POLICY)
    assert "prefs unset models.cache.evict_policy" in raised.value.hint
