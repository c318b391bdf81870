"""``appliance models cp`` and ``appliance models push`` against a real data dir and Debian's
docker-registry on loopback; the pushed model comes back whole with ``models pull``."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import CliResult, import_file
from tests.provision.test_oci import registry  # noqa: F401 (a fixture)


def _models(cli: object) -> dict[str, list[str]]:
    listed = cli("models", "ls", "--json")  # type: ignore[operator]
    return {model["name"]: [a["digest"] for a in model["artifacts"]] for model in json.loads(listed.stdout)}


def test_a_copy_shares_the_blobs_and_refuses_a_taken_name(
    cli: object, tiny_gguf: Path, data_dir: Path
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    blobs = sorted(path.name for path in (data_dir / "blobs").rglob("*") if path.is_file())
    copied: CliResult = cli("models", "cp", "tiny", "team/tiny:v1")  # type: ignore[operator]
    assert copied.returncode == 0, copied.stderr
    assert "copied tiny to team/tiny:v1" in copied.stdout
    models = _models(cli)
    assert models["team/tiny:v1"] == models["tiny:latest"]
    assert sorted(path.name for path in (data_dir / "blobs").rglob("*") if path.is_file()) == blobs
    taken: CliResult = cli("models", "cp", "tiny", "team/tiny:v1")  # type: ignore[operator]
    assert taken.returncode == 1
    assert "already exists" in taken.stderr
    missing: CliResult = cli("models", "cp", "nope", "other")  # type: ignore[operator]
    assert missing.returncode == 1
    assert "nope" in missing.stderr
    assert set(_models(cli)) == {"tiny:latest", "team/tiny:v1"}  # the refusals changed nothing


def test_a_pushed_model_pulls_back_whole(
    cli: object,
    tiny_gguf: Path,
    data_dir: Path,
    registry: str,  # noqa: F811
) -> None:
    """The registry in the name says where to; the local model is the name without it."""
    import_file(data_dir, tiny_gguf, "team/tiny:v1")
    where = f"{registry}/team/tiny:v1"
    refused: CliResult = cli("models", "push", where)  # type: ignore[operator]
    assert refused.returncode == 1  # plain HTTP only when asked, and only to loopback
    pushed: CliResult = cli("models", "push", where, "--insecure")  # type: ignore[operator]
    assert pushed.returncode == 0, pushed.stderr
    assert f"pushed {where}" in pushed.stdout
    before = _models(cli)["team/tiny:v1"]
    assert cli("models", "rm", "team/tiny:v1").returncode == 0  # type: ignore[operator]
    plain = {"APPLIANCE_MODELS__DOWNLOAD__OCI_PLAIN_HTTP": json.dumps([registry])}
    pulled: CliResult = cli("models", "pull", where, env=plain)  # type: ignore[operator]
    assert pulled.returncode == 0, pulled.stderr
    assert list(_models(cli).values()) == [before]
