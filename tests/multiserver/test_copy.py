"""A SQLite registry copied to PostgreSQL (``appliance db copy``) serves the same models, with the same
digests, from the same data dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import CliResult
from tests.web.serving import Serving, serving


def served_models(server: Serving) -> dict[str, Any]:
    """What a client sees of the models: the OpenAI and Ollama lists, and each model's artifacts."""
    tags = server.client.get("/api/tags").json()["models"]
    artifacts = {
        model["name"]: sorted((a["filename"], a["digest"], a["size_bytes"]) for a in model["artifacts"])
        for model in server.client.get("/api/v1/models").json()
    }
    return {
        "v1": sorted(model["id"] for model in server.client.get("/v1/models").json()["data"]),
        "tags": sorted((tag["name"], tag["digest"], tag["size"]) for tag in tags),
        "artifacts": artifacts,
    }


def test_a_copied_registry_serves_the_same_models_with_the_same_digests(
    cli: Any, data_dir: Path, postgres_url: str, make_gguf: Any
) -> None:
    for number, name in enumerate(["tiny:1", "tiny:2", "other"]):
        imported: CliResult = cli(
            "models", "import", str(make_gguf(f"m{number}.gguf", seed=number)), "--name", name
        )
        assert imported.returncode == 0, imported.stderr
    with serving(data_dir) as on_sqlite:
        before = served_models(on_sqlite)
    assert len(before["v1"]) == 3

    copied: CliResult = cli("db", "copy", "--to", postgres_url)
    assert copied.returncode == 0, copied.stderr
    again: CliResult = cli("db", "copy", "--to", postgres_url)  # safe to re-run
    assert again.returncode == 0, again.stderr

    with serving(data_dir, "--database", postgres_url) as on_postgres:
        assert served_models(on_postgres) == before
        answer = on_postgres.client.post(
            "/v1/chat/completions",
            json={"model": "tiny:1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "tiny:1"
