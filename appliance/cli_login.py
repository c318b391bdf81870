"""``appliance login URL`` and ``appliance logout``: the server the CLI reaches, a key for it and its
pinned certificate, kept in the login file (the ``client_config`` setting). ``appliance/client.py``
says when commands that talk to a server use it.

With a password, login signs in (``POST /api/v1/login``), makes a key for this machine with that
session (``POST /api/v1/keys``, with the CSRF header) and signs out again; logout revokes that key.
With ``--key-stdin`` it checks a key the user already has (``GET /api/v1/me``); logout then leaves
that key alone: login did not make it, and it may serve elsewhere.

Attached to the ``appliance`` group by ``appliance/cli.py``. Imports: the client and tls.
"""

from __future__ import annotations

import contextlib
import getpass
import re
import socket
import sys
from typing import TYPE_CHECKING, Any

import click

from appliance.cli import stderr
from appliance.errors import ApplianceError, Conflict, CredentialsRefused, InvalidInput, NotFound, NotReady

# httpx, the client and tls load when login or logout runs, not with every command's --help.
if TYPE_CHECKING:
    import ssl

    import httpx

    from appliance.client import Login, ServerAddress
    from appliance.settings import Settings

__all__ = ["login", "logout"]

_FINGERPRINT = re.compile(r"^(?:sha256:)?((?:[0-9a-f]{2}:?){31}[0-9a-f]{2})$")


def _pinned(server: ServerAddress, fingerprint: str) -> tuple[str, str]:
    """The fingerprint, written as ``tls show`` prints it, and the PEM of the certificate it pins."""
    if not server.url.startswith("https:"):
        raise InvalidInput(
            f"--fingerprint pins a TLS certificate, and {server.url} is plain HTTP",
            hint="use the https:// URL",
        )
    match = _FINGERPRINT.match(fingerprint.strip().lower())
    if match is None:
        raise InvalidInput(
            f"{fingerprint!r} is not a SHA-256 fingerprint",
            hint="pass it as `appliance tls show` on the server prints it: sha256: and 64 hex digits",
        )
    from appliance.tls import fetch_pinned_ca

    normal = "sha256:" + match.group(1).replace(":", "")
    return normal, fetch_pinned_ca(server.host, server.port, normal)


def _call(http: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON the server answers with; its refusal, or why it could not be reached, as our errors."""
    import httpx

    from appliance.client import ServerError

    server = str(http.base_url).rstrip("/")
    try:
        response = http.request(method, path, **kwargs)
    except httpx.ConnectError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise CredentialsRefused(
                f"the TLS certificate of {server} is not trusted: {exc}",
                hint="pin the server's CA with --fingerprint sha256:… (`appliance tls show` there prints it)",
            ) from exc
        raise NotReady(f"cannot reach {server}: {exc}", hint="check the URL and that it runs") from exc
    except httpx.TransportError as exc:
        raise NotReady(f"no answer from {server}: {exc}", hint="check the URL and that it runs") from exc
    if response.is_error:
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text or response.reason_phrase}
        error = ServerError(body if isinstance(body, dict) else {"detail": str(body)}, response.status_code)
        if response.status_code == 429 and "retry-after" in response.headers:
            error.hint = f"try again in {response.headers['retry-after']} seconds"
        raise error
    return response.json()


def _require_keys(http: httpx.Client) -> None:
    """Refuse a server that asks for no key: there would be nothing to log in to."""
    from appliance.client import ServerError

    try:
        me = _call(http, "GET", "/api/v1/me")
    except ServerError as exc:
        if exc.status == 401:
            return  # keys are on
        raise
    if not me.get("auth"):
        server = str(http.base_url).rstrip("/")
        raise InvalidInput(
            f"the server at {server} asks for no API key: there is nothing to log in to",
            hint="commands reach it with --host/--port; to ask for keys, serve it with server.auth = on",
        )


def _make_key(http: httpx.Client, user: str, password: str) -> dict[str, Any]:
    """Sign in, make a key for this machine with the session, sign out again."""
    from appliance.auth.service import MAX_KEY_NAME

    session = _call(http, "POST", "/api/v1/login", json={"name": user, "password": password})
    csrf = {"X-CSRF-Token": session["csrf_token"]}
    try:
        name = f"cli on {socket.gethostname()}"[:MAX_KEY_NAME]
        made: dict[str, Any] = _call(http, "POST", "/api/v1/keys", json={"name": name}, headers=csrf)
    finally:
        # Best effort: the cookie dies with this client, and the session expires on the server anyway.
        with contextlib.suppress(ApplianceError):
            _call(http, "POST", "/api/v1/logout", headers=csrf)
    return made


def _read_line(what: str) -> str:
    line = sys.stdin.readline().strip("\r\n")
    if not line:
        raise InvalidInput(f"stdin held no {what}", hint=f"pipe the {what} in, on the first line")
    return line


@click.command()
@click.argument("url")
@click.option("--user", help="The account to sign in as (default: your user name here).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
@click.option("--key-stdin", is_flag=True, help="Save an API key you have (first line of stdin) instead.")
@click.option("--fingerprint", help="Trust the server's self-signed CA with this sha256: fingerprint.")
@click.pass_context
def login(
    ctx: click.Context,
    url: str,
    user: str | None,
    password_stdin: bool,
    key_stdin: bool,
    fingerprint: str | None,
) -> None:
    """Sign in to a server and save it, with a key made for this machine, in the login file
    (0600): then ps and models load/unload reach it. --fingerprint pins a self-signed certificate
    (`appliance tls show` on the server prints it); without it the system's trust store decides.

    Example: appliance login https://box.lan:8080 --user alice --fingerprint sha256:3b1f…
    """
    import httpx

    from appliance.client import Login, pinned_trust, read_login, write_login

    if key_stdin and (password_stdin or user):
        raise click.UsageError(
            "--key-stdin saves a key, which says who it is: drop --user and --password-stdin"
        )
    settings: Settings = ctx.obj["settings"]()
    path = settings.client_config
    saved = read_login(path)
    if saved is not None:
        raise Conflict(
            f"already logged in to {saved.url} as {saved.name} ({path})", hint="run `appliance logout` first"
        )
    from appliance.client import server_address

    server = server_address(url)
    pin, ca_pem = _pinned(server, fingerprint) if fingerprint else (None, None)
    trust: ssl.SSLContext | bool = pinned_trust(ca_pem) if ca_pem else True
    with httpx.Client(base_url=server.url, verify=trust, timeout=30) as http:
        _require_keys(http)  # before the password is asked for: the address and its trust are right
        if key_stdin:
            key = _read_line("API key")
            me = _call(http, "GET", "/api/v1/me", headers={"Authorization": f"Bearer {key}"})
            name, role, key_id = str(me["name"]), str(me["role"]), None
        else:
            name = user or getpass.getuser()
            password = (
                _read_line("password")
                if password_stdin
                else getpass.getpass(f"Password of {name} at {server.url}: ")
            )
            made = _make_key(http, name, password)
            key, role, key_id = str(made["key"]), str(made["role"]), str(made["id"])
    write_login(path, Login(server.url, key, key_id, name, role, fingerprint=pin, ca_pem=ca_pem))
    click.echo(f"logged in to {server.url} as {name} ({role})")
    stderr.print(
        f"saved in {path}: ps and models load/unload reach this server; `appliance logout` forgets it"
    )


@click.command()
@click.pass_context
def logout(ctx: click.Context) -> None:
    """Revoke the key `appliance login` made on its server, and delete the login file. The file
    goes even when the server cannot be reached (a warning names the key to revoke there).

    Example: appliance logout
    """
    from appliance.client import read_login, remove_login

    settings: Settings = ctx.obj["settings"]()
    path = settings.client_config
    saved = read_login(path)
    if saved is None:
        raise NotFound(
            f"not logged in: there is no login file {path}", hint="`appliance login URL` makes one"
        )
    outcome = _revoke(saved) if saved.key_id is not None else "the key you gave it stays valid"
    remove_login(path)
    click.echo(f"logged out of {saved.url}: {outcome}")


def _revoke(saved: Login) -> str:
    """Revoke the login's key with itself; what happened, as a warning when it may still be valid."""
    import httpx

    from appliance.client import ServerError

    headers = {"Authorization": f"Bearer {saved.key}"}
    try:
        with httpx.Client(base_url=saved.url, verify=saved.trust(), headers=headers, timeout=30) as http:
            _call(http, "DELETE", f"/api/v1/keys/{saved.key_id}")
    except ServerError as exc:
        if exc.status == 401:
            return f"key {saved.key_id} was revoked or had expired already"
        stderr.print(f"warning: the server did not revoke key {saved.key_id}: {exc.message}")
    except ApplianceError as exc:
        stderr.print(f"warning: {exc.message}")
    else:
        return f"key {saved.key_id} revoked"
    stderr.print(
        f"warning: key {saved.key_id} stays valid until an admin revokes it: "
        f"appliance keys revoke {saved.key_id}"
    )
    return f"key {saved.key_id} not revoked"
