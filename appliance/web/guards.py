"""The guards of the web layer, and only here:

- beyond loopback, serving needs TLS (or an explicit ``--insecure-http``), checked before the
  server starts; API keys are then required too (``Settings.auth_enabled``);
- who is calling: the ``Actor``, identified once per request and kept in its state;
- the host and cross-site checks before every handler, which keep web pages from driving the
  appliance, and the security headers on every response (errors and static files included),
  which keep them from framing it.

Imports: identity, errors and settings only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from litestar import Request, Response
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from appliance.errors import Forbidden, InvalidInput
from appliance.identity import Actor
from appliance.settings import Settings

__all__ = [
    "SECURITY_HEADERS",
    "SecurityHeaders",
    "request_actor",
    "request_guard",
]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

# The UI and the docs page load only their own scripts, styles and data (images from data: URIs are
# Swagger UI's icons); nothing may frame them, and no page learns where the admin came from.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def _allow(request: Request[Any, Any, Any]) -> Response[None]:
    """OPTIONS: every method of the path. (Litestar's own answer lists only some of them when a
    path's handlers are declared separately: its handler keeps the first route it was made for.)"""
    template = request.scope.get("path_template")
    methods = {
        method
        for route in request.app.routes
        if template in (route.path, route.path_format)
        for method in route.methods
    }
    return Response(None, status_code=204, headers={"Allow": ", ".join(sorted(methods or {"OPTIONS"}))})


def request_actor(request: Request[Any, Any, Any]) -> Actor:
    """Who sent the request, identified once per request: an anonymous client by its address,
    unless the auth guard (``web/auth.py``, with ``server.auth`` on) has put the key's actor here."""
    actor: Actor | None = request.state.get("actor")
    if actor is None:
        actor = Actor.client(request.client.host if request.client else "unknown")
        request.state.actor = actor
    return actor


def request_guard(settings: Settings) -> Callable[[Request[Any, Any, Any]], Awaitable[Response[None] | None]]:
    """The check every request passes before its handler, as an error each surface shapes its own way."""
    # The names clients may use: loopback, the bound address and the public names (server.public_names),
    # each bare or with the port; IPv6 addresses bracketed as a Host header writes them.
    hosts = {*LOOPBACK_NAMES, settings.host, *settings.server.public_names}
    bracketed = {f"[{host}]" if ":" in host and not host.startswith("[") else host for host in hosts}
    allowed = {name.lower() for host in bracketed for name in (host, f"{host}:{settings.port}")}

    async def guard(request: Request[Any, Any, Any]) -> Response[None] | None:
        request_actor(request)
        host = request.headers.get("host")
        # Only known names: a DNS-rebinding page on another name gets 400, never our API.
        if host is None or host.lower() not in allowed:  # host names are case-insensitive
            raise InvalidInput(
                f"refused a request for host {host!r}: this appliance answers only to {settings.host}"
                + "".join(f", {name}" for name in settings.server.public_names),
                hint="use 127.0.0.1 (or the address the appliance binds) in the URL, or add the name "
                "to the server.public_names setting",
            )
        # A page the admin happens to visit must not change anything: a browser's state-changing
        # request from another origin is refused (API clients send no Origin).
        if request.method == "OPTIONS":
            return _allow(request)
        if request.method in ("GET", "HEAD"):
            return None
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != host:
            raise Forbidden(
                f"refused a cross-site {request.method} from {origin}",
                hint="use the UI served by the appliance itself, or a client that is not a web page",
            )
        return None

    return guard


class SecurityHeaders:
    """ASGI middleware: adds SECURITY_HEADERS to every HTTP response that does not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in self.headers if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
