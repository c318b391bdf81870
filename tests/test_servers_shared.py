"""What two servers on one PostgreSQL schema read alike at once: preferences (read through, no
cache in a process) and the rendered model lists (cached per registry generation, which any
server's write moves)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.errors import Offline
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store.base import ModelSummary

ADMIN = Context(actor="admin")


@pytest.fixture
def two_servers(postgres_url: str, tmp_path: Path) -> Iterator[tuple[Runtime, Runtime]]:
    servers = [Runtime.open(Settings(data_dir=tmp_path / n, store={"url": postgres_url})) for n in "ab"]
    yield servers[0], servers[1]
    for server in servers:
        server.close()


def test_a_preference_set_on_one_server_applies_on_the_other_at_once(
    two_servers: tuple[Runtime, Runtime],
) -> None:
    first, second = two_servers
    assert second.provisioner.policy().offline is False
    first.preferences.set("offline", True, ADMIN)
    with pytest.raises(Offline):
        second.provisioner.policy().check(second.provisioner.parse_ref("https://example.com/x.gguf"))
    first.preferences.set("offline", None, ADMIN)
    assert second.provisioner.policy().offline is False


def test_a_model_imported_on_one_server_shows_in_the_others_cached_list(
    two_servers: tuple[Runtime, Runtime], tiny_gguf: Path
) -> None:
    first, second = two_servers

    def names(summaries: list[ModelSummary]) -> bytes:
        return ",".join(str(summary.name) for summary in summaries).encode()

    assert second.models.cached_list("names", names) == b""
    first.models.import_file(tiny_gguf, ADMIN, name="tiny")
    assert second.models.cached_list("names", names) == b"tiny:latest"
