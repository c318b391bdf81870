"""``appliance users`` and ``appliance keys``: the real command on a real data dir."""

from __future__ import annotations

import json
from typing import Any

PASSWORD = "correct horse battery"


def test_users_add_ls_passwd_role_rm(cli: Any) -> None:
    added = cli("users", "add", "alice", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    assert "added admin alice" in added.stdout
    assert cli("users", "add", "worker", "--role", "node", "--no-password").returncode == 0
    listed = json.loads(cli("users", "ls", "--json").stdout)
    assert [(user["name"], user["role"], user["has_password"]) for user in listed] == [
        ("alice", "admin", True),
        ("worker", "node", False),
    ]
    assert cli("users", "ls").stdout.splitlines()[1].split()[:3] == ["alice", "admin", "set"]
    assert cli("users", "passwd", "worker", "--password-stdin", input="another long one\n").returncode == 0
    assert json.loads(cli("users", "ls", "--json").stdout)[1]["has_password"] is True
    assert cli("users", "role", "worker", "user").returncode == 0
    assert cli("keys", "create", "--user", "worker").returncode == 0
    removed = cli("users", "rm", "worker")
    assert removed.returncode == 0
    assert [user["name"] for user in json.loads(cli("users", "ls", "--json").stdout)] == ["alice"]
    assert json.loads(cli("keys", "ls", "--json").stdout) == []  # their keys went with them
    actions = [event["action"] for event in json.loads(cli("audit", "ls", "--json").stdout)]
    assert {"users.add", "users.passwd", "users.role", "users.rm", "keys.create"} <= set(actions)


def test_user_errors_say_what_to_do_and_change_nothing(cli: Any) -> None:
    assert cli("users", "add", "alice", "--password-stdin", input=PASSWORD).returncode == 0
    again = cli("users", "add", "alice", "--password-stdin", input=PASSWORD)
    assert again.returncode == 1
    assert "user 'alice' already exists" in again.stderr
    assert "hint:" in again.stderr
    weak = cli("users", "add", "bob", "--password-stdin", input="short\n")
    assert weak.returncode == 1
    assert "too weak" in weak.stderr
    empty = cli("users", "add", "bob", "--password-stdin", input="\n")
    assert empty.returncode == 1
    assert "the password is empty" in empty.stderr
    role = cli("users", "add", "bob", "--role", "king", "--no-password")
    assert role.returncode == 2
    assert "'king' is not one of" in role.stderr
    bad_name = cli("users", "add", "../bob", "--no-password")
    assert bad_name.returncode == 1
    assert "not a user name" in bad_name.stderr
    assert [user["name"] for user in json.loads(cli("users", "ls", "--json").stdout)] == ["alice"]
    missing = cli("users", "passwd", "bob", "--password-stdin", input=PASSWORD)
    assert missing.returncode == 1
    assert "no user 'bob'" in missing.stderr
    assert cli("users", "rm", "bob").returncode == 1


def test_keys_are_shown_once_listed_by_prefix_and_revoked(cli: Any) -> None:
    assert cli("users", "add", "alice", "--no-password").returncode == 0
    made = cli("keys", "create", "--user", "alice", "--name", "laptop", "--expires", "30d")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("apl_")
    assert len(secret) >= 4 + 43  # 256 bits, base64url
    assert "shown only this once" in made.stderr
    listed = cli("keys", "ls")
    assert secret not in listed.stdout
    assert secret[:10] + "…" in listed.stdout
    (key,) = json.loads(cli("keys", "ls", "--json").stdout)
    assert (key["name"], key["user"], key["role"], key["state"]) == ("laptop", "alice", "user", "active")
    assert key["expires_at"] > key["created_at"]
    assert "key" not in key
    assert cli("keys", "revoke", key["id"]).returncode == 0
    assert json.loads(cli("keys", "ls", "--json").stdout)[0]["state"] == "revoked"


def test_key_errors_say_what_to_do(cli: Any) -> None:
    assert cli("users", "add", "alice", "--no-password").returncode == 0
    unknown = cli("keys", "revoke", "nope")
    assert unknown.returncode == 1
    assert "no API key 'nope'" in unknown.stderr
    assert "appliance keys ls" in unknown.stderr
    bigger = cli("keys", "create", "--user", "alice", "--role", "admin")
    assert bigger.returncode == 1
    assert "cannot have the admin role" in bigger.stderr
    lifetime = cli("keys", "create", "--expires", "0d")
    assert lifetime.returncode == 1
    assert "not a key lifetime" in lifetime.stderr
    nobody = cli("keys", "create", "--user", "bob")
    assert nobody.returncode == 1
    assert "no user 'bob'" in nobody.stderr
    assert json.loads(cli("keys", "ls", "--json").stdout) == []
