"""The CLI's way to a running server, for what only the server can do (load, unload, ps)."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from appliance.errors import ApplianceError, NotReady
from appliance.settings import Settings
from appliance.tls import tls_files

__all__ = ["ServerClient", "ServerError", "url_host"]


def url_host(host: str) -> str:
    """``host`` as a URL writes it: an IPv6 address in brackets (``[::1]``), once."""
    bare = host.strip("[]")
    return f"[{bare}]" if ":" in bare else bare


class ServerError(ApplianceError):
    """An error the server answered with; carries its code, status and hint through to the CLI."""

    def __init__(self, body: dict[str, Any], status: int) -> None:
        super().__init__(str(body.get("detail") or body), hint=str(body.get("hint") or ""))
        self.code = str(body.get("code") or "server_error")  # type: ignore[misc]
        self.status = status  # type: ignore[misc]


def _server_trust(settings: Settings) -> ssl.SSLContext | None:
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


class ServerClient:
    def __init__(self, settings: Settings, *, timeout: float = 600) -> None:
        verify = _server_trust(settings)
        scheme = "http" if verify is None else "https"
        self.url = f"{scheme}://{url_host(settings.host)}:{settings.port}"
        # With server.auth on, the server wants a key: APPLIANCE_API_KEY (the api_key setting).
        key = settings.api_key.get_secret_value() if settings.api_key else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            base_url=self.url, timeout=timeout, verify=verify or True, headers=headers
        )

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._client.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise NotReady(
                f"no appliance server answers at {self.url}",
                hint="start it with `appliance serve`, or pass the --host/--port (or --config) it runs with",
            ) from exc
        if response.is_error:
            try:
                body = response.json()
            except ValueError:
                body = {"detail": response.text or response.reason_phrase}
            raise ServerError(body if isinstance(body, dict) else {"detail": str(body)}, response.status_code)
        return response.json()
