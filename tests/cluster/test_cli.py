"""``appliance nodes``: the real command in a subprocess on the test's data dir, beside a server
that sees its changes at its next sweep."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from appliance.audit import Context
from appliance.cluster.tokens import parse_join_token
from appliance.runtime import Runtime
from appliance.settings import Settings
from tests.cluster.conftest import Live
from tests.conftest import CliResult


def _joined(data_dir: Path, *names: str) -> None:
    runtime = Runtime.open(Settings(data_dir=data_dir))
    try:
        token = runtime.cluster.create_token(Context.cli()).token
        for name in names:
            runtime.cluster.join(token, name, {"memory_budget": 5}, Context("api:127.0.0.1"))
    finally:
        runtime.close()


def test_token_create_prints_the_token_alone_and_the_join_line(cli: Any) -> None:
    made: CliResult = cli("nodes", "token", "create", "--expires", "2h")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    parsed = parse_join_token(token)
    assert parsed.fingerprint is None
    assert f"appliance worker join http://127.0.0.1:8080 --token {token}" in made.stderr
    listed = json.loads(cli("nodes", "token", "ls", "--json").stdout)
    assert [(t["id"], t["state"], t["uses"]) for t in listed] == [(parsed.token_id, "active", 0)]
    assert token not in cli("nodes", "token", "ls").stdout
    assert cli("nodes", "token", "rm", parsed.token_id).returncode == 0
    assert json.loads(cli("nodes", "token", "ls", "--json").stdout)[0]["state"] == "revoked"
    missing = cli("nodes", "token", "rm", "nope")
    assert missing.returncode == 1
    assert "no join token" in missing.stderr
    bad = cli("nodes", "token", "create", "--expires", "soon")
    assert bad.returncode == 1
    assert "lifetime" in bad.stderr
    never = json.loads(cli("nodes", "token", "create", "--expires", "never", "--json").stdout)
    assert never["expires_at"] is None


def test_token_create_says_the_default_join_line_is_this_machines_local_address(cli: Any) -> None:
    made: CliResult = cli("nodes", "token", "create", env={"APPLIANCE_PORT": "9123"})
    assert made.returncode == 0, made.stderr
    assert f"appliance worker join http://127.0.0.1:9123 --token {made.stdout.strip()}" in made.stderr
    assert "http://127.0.0.1:9123 is this machine's local address" in made.stderr
    assert "--url URL" in made.stderr


def test_token_create_joins_at_the_given_url(cli: Any) -> None:
    made: CliResult = cli("nodes", "token", "create", "--url", "https://box.lan")
    assert made.returncode == 0, made.stderr
    assert f"appliance worker join https://box.lan:443 --token {made.stdout.strip()}" in made.stderr
    assert "local address" not in made.stderr
    bad = cli("nodes", "token", "create", "--url", "box.lan/api")
    assert bad.returncode == 1
    assert "'box.lan/api' is not a server's address" in bad.stderr
    assert len(json.loads(cli("nodes", "token", "ls", "--json").stdout)) == 1  # the bad one made none


def test_token_create_joins_at_the_first_public_name_over_tls(cli: Any, data_dir: Path) -> None:
    env = {"APPLIANCE_SERVER__PUBLIC_NAMES": '["box.lan", "192.168.7.7"]', "APPLIANCE_PORT": "8443"}
    assert cli("tls", "init", env=env).returncode == 0
    made: CliResult = cli("nodes", "token", "create", env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert parse_join_token(token).fingerprint is not None
    assert f"appliance worker join https://box.lan:8443 --token {token}" in made.stderr
    assert "local address" not in made.stderr


def test_nodes_are_listed_shown_drained_and_removed(cli: Any, data_dir: Path) -> None:
    _joined(data_dir, "w1", "w2")
    listed = json.loads(cli("nodes", "ls", "--json").stdout)
    assert [(n["name"], n["state"]) for n in listed] == [("w1", "unavailable"), ("w2", "unavailable")]
    assert "w1" in cli("nodes", "ls").stdout
    shown = cli("nodes", "show", "w1")
    assert "node w1" in shown.stdout
    assert "memory budget: 5" in shown.stdout
    assert cli("nodes", "drain", "w1").stdout.strip() == "node w1 is draining"
    assert json.loads(cli("nodes", "show", "w1", "--json").stdout)["state"] == "draining"
    assert cli("nodes", "undrain", "w1").returncode == 0
    assert cli("nodes", "rm", "w2").returncode == 0
    assert [n["name"] for n in json.loads(cli("nodes", "ls", "--json").stdout)] == ["w1"]
    for command in (("show", "w2"), ("drain", "w2"), ("rm", "w2"), ("load", "w2", "tiny")):
        failed = cli("nodes", *command)
        assert failed.returncode == 1, command
        assert "no node 'w2'" in failed.stderr


def test_load_and_unload_reach_a_running_server_at_its_next_sweep(
    cli: Any, live_server: Any, tiny_gguf: Path
) -> None:
    live: Live = live_server()
    live.runtime.models.import_file(tiny_gguf, Context.cli(), name="tiny")
    worker = live.join("w1")
    applied = worker.heartbeat().json()["config_version"]
    with worker.client() as client:
        started = time.monotonic()
        assert cli("nodes", "load", "w1", "tiny").returncode == 0
        items = client.get("/api/v1/cluster/work?wait=10").json()["items"]
        assert [item["kind"] for item in items] == ["config"]
        assert time.monotonic() - started < 9
    reply = worker.heartbeat(config_applied=applied).json()
    assert [m["model"] for m in reply["config"]["models"]] == ["tiny:latest"]
    unloaded = cli("nodes", "unload", "w1", "tiny")
    assert unloaded.returncode == 0
    assert "told to unload" in unloaded.stdout
    assert worker.heartbeat(config_applied=applied).json()["config"]["models"] == []
    refused = cli("nodes", "unload", "w1", "tiny")
    assert refused.returncode == 1
    assert "not told to load" in refused.stderr
