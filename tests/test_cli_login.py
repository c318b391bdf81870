"""``appliance login`` and ``logout`` against a real server on loopback with API keys on and TLS from
``appliance tls init``; the client runs with a data dir of its own, as on another machine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.conftest import CliResult, Server, free_port
from tests.web.serving import Serving, serving

PASSWORD = "correct horse battery"


@dataclass
class Remote:
    server: Serving
    fingerprint: str

    def status_with(self, key: str) -> int:
        return self.server.client.get("/api/v1/me", headers={"Authorization": f"Bearer {key}"}).status_code


@contextmanager
def remote_server(cli: object, data_dir: Path, **settings: str) -> Iterator[Remote]:
    """A server with keys on, over HTTPS with its own CA, and alice, its admin; ``settings`` are
    more of its environment."""
    made: CliResult = cli("tls", "init")  # type: ignore[operator]
    fingerprint = next(
        line.split(": ", 1)[1] for line in made.stdout.splitlines() if line.startswith("CA fingerprint")
    )
    added: CliResult = cli(  # type: ignore[operator]
        "users", "add", "alice", "--role", "admin", "--password-stdin", input=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    ca = ssl.create_default_context(cafile=data_dir / "tls" / "ca.crt")
    env = {"APPLIANCE_SERVER__AUTH": "on", **settings}
    with serving(data_dir, env=env, https=True, verify=ca) as server:
        yield Remote(server, fingerprint)


@pytest.fixture
def remote(cli: object, data_dir: Path) -> Iterator[Remote]:
    with remote_server(cli, data_dir) as found:
        yield found


@pytest.fixture
def client(cli: object, tmp_path: Path) -> object:
    """The CLI on a machine of its own: another data dir, without the server's CA."""

    def run(*args: str, **options: object) -> CliResult:
        return cli("--data-dir", str(tmp_path / "client"), *args, **options)  # type: ignore[operator, no-any-return]

    return run


@pytest.fixture
def login_file(tmp_path: Path) -> Path:
    return tmp_path / "xdg-config" / "appliance" / "client.json"  # under the test's XDG_CONFIG_HOME


def _login(client: object, url: str, *flags: str, password: str = PASSWORD) -> CliResult:
    result: CliResult = client(  # type: ignore[operator]
        "login", url, "--user", "alice", "--password-stdin", *flags, input=password + "\n"
    )
    return result


def test_login_with_a_password_saves_a_private_file_that_ps_uses_and_logout_revokes_its_key(
    remote: Remote, client: object, login_file: Path
) -> None:
    url = remote.server.url
    wrong_pin = _login(client, url, "--fingerprint", "sha256:" + "0" * 64)
    assert wrong_pin.returncode == 1
    assert "does not present the CA with fingerprint sha256:000" in wrong_pin.stderr
    untrusted = _login(client, url)  # the system's trust store does not know this CA
    assert untrusted.returncode == 1
    assert f"the TLS certificate of {url} is not trusted" in untrusted.stderr
    assert "hint: pin the server's CA with --fingerprint" in untrusted.stderr
    wrong_password = _login(client, url, "--fingerprint", remote.fingerprint, password="not the password")
    assert wrong_password.returncode == 1
    assert "wrong user name or password" in wrong_password.stderr
    assert not login_file.parent.exists() or not any(login_file.parent.iterdir())  # nothing written

    logged_in = _login(client, url, "--fingerprint", remote.fingerprint.upper().replace("SHA256:", ""))
    assert logged_in.returncode == 0, logged_in.stderr
    assert logged_in.stdout == f"logged in to {url} as alice (admin)\n"
    assert login_file.stat().st_mode & 0o777 == 0o600
    assert [path.name for path in login_file.parent.iterdir()] == ["client.json"]  # no partial file left
    saved = json.loads(login_file.read_text())
    assert (saved["url"], saved["name"], saved["fingerprint"]) == (url, "alice", remote.fingerprint)
    key = saved["key"]
    assert key not in logged_in.stdout + logged_in.stderr
    assert remote.status_with(key) == 200
    made = remote.server.client.get("/api/v1/keys", headers={"Authorization": f"Bearer {key}"}).json()
    assert next(found["name"] for found in made if found["id"] == saved["key_id"]).startswith("cli on ")
    assert remote.server.client.get("/api/v1/me").status_code == 401  # the session is signed out

    listed: CliResult = client("ps", "--json")  # type: ignore[operator]
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["models"] == []
    other_key: CliResult = client("ps", env={"APPLIANCE_API_KEY": "apl_notakey"})  # type: ignore[operator]
    assert other_key.returncode == 1
    assert "apl_notak" in other_key.stderr
    named: CliResult = client("ps", "--port", str(free_port()))  # type: ignore[operator]
    assert "no appliance server answers at http://127.0.0.1:" in named.stderr  # a named server wins
    again = _login(client, url, "--fingerprint", remote.fingerprint)
    assert again.returncode == 1
    assert f"already logged in to {url} as alice" in again.stderr
    assert "appliance logout" in again.stderr

    logged_out: CliResult = client("logout")  # type: ignore[operator]
    assert logged_out.returncode == 0, logged_out.stderr
    assert logged_out.stdout == f"logged out of {url}: key {saved['key_id']} revoked\n"
    assert not login_file.exists()
    assert remote.status_with(key) == 401
    twice: CliResult = client("logout")  # type: ignore[operator]
    assert twice.returncode == 1
    assert "not logged in" in twice.stderr


def test_a_user_who_is_no_admin_logs_in_and_out_and_is_refused_what_the_role_may_not_do(
    remote: Remote, cli: object, client: object, login_file: Path
) -> None:
    added: CliResult = cli(  # type: ignore[operator]
        "users", "add", "bob", "--password-stdin", input=PASSWORD + "\n"
    )
    assert added.returncode == 0, added.stderr
    logged_in: CliResult = client(  # type: ignore[operator]
        "login",
        remote.server.url,
        "--user",
        "bob",
        "--password-stdin",
        "--fingerprint",
        remote.fingerprint,
        input=PASSWORD + "\n",
    )
    assert logged_in.returncode == 0, logged_in.stderr
    assert logged_in.stdout == f"logged in to {remote.server.url} as bob (user)\n"
    key = json.loads(login_file.read_text())["key"]
    refused: CliResult = client("ps")  # type: ignore[operator]
    assert refused.returncode == 1
    assert "error: not allowed: " in refused.stderr
    assert "hint: ask an admin" in refused.stderr
    logged_out: CliResult = client("logout")  # type: ignore[operator]
    assert logged_out.returncode == 0, logged_out.stderr
    assert "revoked" in logged_out.stdout
    assert remote.status_with(key) == 401


def test_login_with_a_key_checks_it_and_logout_leaves_it_valid(
    remote: Remote, cli: object, client: object, login_file: Path
) -> None:
    url = remote.server.url
    key = cli("keys", "create", "--user", "alice").stdout.strip()  # type: ignore[operator]
    refused: CliResult = client(  # type: ignore[operator]
        "login", url, "--key-stdin", "--fingerprint", remote.fingerprint, input="apl_notakey\n"
    )
    assert refused.returncode == 1
    assert "apl_notak" in refused.stderr
    assert not login_file.exists()
    logged_in: CliResult = client(  # type: ignore[operator]
        "login", url, "--key-stdin", "--fingerprint", remote.fingerprint, input=key + "\n"
    )
    assert logged_in.returncode == 0, logged_in.stderr
    assert logged_in.stdout == f"logged in to {url} as alice (admin)\n"
    assert key not in logged_in.stdout + logged_in.stderr
    assert login_file.stat().st_mode & 0o777 == 0o600
    listed: CliResult = client("ps", "--json")  # type: ignore[operator]
    assert listed.returncode == 0, listed.stderr
    logged_out: CliResult = client("logout")  # type: ignore[operator]
    assert logged_out.returncode == 0, logged_out.stderr
    assert "the key you gave it stays valid" in logged_out.stdout
    assert not login_file.exists()
    assert remote.status_with(key) == 200


def test_a_replaced_certificate_is_refused_and_logout_from_a_server_gone_names_the_key_to_revoke(
    cli: object, data_dir: Path, client: object, login_file: Path
) -> None:
    with remote_server(cli, data_dir) as remote:
        logged_in = _login(client, remote.server.url, "--fingerprint", remote.fingerprint)
        assert logged_in.returncode == 0, logged_in.stderr
    key_id = json.loads(login_file.read_text())["key_id"]
    assert cli("tls", "init", "--force").returncode == 0  # type: ignore[operator]
    ca = ssl.create_default_context(cafile=data_dir / "tls" / "ca.crt")
    env = {"APPLIANCE_SERVER__AUTH": "on"}
    with serving(data_dir, env=env, https=True, verify=ca) as replaced:
        # the saved login still names the old port; point a copy of it at the new server
        saved = json.loads(login_file.read_text())
        login_file.write_text(json.dumps({**saved, "url": replaced.url}))
        refused: CliResult = client("ps")  # type: ignore[operator]
        assert refused.returncode == 1
        assert f"presents no certificate of the CA pinned at login ({remote.fingerprint})" in refused.stderr
        assert "hint: if its certificate was replaced on purpose, run `appliance logout`" in refused.stderr
        login_file.write_text(json.dumps(saved))
    gone: CliResult = client("ps")  # type: ignore[operator]
    assert gone.returncode == 1
    assert (
        f"no appliance server answers at {remote.server.url} (from the login in {login_file})" in gone.stderr
    )
    logged_out: CliResult = client("logout")  # type: ignore[operator]
    assert logged_out.returncode == 0, logged_out.stderr
    assert f"warning: key {key_id} stays valid until an admin revokes it" in logged_out.stderr
    assert f"appliance keys revoke {key_id}" in logged_out.stderr
    assert not login_file.exists()


def test_wrong_passwords_over_the_limit_are_refused_with_when_to_try_again(
    cli: object, data_dir: Path, client: object, login_file: Path
) -> None:
    with remote_server(cli, data_dir, APPLIANCE_SERVER__LOGIN_ATTEMPTS="1") as remote:
        url = remote.server.url
        first = _login(client, url, "--fingerprint", remote.fingerprint, password="not the password")
        assert "wrong user name or password" in first.stderr
        throttled = _login(client, url, "--fingerprint", remote.fingerprint, password="not the password")
    assert throttled.returncode == 1
    assert re.search(r"hint: try again in \d+ seconds", throttled.stderr), throttled.stderr
    assert not login_file.parent.exists()


@pytest.mark.parametrize(
    ("url", "flags", "message"),
    [
        ("ftp://box.lan", [], "is not a server's address"),
        ("https://box.lan:8080/api", [], "is not a server's address"),
        ("https://alice@box.lan:8080", [], "is not a server's address"),
        ("http://127.0.0.1:{port}", ["--fingerprint", "sha256:" + "0" * 64], "is plain HTTP"),
        ("https://127.0.0.1:{port}", ["--fingerprint", "sha256:abc"], "is not a SHA-256 fingerprint"),
        ("https://127.0.0.1:{port}", ["--fingerprint", "sha256:" + "0" * 64], "cannot reach 127.0.0.1:"),
        ("http://127.0.0.1:{port}", [], "cannot reach http://127.0.0.1:"),
    ],
)
def test_login_refuses_what_it_cannot_use_and_writes_nothing(
    client: object, login_file: Path, url: str, flags: list[str], message: str
) -> None:
    result = _login(client, url.format(port=free_port()), *flags)
    assert result.returncode == 1
    assert message in result.stderr
    assert "hint: " in result.stderr
    assert "Traceback" not in result.stderr
    assert not login_file.parent.exists()


def test_login_to_a_server_that_asks_for_no_key_is_refused(
    server: Server, client: object, login_file: Path
) -> None:
    result = _login(client, server.url)
    assert result.returncode == 1
    assert "asks for no API key: there is nothing to log in to" in result.stderr
    assert not login_file.parent.exists()


def test_login_options_that_contradict_and_a_broken_login_file_are_refused(
    client: object, login_file: Path
) -> None:
    both: CliResult = client("login", "https://box.lan:8080", "--key-stdin", "--password-stdin")  # type: ignore[operator]
    assert both.returncode == 2
    assert "--key-stdin saves a key" in both.stderr
    login_file.parent.mkdir(parents=True)
    login_file.write_text("{not json")
    for command in (["ps"], ["logout"], ["login", "https://box.lan:8080"]):
        broken: CliResult = client(*command)  # type: ignore[operator]
        assert broken.returncode == 1
        assert f"the login file {login_file} is not one `appliance login` wrote" in broken.stderr
        assert f"rm {login_file}" in broken.stderr
    assert login_file.read_text() == "{not json"


def test_the_mcp_stdio_bridge_reaches_the_logged_in_server_with_its_pinned_ca_and_key(
    remote: Remote, client: object, tmp_path: Path
) -> None:
    """A desktop client launching `appliance mcp stdio` with no URL and no key in its config gets
    the server `appliance login` saved: its address, its key, and its CA, which no system trusts."""
    logged_in = _login(client, remote.server.url, "--fingerprint", remote.fingerprint)
    assert logged_in.returncode == 0, logged_in.stderr

    async def tools() -> list[str]:
        command = ["-m", "appliance", "--data-dir", str(tmp_path / "client"), "mcp", "stdio"]
        env = {name: value for name, value in os.environ.items() if name != "APPLIANCE_API_KEY"}
        parameters = StdioServerParameters(command=sys.executable, args=command, env=env)
        async with stdio_client(parameters) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return [tool.name for tool in (await session.list_tools()).tools]

    assert "preference.get" in asyncio.run(tools())  # an admin's key: alice's
