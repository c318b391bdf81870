"""Model lists over HTTP and in the CLI: the same content the full models give, pages that walk
every model once, cached answers that a CLI write in another process invalidates at once, and a
clear 400 for a bad limit or cursor."""

from __future__ import annotations

import base64
import calendar
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.store.base import Model
from tests.conftest import CliResult, Server


def _import(runtime: Runtime, context: Context, source: Path, *names: str) -> None:
    for name in names:
        runtime.models.import_file(source, context, name=name)


def _openai_entry(model: Model) -> dict[str, Any]:
    created = calendar.timegm(time.strptime(model.created_at[:19], "%Y-%m-%dT%H:%M:%S"))
    return {"id": str(model.name), "object": "model", "created": created, "owned_by": "appliance"}


def _tag_entry(model: Model) -> dict[str, Any]:
    """``/api/tags``'s entry built from the full model, as the list did before it read summaries."""
    gguf = next(a for a in model.artifacts if a.format == "gguf")
    return {
        "name": str(model.name),
        "model": str(model.name),
        "modified_at": model.updated_at,
        "size": model.size_bytes,
        "digest": gguf.digest.removeprefix("sha256:"),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": model.capabilities["architecture"],
            "families": [model.capabilities["architecture"]],
            "parameter_size": "116K",
            "quantization_level": model.capabilities["quantization"].removeprefix("ALL_"),
        },
    }


def test_lists_show_what_the_full_models_give(
    server: Server, runtime: Runtime, context: Context, tiny_gguf: Path, tmp_path: Path
) -> None:
    _import(runtime, context, tiny_gguf, "b:v2", "a")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    runtime.models.import_file(weights, context, name="only-safetensors")
    full = [model for model in runtime.models.list_models() if "gguf" in model.formats]
    assert [str(model.name) for model in full] == ["a:latest", "b:v2"]
    assert server.client.get("/v1/models").json() == {
        "object": "list",
        "data": [_openai_entry(model) for model in full],
    }
    assert server.client.get("/api/tags").json() == {"models": [_tag_entry(model) for model in full]}


def test_a_model_the_cli_adds_or_removes_shows_in_the_cached_lists_at_once(
    server: Server, cli: Any, tiny_gguf: Path
) -> None:
    for path in ("/v1/models", "/api/tags"):
        assert server.client.get(path).status_code == 200  # the empty answers are cached now
    imported: CliResult = cli("models", "import", str(tiny_gguf), "--name", "fresh")
    assert imported.returncode == 0, imported.stderr
    assert [m["id"] for m in server.client.get("/v1/models").json()["data"]] == ["fresh:latest"]
    assert [m["name"] for m in server.client.get("/api/tags").json()["models"]] == ["fresh:latest"]
    removed: CliResult = cli("models", "rm", "fresh")
    assert removed.returncode == 0, removed.stderr
    assert server.client.get("/v1/models").json()["data"] == []
    assert server.client.get("/api/tags").json()["models"] == []


def test_pages_walk_every_model_exactly_once(
    server: Server, runtime: Runtime, context: Context, tiny_gguf: Path
) -> None:
    names = ["e", "a:2", "c", "a:1", "d"]
    _import(runtime, context, tiny_gguf, *names)
    everything = [model["name"] for model in server.client.get("/api/v1/models").json()]
    assert everything == ["a:1", "a:2", "c:latest", "d:latest", "e:latest"]
    walked: list[str] = []
    pages = 0
    params: dict[str, Any] = {"limit": 2}
    while True:
        answer = server.client.get("/api/v1/models", params=params)
        assert answer.status_code == 200
        walked.extend(model["name"] for model in answer.json())
        pages += 1
        cursor = answer.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in answer.headers
            break
        assert answer.headers["link"] == f'</api/v1/models?limit=2&cursor={cursor}>; rel="next"'
        params = {"limit": 2, "cursor": cursor}
    assert (walked, pages) == (everything, 3)


def test_the_cli_pages_too(runtime: Runtime, context: Context, tiny_gguf: Path, cli: Any) -> None:
    _import(runtime, context, tiny_gguf, "a", "b", "c")
    first: CliResult = cli("models", "ls", "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert "a:latest" in first.stdout
    assert "b:latest" in first.stdout
    assert "c:latest" not in first.stdout
    command = first.stderr.split("more models follow: ")[1].split()
    assert command[:5] == ["appliance", "models", "ls", "--limit", "2"]
    rest: CliResult = cli(*command[1:], "--json")
    assert rest.returncode == 0, rest.stderr
    assert '"c:latest"' in rest.stdout
    assert "a:latest" not in rest.stdout
    assert "more models follow" not in rest.stderr


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"limit": "0"}, "limit: Expected `int` >= 1"),
        ({"limit": "1001"}, "limit: Expected `int` <= 1000"),
        ({"limit": "ten"}, "limit"),
        ({"cursor": "%%%"}, "is not one a model list gave"),
        ({"cursor": base64.urlsafe_b64encode(b"Bad Name!").decode()}, "is not one a model list gave"),
    ],
)
def test_a_bad_limit_or_cursor_is_a_clear_400(
    shared_server: Server, params: dict[str, str], says: str
) -> None:
    """One server for every case: a refusal changes nothing."""
    answer = shared_server.client.get("/api/v1/models", params=params)
    assert answer.status_code == 400
    assert says in answer.text


def test_the_cli_refuses_a_bad_limit_or_cursor(cli: Any) -> None:
    for args, says in ((("--limit", "0"), "limit 0 is out of range"), (("--cursor", "%%%"), "cursor")):
        result: CliResult = cli("models", "ls", *args)
        assert result.returncode != 0
        assert says in result.stderr
