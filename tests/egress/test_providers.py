"""``ProviderService`` on each store backend: providers added, listed, changed and removed, every
change audited without the key, bad input refused with nothing changed, and keys sealed so the
database alone never reveals them (REQ-MODELS-0119)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from appliance.audit import AuditService, Context
from appliance.egress.providers import ProviderOut, ProviderService
from appliance.egress.secrets import KEY_FILE, KeyBox
from appliance.errors import InvalidInput, ProviderExists, ProviderKeyUnreadable, ProviderNotFound
from appliance.settings import EgressSettings, Settings
from appliance.store.base import Store
from appliance.store.factory import open_store
from tests.store.conftest import BACKENDS

PROVIDER_KEY = "sk-test-provider-key-0123456789"
OTHER_KEY = "sk-ant-other-key-9876543210"


@pytest.fixture(params=sorted(BACKENDS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with ExitStack() as cleanup:
        opened = open_store(BACKENDS[request.param](tmp_path, cleanup).settings)
        yield opened
        opened.close()


@pytest.fixture
def service(settings: Settings, store: Store) -> ProviderService:
    return ProviderService(settings, store)


@pytest.fixture
def on_sqlite(settings: Settings) -> Iterator[ProviderService]:
    """For what the store plays no part in: checks that refuse before it is reached."""
    settings.data_dir.mkdir()
    opened = open_store(settings)
    yield ProviderService(settings, opened)
    opened.close()


def add_openai(service: ProviderService, context: Context, *, key: str | None = PROVIDER_KEY) -> None:
    service.add(
        "openai",
        kind="openai",
        base_url="https://api.openai.example/v1/",
        models=["gpt-4o", "gpt-4o-mini", "gpt-4o"],
        key=key,
        context=context,
    )


def audit_rows(store: Store) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(action, target, outcome, detail), oldest first."""
    events = reversed(AuditService(store).list_events(limit=100))
    return [(e.action, e.target, e.outcome, e.detail) for e in events]


def test_a_provider_is_added_listed_changed_and_removed(
    service: ProviderService, store: Store, context: Context
) -> None:
    add_openai(service, context)
    service.add(
        "claude",
        kind="anthropic",
        base_url="https://api.anthropic.example",
        operations=["chat", "models"],
        subjects=["role:admin", "user:alice", "task"],
        key=None,
        context=context,
    )
    [claude, openai] = service.list()
    assert (openai.name, openai.kind, openai.base_url) == (
        "openai",
        "openai",
        "https://api.openai.example/v1",
    )
    assert openai.models == ("gpt-4o", "gpt-4o-mini")  # the duplicate dropped
    assert (openai.operations, openai.subjects, openai.key_set) == (
        ("chat", "complete", "embed", "models"),
        ("*",),
        True,
    )
    assert (claude.operations, claude.subjects, claude.key_set) == (
        ("chat", "models"),
        ("role:admin", "user:alice", "task"),
        False,
    )
    assert service.key("openai") == PROVIDER_KEY
    assert service.key("claude") is None

    changed = service.update(
        "claude", models=["claude-sonnet-4"], operations=["models", "chat"], context=context
    )
    assert (changed.models, changed.operations, changed.base_url) == (
        ("claude-sonnet-4",),
        ("chat", "models"),
        "https://api.anthropic.example",
    )
    assert changed.updated_at > claude.updated_at
    assert service.get("claude") == changed
    assert service.set_key("claude", OTHER_KEY, context).key_set
    assert service.key("claude") == OTHER_KEY
    assert not service.set_key("openai", None, context).key_set
    assert service.key("openai") is None
    assert store.provider_ciphertext("openai") is None
    service.remove("openai", context)
    assert [p.name for p in service.list()] == ["claude"]
    assert service.key("claude") == OTHER_KEY

    assert [row[:3] for row in audit_rows(store)] == [
        ("providers.add", "openai", "ok"),
        ("providers.add", "claude", "ok"),
        ("providers.update", "claude", "ok"),
        ("providers.key", "claude", "ok"),
        ("providers.key", "openai", "ok"),
        ("providers.remove", "openai", "ok"),
    ]
    details = [row[3] for row in audit_rows(store)]
    assert details[0]["key"] == "set"
    assert details[1]["key"] == "unset"
    assert details[0]["models"] == ["gpt-4o", "gpt-4o-mini"]
    assert details[2] == {"models": ["claude-sonnet-4"], "operations": ["chat", "models"]}
    assert (details[3], details[4]) == ({"key": "set"}, {"key": "cleared"})
    assert PROVIDER_KEY not in str(details)
    assert OTHER_KEY not in str(details)


def test_the_api_shape_holds_no_key(on_sqlite: ProviderService, context: Context) -> None:
    add_openai(on_sqlite, context)
    shown = ProviderOut.of(on_sqlite.get("openai")).model_dump_json()
    assert '"key_set":true' in shown
    assert PROVIDER_KEY not in shown


def test_a_name_taken_is_refused_and_the_first_stays(
    service: ProviderService, store: Store, context: Context
) -> None:
    add_openai(service, context)
    with pytest.raises(ProviderExists, match="'openai' already exists") as raised:
        service.add(
            "openai", kind="anthropic", base_url="https://elsewhere.example", key=OTHER_KEY, context=context
        )
    assert "appliance providers rm" in raised.value.hint
    assert service.get("openai").kind == "openai"
    assert service.key("openai") == PROVIDER_KEY
    assert audit_rows(store)[-1][:3] == ("providers.add", "openai", "error")


@pytest.mark.parametrize(
    "act",
    [
        lambda s, c: s.get("nope"),
        lambda s, c: s.update("nope", base_url="https://x.example", context=c),
        lambda s, c: s.set_key("nope", PROVIDER_KEY, c),
        lambda s, c: s.set_key("nope", None, c),
        lambda s, c: s.remove("nope", c),
    ],
    ids=["get", "update", "set_key", "clear_key", "remove"],
)
def test_an_unknown_provider_is_not_found(service: ProviderService, context: Context, act: Any) -> None:
    with pytest.raises(ProviderNotFound, match="no provider named 'nope'") as raised:
        act(service, context)
    assert raised.value.status == 404
    assert "appliance providers ls" in raised.value.hint
    assert service.list() == []


GOOD: dict[str, Any] = {"kind": "openai", "base_url": "https://api.example/v1", "key": None}


@pytest.mark.parametrize(
    ("name", "fields", "message"),
    [
        ("OpenAI", {}, "not a provider name"),
        ("open/ai", {}, "not a provider name"),
        ("-x", {}, "not a provider name"),
        ("x" * 64, {}, "not a provider name"),
        ("ok", {"kind": "gemini"}, "'gemini' is not a provider kind"),
        ("ok", {"base_url": "ftp://host/v1"}, "not an http\\(s\\) URL with a host"),
        ("ok", {"base_url": "https:///v1"}, "not an http\\(s\\) URL with a host"),
        ("ok", {"base_url": "api.example/v1"}, "not an http\\(s\\) URL with a host"),
        ("ok", {"base_url": "https://user:pw@api.example/v1"}, "may not carry a user or password"),
        ("ok", {"base_url": "https://api.example/v1?key=1"}, "query or fragment"),
        ("ok", {"base_url": "https://api.example/v1#x"}, "query or fragment"),
        ("ok", {"base_url": "https://api.example:99999/v1"}, "not a base URL"),
        ("ok", {"base_url": "https://api.example/ v1"}, "not a base URL"),
        ("ok", {"models": ["gpt 4"]}, "not a model name"),
        ("ok", {"models": [""]}, "not a model name"),
        ("ok", {"operations": ["chat", "images"]}, "'images': not an operation"),
        ("ok", {"operations": []}, "at least one operation"),
        ("ok", {"subjects": ["role:node"]}, "not a subject"),
        ("ok", {"subjects": ["alice"]}, "not a subject"),
        ("ok", {"subjects": ["user:"]}, "not a subject"),
        ("ok", {"subjects": []}, "at least one subject"),
        ("ok", {"key": "  "}, "the provider key is empty"),
        ("ok", {"key": "sk-a b"}, "not one line of printable characters"),
        ("ok", {"key": "sk-a\x00"}, "not one line of printable characters"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    settings: Settings, on_sqlite: ProviderService, name: str, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message) as raised:
        on_sqlite.add(name, **{**GOOD, **fields}, context=Context("test:user"))
    assert raised.value.status == 400
    assert raised.value.hint
    assert on_sqlite.list() == []
    assert audit_rows(on_sqlite.store) == []
    assert not (settings.data_dir / KEY_FILE).exists()


def test_a_bad_change_is_refused_and_changes_nothing(service: ProviderService, context: Context) -> None:
    add_openai(service, context)
    before = service.get("openai")
    with pytest.raises(InvalidInput, match="nothing to change"):
        service.update("openai", context=context)
    with pytest.raises(InvalidInput, match="not a subject"):
        service.update("openai", base_url="https://new.example/v1", subjects=["everyone"], context=context)
    with pytest.raises(InvalidInput, match="the provider key is empty"):
        service.set_key("openai", "", context)
    assert service.get("openai") == before
    assert service.key("openai") == PROVIDER_KEY


def test_an_empty_model_list_serves_any_name(on_sqlite: ProviderService, context: Context) -> None:
    add_openai(on_sqlite, context)
    assert not on_sqlite.get("openai").serves("llama3")
    assert on_sqlite.update("openai", models=[], context=context).serves("llama3")


def test_the_database_holds_a_ciphertext_and_a_copy_of_it_alone_reveals_nothing(
    tmp_path: Path, context: Context
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    settings.data_dir.mkdir()
    store = open_store(settings)
    try:
        add_openai(ProviderService(settings, store), context)
        ciphertext = store.provider_ciphertext("openai")
    finally:
        store.close()
    assert ciphertext is not None
    assert PROVIDER_KEY.encode() not in ciphertext
    database = (settings.data_dir / "appliance.db").read_bytes()
    assert PROVIDER_KEY.encode() not in database
    assert ciphertext in database

    # Someone copies the database, and only the database, to a data dir of their own.
    stolen = Settings(data_dir=tmp_path / "stolen")
    stolen.data_dir.mkdir()
    shutil.copy(settings.data_dir / "appliance.db", stolen.data_dir / "appliance.db")
    copy = open_store(stolen)
    try:
        service = ProviderService(stolen, copy)
        assert service.get("openai").key_set
        with pytest.raises(ProviderKeyUnreadable, match="is missing") as raised:
            service.key("openai")
        assert raised.value.code == "provider_key_unreadable"
        assert raised.value.status == 500
        # A key of their own does not open it either.
        guessed = Settings(
            data_dir=stolen.data_dir, egress=EgressSettings(encryption_key=SecretStr(KeyBox.generate()))
        )
        with pytest.raises(ProviderKeyUnreadable, match="sealed with another key"):
            ProviderService(guessed, copy).key("openai")
        # Setting the key again is the way back.
        service.set_key("openai", OTHER_KEY, context)
        assert service.key("openai") == OTHER_KEY
    finally:
        copy.close()
