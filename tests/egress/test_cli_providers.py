"""``appliance providers``: the real command on a real data dir. A key goes in on stdin only and
never comes back out on any stream."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from appliance.egress.secrets import KEY_FILE
from tests.egress.fakes import FakeAnthropic

PROVIDER_KEY = "sk-test-cli-key-0123456789"
NEW_KEY = "sk-test-cli-key-replaced-42"


def test_providers_add_ls_show_set_rm(cli: Any, data_dir: Path) -> None:
    added = cli(
        "providers",
        "add",
        "openai",
        "--base-url",
        "https://api.openai.example/v1",
        "--models",
        "gpt-4o, gpt-4o-mini",
        "--key-stdin",
        input=PROVIDER_KEY + "\n",
    )
    assert added.returncode == 0, added.stderr
    assert "added provider openai (openai, https://api.openai.example/v1, key set)" in added.stdout
    assert "appliance providers test openai" in added.stderr
    assert "model_routing.allowed_external_providers '[\"openai\"]'" in added.stderr
    assert stat.S_IMODE((data_dir / KEY_FILE).stat().st_mode) == 0o600
    lan = cli(
        "providers", "add", "lan", "--base-url", "http://192.168.1.20:8000/v1", "--subjects", "role:admin"
    )
    assert "(openai, http://192.168.1.20:8000/v1, no key)" in lan.stdout

    rows = [line.split() for line in cli("providers", "ls").stdout.splitlines()[1:]]
    assert rows == [
        [
            "lan",
            "openai",
            "http://192.168.1.20:8000/v1",
            "any",
            "unset",
            "chat,complete,embed,models",
            "role:admin",
        ],
        [
            "openai",
            "openai",
            "https://api.openai.example/v1",
            "gpt-4o,gpt-4o-mini",
            "set",
            "chat,complete,embed,models",
            "*",
        ],
    ]
    changed = cli(
        "providers", "set", "lan", "--operations", "chat", "--models", "", "--key-stdin", input=NEW_KEY + "\n"
    )
    assert changed.returncode == 0, changed.stderr
    assert "changed provider lan (openai, http://192.168.1.20:8000/v1, key set)" in changed.stdout
    shown = json.loads(cli("providers", "show", "lan", "--json").stdout)
    assert {k: shown[k] for k in ("models", "operations", "subjects", "key_set")} == {
        "models": [],
        "operations": ["chat"],
        "subjects": ["role:admin"],
        "key_set": True,
    }
    assert cli("providers", "set", "openai", "--clear-key").returncode == 0
    assert cli("providers", "rm", "lan").stdout.strip() == "removed provider lan and its key"
    listed = json.loads(cli("providers", "ls", "--json").stdout)
    assert [(p["name"], p["key_set"]) for p in listed] == [("openai", False)]

    everything = added.stdout + added.stderr + changed.stdout + changed.stderr + json.dumps(shown)
    assert PROVIDER_KEY not in everything
    assert NEW_KEY not in everything


def test_provider_errors_say_what_to_do_and_change_nothing(cli: Any) -> None:
    assert cli("providers", "add", "openai", "--base-url", "https://api.openai.example/v1").returncode == 0
    cases = [
        (("add", "openai", "--base-url", "https://x.example"), "a provider named 'openai' already exists"),
        (("add", "x", "--base-url", "https://x.example", "--key-stdin"), "the provider key is empty"),
        (("set", "openai", "--key-stdin", "--clear-key"), "--key-stdin and --clear-key contradict"),
        (("set", "openai"), "nothing to change in provider 'openai'"),
        (("rm", "nope"), "no provider named 'nope'"),
    ]
    for args, message in cases:
        result = cli("providers", *args, input="\n")
        assert result.returncode == 1, args
        assert message in result.stderr, result.stderr
        assert "hint:" in result.stderr
    listed = json.loads(cli("providers", "ls", "--json").stdout)
    assert [(p["name"], p["key_set"]) for p in listed] == [("openai", False)]
    bad_kind = cli("providers", "add", "g", "--base-url", "https://x.example", "--kind", "gemini")
    assert bad_kind.returncode == 2
    assert "'gemini' is not one of" in bad_kind.stderr


def test_keygen_prints_a_key_the_setting_takes(cli: Any, data_dir: Path) -> None:
    made = cli("providers", "keygen").stdout.strip()
    env = {"APPLIANCE_EGRESS__ENCRYPTION_KEY": made}
    added = cli(
        "providers", "add", "x", "--base-url", "https://x.example", "--key-stdin", input="sk-1\n", env=env
    )
    assert added.returncode == 0, added.stderr
    assert not (data_dir / KEY_FILE).exists()  # sealed with the setting, not a file
    wrong = cli(
        "providers",
        "add",
        "y",
        "--base-url",
        "https://y.example",
        env={"APPLIANCE_EGRESS__ENCRYPTION_KEY": "nope"},
    )
    assert wrong.returncode == 1
    assert "egress.encryption_key is not a key" in wrong.stderr
    assert "appliance providers keygen" in wrong.stderr


def test_providers_test_fetches_the_model_list_with_the_key(cli: Any, fake_anthropic: FakeAnthropic) -> None:
    fake_anthropic.require_key = PROVIDER_KEY
    fake_anthropic.echo_key = True  # its 401 would say the key it got: that must not come out
    added = cli(
        "providers",
        "add",
        "claude",
        "--kind",
        "anthropic",
        "--base-url",
        fake_anthropic.base_url,
        "--key-stdin",
        input=PROVIDER_KEY + "\n",
    )
    assert added.returncode == 0, added.stderr
    answered = cli("providers", "test", "claude")
    assert answered.returncode == 0, answered.stderr
    assert "claude answered (HTTP 200" in answered.stdout
    assert "it lists 2 models: fake-model, fake-model-large" in answered.stdout
    [request] = fake_anthropic.received("/v1/models")
    assert request.headers["x-api-key"] == PROVIDER_KEY

    assert cli("providers", "set", "claude", "--key-stdin", input=NEW_KEY + "\n").returncode == 0
    refused = cli("providers", "test", "claude", "--json")
    assert refused.returncode == 1
    probe = json.loads(refused.stdout)
    assert (probe["ok"], probe["status"], probe["models"]) == (False, 401, [])
    assert "[redacted]" in probe["error"]
    assert NEW_KEY not in refused.stdout + refused.stderr
