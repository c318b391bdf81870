"""Settings: flags > environment > config file > defaults, with clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import InvalidSetting
from appliance.settings import Settings, load_settings


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.data_dir == tmp_path / "xdg-data" / "appliance"
    assert settings.models.cache.max_bytes is None
    assert settings.models.cache.evict_policy == "lru"


def test_flags_beat_environment_beat_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'port = 9001\nhost = "127.0.0.2"\n[models.cache]\nmax_bytes = "2GiB"\nevict_policy = "none"\n'
    )
    from_file = load_settings(config_file=config)
    assert (from_file.port, from_file.host) == (9001, "127.0.0.2")
    assert from_file.models.cache.max_bytes == 2 * 1024**3
    assert from_file.models.cache.evict_policy == "none"

    monkeypatch.setenv("APPLIANCE_PORT", "9002")
    monkeypatch.setenv("APPLIANCE_MODELS__CACHE__MAX_BYTES", "500MB")
    from_env = load_settings(config_file=config)
    assert from_env.port == 9002
    assert from_env.models.cache.max_bytes == 500_000_000
    assert from_env.host == "127.0.0.2"

    assert load_settings(config_file=config, port=9003).port == 9003


def test_config_file_from_xdg_config_home(tmp_path: Path) -> None:
    config = tmp_path / "xdg-config" / "appliance" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("port = 9100\n")
    assert load_settings().port == 9100


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "elsewhere.toml"
    config.write_text("port = 9200\n")
    monkeypatch.setenv("APPLIANCE_CONFIG", str(config))
    assert load_settings().port == 9200


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("port = 70000\n", "port"),
        ("bogus = 1\n", "bogus"),
        ('[models.cache]\nmax_bytes = "lots"\n', "is not a size"),
        ('[models.cache]\nevict_policy = "random"\n', "evict_policy"),
        ("port = [\n", "cannot read the config file"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(content)
    with pytest.raises(InvalidSetting) as caught:
        load_settings(config_file=config)
    assert message in str(caught.value)


def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidSetting, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml")


def test_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PORT", "eighty")
    with pytest.raises(InvalidSetting, match="port"):
        load_settings()


def test_settings_accept_human_sizes() -> None:
    assert (
        Settings.model_validate({"models": {"cache": {"max_bytes": "1.5 GB"}}}).models.cache.max_bytes
        == 1_500_000_000
    )


def test_store_url_is_unset_by_default_and_names_a_sqlite_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert load_settings().store.url is None
    monkeypatch.setenv("APPLIANCE_STORE__URL", f"sqlite:///{tmp_path}/registry.db")
    assert load_settings().store.url == f"sqlite:///{tmp_path}/registry.db"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/srv/appliance/registry.db", "not a store URL; write a file as sqlite:///ABS/PATH.db"),
        ("sqlite://registry.db", "does not name a file by its absolute path"),
        ("sqlite:///srv/appliance/", "does not name a file by its absolute path"),
        ("sqlite:///srv/registry.db?mode=ro", "has a query or fragment"),
        ("mysql://root:hunter2@db.lan/appliance", "mysql:// is not a store"),
    ],
)
def test_a_bad_store_url_is_a_clear_error_that_never_shows_a_password(
    monkeypatch: pytest.MonkeyPatch, url: str, message: str
) -> None:
    monkeypatch.setenv("APPLIANCE_STORE__URL", url)
    with pytest.raises(InvalidSetting) as caught:
        load_settings()
    assert "store.url" in str(caught.value)
    assert message in str(caught.value)
    assert "hunter2" not in f"{caught.value} {caught.value.hint}"
