"""The CLI's way to a running server, for what only the server can do (load, unload, ps), and the
login file ``appliance login`` writes.

Which server, with which key and trust:

1. a host or port named anywhere (``--host``/``--port``, ``APPLIANCE_HOST``/``APPLIANCE_PORT``, the
   config file): that server, as ``serve`` there would run, with the ``api_key`` setting and the
   data dir's certificate (when ``tls init`` made one);
2. else, when the login file exists (the ``client_config`` setting,
   ``$XDG_CONFIG_HOME/appliance/client.json``): its server, its key and its pinned CA (else the
   system's trust store); ``APPLIANCE_API_KEY`` overrides its key;
3. else the default address, 127.0.0.1:8080, as in 1.

The login key never goes to a server other than the one it was made for.

Imports: errors, settings and tls.
"""

from __future__ import annotations

import json
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from appliance.errors import ApplianceError, CredentialsRefused, InvalidInput, InvalidSetting, NotReady
from appliance.settings import Settings, url_host
from appliance.tls import tls_files

__all__ = [
    "Connection",
    "Login",
    "ServerAddress",
    "ServerClient",
    "ServerError",
    "connection",
    "read_login",
    "remove_login",
    "server_address",
    "write_login",
    "write_private",
]


class ServerError(ApplianceError):
    """An error the server answered with; carries its code, status and hint through to the CLI."""

    def __init__(self, body: dict[str, Any], status: int) -> None:
        super().__init__(str(body.get("detail") or body), hint=str(body.get("hint") or ""))
        self.code = str(body.get("code") or "server_error")  # type: ignore[misc]
        self.status = status  # type: ignore[misc]


@dataclass(frozen=True)
class Login:
    """What the login file holds: the server, the key for it and how its certificate is trusted."""

    url: str
    key: str
    key_id: str | None  # the key `login` made, which `logout` revokes; None: a key the user brought
    name: str  # who the key acts as, and with which role, when it was checked
    role: str
    fingerprint: str | None = None  # the pinned CA's; None: the system's trust store (or plain HTTP)
    ca_pem: str | None = None

    def trust(self) -> ssl.SSLContext | bool:
        return pinned_trust(self.ca_pem) if self.ca_pem else True


def pinned_trust(ca_pem: str) -> ssl.SSLContext:
    """Trust the one pinned certificate, and nothing else."""
    context = ssl.create_default_context(cadata=ca_pem)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a pinned certificate needs no root above it
    return context


def read_login(path: Path) -> Login | None:
    """The login file at ``path``, or None when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidSetting(
            f"cannot read the login file {path}: {exc.strerror or exc}",
            hint="check its permissions, or set APPLIANCE_CLIENT_CONFIG to another file",
        ) from exc
    try:
        fields = json.loads(text)
        return Login(**fields)
    except (ValueError, TypeError) as exc:
        raise InvalidSetting(
            f"the login file {path} is not one `appliance login` wrote",
            hint=f"delete it and run `appliance login URL` again: rm {path}",
        ) from exc


def write_login(path: Path, login: Login) -> None:
    """Write the login file 0600 from birth: a failure leaves the old file or none."""
    write_private(
        path,
        json.dumps(asdict(login), indent=2),
        what="the login file",
        hint="check that its directory is writable, or set APPLIANCE_CLIENT_CONFIG to another file",
    )


def write_private(path: Path, text: str, *, what: str, hint: str) -> None:
    """Write ``text`` to ``path`` 0600 from birth (a file holding a secret), through a temporary
    file and a rename: a failure leaves the old file or none, never half of one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            with os.fdopen(descriptor, "w") as out:  # mkstemp makes it 0600
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(partial, path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise InvalidSetting(f"cannot write {what} {path}: {exc.strerror or exc}", hint=hint) from exc


@dataclass(frozen=True)
class ServerAddress:
    url: str  # scheme://host:port, the port written out
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.url.startswith("https:")


def server_address(text: str) -> ServerAddress:
    """``text`` as a server's address, or an error saying how to write it."""
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise InvalidInput(f"{text!r} is not a URL: {exc}", hint="write it as https://HOST:PORT") from exc
    if (
        url.scheme not in ("http", "https")
        or not url.host
        or url.userinfo
        or url.path not in ("", "/")
        or url.query
        or url.fragment
    ):
        raise InvalidInput(
            f"{text!r} is not a server's address",
            hint="write it as https://HOST:PORT (http://HOST:PORT for a server on plain HTTP), with no path",
        )
    port = url.port or (443 if url.scheme == "https" else 80)
    return ServerAddress(f"{url.scheme}://{url_host(url.host)}:{port}", url.host, port)


def remove_login(path: Path) -> None:
    try:
        path.unlink()
    except OSError as exc:
        raise InvalidSetting(
            f"cannot delete the login file {path}: {exc.strerror or exc}",
            hint="check the permissions of its directory, then delete it by hand",
        ) from exc


def _data_dir_trust(settings: Settings) -> ssl.SSLContext | None:
    """What trusts the server's certificate when it serves HTTPS (as ``serve`` decides), else None."""
    configured = settings.server.tls_cert
    made = tls_files(settings)
    if configured is None and not made.server.cert.exists():
        return None
    context = ssl.create_default_context()
    if configured is not None:  # its own chain is trusted, whoever issued it
        context.load_verify_locations(configured)
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    else:
        context.load_verify_locations(made.ca_cert)
    return context


def server_named(settings: Settings) -> bool:
    """Whether a flag, the environment or the config file named the server's host or port."""
    return bool({"host", "port"} & settings.model_fields_set)


@dataclass(frozen=True)
class Connection:
    """Which server the CLI talks to, how it trusts its certificate, and the key it sends."""

    url: str  # scheme://host:port
    verify: ssl.SSLContext | bool
    key: str | None
    login: Login | None
    key_from_login: bool


def connection(settings: Settings) -> Connection:
    """The login's server (unless a flag, the environment or the config file names one), else
    the host and port settings, over HTTPS when this data dir's server serves it."""
    login = None if server_named(settings) else read_login(settings.client_config)
    verify: ssl.SSLContext | bool
    if login is not None:
        url = login.url
        verify = login.trust()
    else:
        data_dir_trust = _data_dir_trust(settings)
        scheme = "http" if data_dir_trust is None else "https"
        url = f"{scheme}://{url_host(settings.host)}:{settings.port}"
        verify = data_dir_trust or True
    # With server.auth on, the server wants a key: APPLIANCE_API_KEY (the api_key setting)
    # before the login's.
    key = settings.api_key.get_secret_value() if settings.api_key else None
    login_key = login.key if login is not None else None
    return Connection(url, verify, key or login_key, login, key is None and login_key is not None)


class ServerClient:
    def __init__(self, settings: Settings, *, timeout: float = 600) -> None:
        found = connection(settings)
        self.login = found.login
        self.url = found.url
        self._login_file = settings.client_config
        self._key_from_login = found.key_from_login
        headers = {"Authorization": f"Bearer {found.key}"} if found.key else {}
        self._client = httpx.Client(base_url=self.url, timeout=timeout, verify=found.verify, headers=headers)

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._client.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise self._error(response)
        return response.json()

    def events(self, path: str) -> Iterator[tuple[str, Any]]:
        """A server-sent event stream: each event's name and its data (JSON), until the server ends it."""
        try:
            with self._client.stream("GET", path, timeout=httpx.Timeout(None, connect=30)) as response:
                if response.is_error:
                    response.read()
                    raise self._error(response)
                name = "message"
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        name = line.partition(":")[2].strip()
                    elif line.startswith("data:"):
                        yield name, json.loads(line.partition(":")[2])
                        name = "message"
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.TransportError) -> ApplianceError:
        if self.login is not None and "CERTIFICATE_VERIFY_FAILED" in str(exc):
            fingerprint = self.login.fingerprint
            why = f"presents no certificate of the CA pinned at login ({fingerprint})"
            return CredentialsRefused(
                f"the server at {self.url} {why if fingerprint else 'is not trusted here'}: {exc}",
                hint="if its certificate was replaced on purpose, run `appliance logout`, then "
                "`appliance login` with the fingerprint `appliance tls show` prints there",
            )
        if self.login is not None:
            return NotReady(
                f"no appliance server answers at {self.url} (from the login in {self._login_file}): {exc}",
                hint="check that it runs and that this machine reaches it; `appliance logout` "
                "forgets it, --host/--port name another server",
            )
        return NotReady(
            f"no appliance server answers at {self.url}",
            hint="start it with `appliance serve`, or pass the --host/--port (or --config) it runs with",
        )

    def _error(self, response: httpx.Response) -> ServerError:
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text or response.reason_phrase}
        error = ServerError(body if isinstance(body, dict) else {"detail": str(body)}, response.status_code)
        if response.status_code == 401 and self._key_from_login:
            error.hint = (
                "the server no longer takes the key of your login: run `appliance logout`, then "
                f"`appliance login {self.url}`"
            )
        return error
