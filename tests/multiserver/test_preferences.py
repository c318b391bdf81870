"""Preferences on two servers that share one PostgreSQL: set on one, in force on the other at once."""

from __future__ import annotations

from pathlib import Path

from tests.fileserver import FileServer
from tests.multiserver.servers import Pair, pulled
from tests.provision.test_pull import digest_of
from tests.tiny_model import write_llama_gguf


def offline(preferences: list[dict[str, object]]) -> dict[str, object]:
    (found,) = [preference for preference in preferences if preference["key"] == "offline"]
    return {"value": found["value"], "overridden": found["overridden"]}


def test_offline_set_on_a_refuses_a_pull_on_b_and_unset_on_b_lets_a_pull(
    pair: Pair, files: FileServer, tmp_path: Path
) -> None:
    content = write_llama_gguf(tmp_path / "prefs.gguf").read_bytes()
    url = files.add("/m/prefs.gguf", content)

    put = pair.a.client.put("/api/v1/preferences/offline", json={"value": True})
    assert put.status_code == 200, put.text
    assert offline(pair.b.client.get("/api/v1/preferences").json()) == {"value": True, "overridden": True}
    refused = pair.b.client.post("/api/v1/models/pull", json={"ref": url})
    assert (refused.status_code, refused.json()["code"]) == (403, "offline")
    assert files.hits == []  # B made no call at all
    # the change is in the audit both servers share, as A's
    (event,) = pair.b.client.get("/api/v1/audit", params={"action": "preferences.set"}).json()
    assert (event["target"], event["detail"]["value"]) == ("offline", True)

    reset = pair.b.client.put("/api/v1/preferences/offline", json={"value": None})
    assert reset.status_code == 200, reset.text
    assert offline(pair.a.client.get("/api/v1/preferences").json()) == {"value": False, "overridden": False}
    assert pulled(pair.a, url, digest_of(content))["digest"] == digest_of(content)
