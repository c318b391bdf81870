"""Joining: check the server's address against the token, pin its CA, trade the token for a node
credential, and keep it in ``worker.json``.

    https://HOST:PORT  the token carries the CA's fingerprint: the CA is fetched and pinned
                       (tls.fetch_pinned_ca) before the token's secret is sent
    http://HOST:PORT   only to a loopback host (the token says ``-``), unless insecure_http

Blocking. Imports: errors, settings, tls, client (the pinned trust), cluster (tokens, agent).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from appliance.client import ServerAddress, pinned_trust, server_address
from appliance.cluster.agent import WorkerConfig, problem_detail
from appliance.cluster.tokens import JoinTokenText, parse_join_token
from appliance.errors import ApplianceError, Conflict, InvalidInput, InvalidSetting, NotReady, Unauthorized
from appliance.settings import is_loopback_host

__all__ = ["ServerAddress", "join", "server_address"]

JOIN_TIMEOUT = 30.0


def _trust(server: ServerAddress, token: JoinTokenText, *, insecure_http: bool) -> str | None:
    """The pinned CA's PEM for an https server; None for plain HTTP (where that is allowed)."""
    if server.tls:
        if token.fingerprint is None:
            raise InvalidInput(
                f"the token is for a server on plain HTTP, and {server.url} is https: there is no"
                " fingerprint to pin its certificate with",
                hint="make a token on the server after `appliance tls init` (it then carries the"
                " fingerprint), or join its http:// address",
            )
        from appliance.tls import fetch_pinned_ca

        return fetch_pinned_ca(server.host, server.port, token.fingerprint)
    if token.fingerprint is not None:
        raise InvalidInput(
            f"the token carries the fingerprint of the server's TLS certificate, and {server.url} is"
            " plain HTTP",
            hint="join its https:// address",
        )
    if not is_loopback_host(server.host) and not insecure_http:
        raise InvalidInput(
            f"refusing to join {server.url} over plain HTTP: anyone on that network could read the"
            " node credential and the models, and change the work",
            hint="serve it with TLS (`appliance tls init` there, then a new token), or pass"
            " --insecure-http to join anyway",
        )
    return None


def join(
    url: str,
    token_text: str,
    *,
    name: str,
    data_dir: Path,
    capabilities: Callable[[], dict[str, Any]],
    insecure_http: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> WorkerConfig:
    """Trade the token for this node's credential and write ``worker.json`` (0600). ``capabilities``
    is asked for once the token and the address have passed their checks."""
    token = parse_join_token(token_text)
    server = server_address(url)
    existing = WorkerConfig.read(data_dir)
    if existing is not None:
        where = "another server" if existing.server != server.url else "this server"
        raise Conflict(
            f"{data_dir} is already joined to {where} ({existing.server}) as node {existing.name}",
            hint="`appliance worker run` runs it again; to join elsewhere, use another --data-dir"
            f" (or delete {WorkerConfig.path(data_dir)})",
        )
    ca_pem = _trust(server, token, insecure_http=insecure_http)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)  # the capabilities report its free disk
    except OSError as exc:
        raise InvalidSetting(f"cannot make the data dir {data_dir}: {exc.strerror or exc}") from exc
    body = {"token": str(token), "name": name, "capabilities": capabilities()}
    try:
        with httpx.Client(
            base_url=server.url,
            verify=pinned_trust(ca_pem) if ca_pem else True,
            timeout=JOIN_TIMEOUT,
            transport=transport,
            trust_env=False,
        ) as client:
            response = client.post("/api/v1/cluster/join", json=body)
    except httpx.TransportError as exc:
        raise NotReady(f"cannot reach {server.url}: {exc}", hint="check the URL and that it runs") from exc
    if response.status_code == 401:
        raise Unauthorized(
            f"the server at {server.url} refused the join token: {problem_detail(response)}",
            hint="it may be expired or revoked: make a new one there (`appliance nodes token create`)",
        )
    if response.status_code == 409:
        raise Conflict(
            f"the server at {server.url} refused the join: {problem_detail(response)}",
            hint="pick another name with --name",
        )
    if response.is_error:
        raise _server_error(response)
    joined = response.json()
    config = WorkerConfig(
        server=server.url,
        node_id=str(joined["node_id"]),
        name=str(joined["name"]),
        credential=str(joined["credential"]),
        fingerprint=token.fingerprint,
        ca_pem=ca_pem,
    )
    config.write(data_dir)
    return config


def _server_error(response: httpx.Response) -> ApplianceError:
    from appliance.client import ServerError

    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text or response.reason_phrase}
    return ServerError(body if isinstance(body, dict) else {"detail": str(body)}, response.status_code)
