"""The store a process opens is the one ``store.url`` names, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx

from appliance.names import ModelName
from appliance.settings import Settings, StoreSettings
from appliance.store.factory import open_store
from appliance.store.postgres import PostgresStore
from appliance.store.sqlite import SqliteStore
from tests.conftest import APPLIANCE, free_port


def test_unset_store_url_means_the_sqlite_file_in_the_data_dir(settings: Settings, data_dir: Path) -> None:
    data_dir.mkdir()
    store = open_store(settings)
    store.set_preference("opened", True, actor="test")
    store.close()
    direct = SqliteStore(data_dir / "appliance.db")
    assert direct.get_preference("opened") is True
    direct.close()


def test_a_sqlite_url_keeps_the_registry_in_that_file(
    cli: object, tiny_gguf: Path, tmp_path: Path, data_dir: Path
) -> None:
    registry = tmp_path / "elsewhere" / "registry.db"
    registry.parent.mkdir()
    elsewhere = {"APPLIANCE_STORE__URL": f"sqlite:///{registry}"}
    imported = cli("models", "import", str(tiny_gguf), "--name", "tiny", env=elsewhere)  # type: ignore[operator]
    assert imported.returncode == 0, imported.stderr
    listed = cli("models", "ls", "--json", env=elsewhere)  # type: ignore[operator]
    assert [model["name"] for model in json.loads(listed.stdout)] == ["tiny:latest"]
    assert registry.is_file()
    assert json.loads(cli("models", "ls", "--json").stdout) == []  # type: ignore[operator]


def test_a_postgresql_url_keeps_the_registry_in_that_database(
    cli: object, tiny_gguf: Path, postgres_url: str, data_dir: Path
) -> None:
    there = {"APPLIANCE_STORE__URL": postgres_url}
    imported = cli("models", "import", str(tiny_gguf), "--name", "tiny", env=there)  # type: ignore[operator]
    assert imported.returncode == 0, imported.stderr
    listed = cli("models", "ls", "--json", env=there)  # type: ignore[operator]
    assert [model["name"] for model in json.loads(listed.stdout)] == ["tiny:latest"]
    assert not (data_dir / "appliance.db").exists()
    store = open_store(Settings(data_dir=data_dir, store=StoreSettings(url=postgres_url)))
    assert isinstance(store, PostgresStore)
    assert store.get_model(ModelName("tiny")) is not None
    store.close()


def test_an_unreachable_postgresql_url_is_a_clear_error_without_the_password(
    cli: object, data_dir: Path
) -> None:
    url = "postgresql://appliance:s3cret@127.0.0.1:1/appliance"
    result = cli("models", "ls", env={"APPLIANCE_STORE__URL": url})  # type: ignore[operator]
    assert result.returncode != 0
    assert "error: the PostgreSQL database postgresql://appliance:***@127.0.0.1:1/appliance failed" in (
        result.stderr
    )
    assert "hint: check store.url / APPLIANCE_STORE__URL, and that the server is up" in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (data_dir / "appliance.db").exists()


def test_serve_database_serves_the_models_of_that_database(
    cli: object, tiny_gguf: Path, postgres_url: str, data_dir: Path
) -> None:
    imported = cli(
        "models", "import", str(tiny_gguf), "--name", "tiny", env={"APPLIANCE_STORE__URL": postgres_url}
    )  # type: ignore[operator]
    assert imported.returncode == 0, imported.stderr
    port = free_port()
    with subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(data_dir), "serve", "--port", str(port), "--database", postgres_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ) as process:
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        answer = client.get("/api/v1/models")
                        if answer.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert process.poll() is None, "serve ended"
                    assert time.monotonic() < deadline, "serve did not start"
                    time.sleep(0.1)
                assert [model["name"] for model in answer.json()] == ["tiny:latest"]
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert not (data_dir / "appliance.db").exists()


def test_serve_refuses_a_database_it_cannot_reach_before_it_listens(cli: object) -> None:
    url = "postgresql://appliance:s3cret@127.0.0.1:1/appliance"
    result = cli("serve", "--port", str(free_port()), "--database", url)  # type: ignore[operator]
    assert result.returncode == 1
    assert "error: the PostgreSQL database postgresql://appliance:***@127.0.0.1:1/appliance failed" in (
        result.stderr
    )
    assert "serving on" not in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
