"""``appliance db status|migrate|copy`` as a user runs them, and the one proof that matters of a
copy: ``appliance serve`` on the copied PostgreSQL serves the same models with the same digests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.store.migrations import MIGRATIONS
from tests.conftest import CliResult
from tests.store.filled import fill_registry
from tests.web.serving import serving

NAMES = [migration.name for migration in MIGRATIONS]


def run(cli: object, *args: str, env: dict[str, str] | None = None) -> CliResult:
    result: CliResult = cli(*args, env=env)  # type: ignore[operator]
    return result


def test_status_and_migrate_on_the_data_dirs_file(cli: object, data_dir: Path) -> None:
    missing = run(cli, "db", "status")
    assert missing.returncode == 1
    assert f"error: no SQLite registry at {data_dir / 'appliance.db'}" in missing.stderr
    assert "hint:" in missing.stderr
    assert not (data_dir / "appliance.db").exists()

    migrated = run(cli, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert f"applied {len(NAMES)} migrations: {NAMES[0]}" in migrated.stdout
    assert run(cli, "db", "migrate").stdout.strip() == "up to date: no migration pending"

    shown = run(cli, "db", "status")
    assert shown.returncode == 0, shown.stderr
    assert "backend: sqlite" in shown.stdout
    assert f"schema version: {NAMES[-1]}" in shown.stdout
    assert "pending migrations: none" in shown.stdout
    assert any(line.split() == ["registry_generation", "1"] for line in shown.stdout.splitlines())
    found = json.loads(run(cli, "db", "status", "--json").stdout)
    assert (found["backend"], found["pending"], found["tables"]["models"]) == ("sqlite", [], 0)


def test_copy_takes_only_a_postgresql_target(cli: object) -> None:
    refused = run(cli, "db", "copy", "--to", "sqlite:///tmp/other.db")
    assert refused.returncode == 1
    assert "error: db copy copies into PostgreSQL" in refused.stderr


def test_copy_from_a_missing_file_says_which(cli: object, tmp_path: Path) -> None:
    missing = run(
        cli, "db", "copy", "--to", "postgresql://127.0.0.1:1/x", "--from", str(tmp_path / "none.db")
    )
    assert missing.returncode == 1
    assert f"no SQLite registry at {tmp_path / 'none.db'}" in missing.stderr


def test_copy_never_prints_the_password(cli: object, data_dir: Path) -> None:
    assert run(cli, "db", "migrate").returncode == 0
    failed = run(cli, "db", "copy", "--to", "postgresql://appliance:s3cret-pw@127.0.0.1:1/appliance")
    assert failed.returncode == 1
    assert "s3cret-pw" not in failed.stdout + failed.stderr
    assert "error:" in failed.stderr


def _registry(client: Any) -> tuple[Any, dict[str, Any], list[str], dict[str, Any]]:
    """What clients see of the models: the Ollama list and each one's details, the OpenAI list,
    and each model's artifacts (file names, digests, sizes)."""
    tags = client.get("/api/tags").json()
    shown = {
        model["name"]: client.post("/api/show", json={"model": model["name"]}).json()
        for model in tags["models"]
    }
    listed = sorted(model["id"] for model in client.get("/v1/models").json()["data"])
    artifacts = {
        model["name"]: sorted((a["filename"], a["digest"], a["size_bytes"]) for a in model["artifacts"])
        for model in client.get("/api/v1/models").json()
    }
    return tags, shown, listed, artifacts


def test_a_copied_registry_serves_the_same_models_with_the_same_digests(
    cli: object, data_dir: Path, tmp_path: Path, postgres_url: str
) -> None:
    filled = fill_registry(data_dir, tmp_path / "work")
    with serving(data_dir) as on_sqlite:
        before = _registry(on_sqlite.client)
        assert on_sqlite.client.get("/api/v1/db").json()["backend"] == "sqlite"
    assert {model["name"]: model["digest"] for model in before[0]["models"]} == {
        name: digest.removeprefix("sha256:") for name, digest in filled.models.items()
    }

    copied = run(cli, "db", "copy", "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    assert "every table verified" in copied.stdout
    assert any(line.split() == ["models", "2", "2", "0"] for line in copied.stdout.splitlines())
    again = json.loads(run(cli, "db", "copy", "--to", postgres_url, "--json").stdout)
    assert again["copied"] == 0

    on_postgres = {"APPLIANCE_STORE__URL": postgres_url}
    status = json.loads(run(cli, "db", "status", "--json", env=on_postgres).stdout)
    assert (status["backend"], status["pending"], status["tables"]["models"]) == ("postgresql", [], 2)
    with serving(data_dir, env=on_postgres) as on_pg:
        assert _registry(on_pg.client) == before
        assert on_pg.client.get("/api/v1/db").json()["backend"] == "postgresql"
        answer = on_pg.client.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "tiny:latest"
