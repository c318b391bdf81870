"""``/mcp``: the MCP gateway over Streamable HTTP, and ``/api/v1/mcp/tools``: what a caller may call.

``/mcp`` is an ordinary route (POST, GET, DELETE) whose handler hands the request to the SDK's
session manager, stateless and answering plain JSON: every POST stands alone, so nothing pins a
client to a server or a forwarder to a session. Being a route, the auth guard runs on it as on
every other (``mcp.tool.invoke``); its refusals here (401, 403) are audited as ``mcp.call``
denied, naming the tool the refused body called. The handler passes the SDK the caller: the
guard's actor and, for a job's call, the ``TaskScope`` its forwarder vouched for.

Imports: the gateway (``appliance.mcp``), errors, audit and the web layer's guards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from litestar import Litestar, Request, Response, get, route
from litestar.datastructures import State
from litestar.types import ASGIApp, Receive, Scope, Send
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from pydantic import BaseModel

from appliance.audit import AuditNote, record
from appliance.errors import ApplianceError, Forbidden, NotFound, Unauthorized
from appliance.identity import TaskScope
from appliance.mcp.server import CALLER_KEY, Caller, Gateway
from appliance.mcp.types import TASK_ONLY_TOOLS
from appliance.runtime import Runtime
from appliance.tasks.forwarder import MCP_PATH
from appliance.web.dependencies import provide_context

__all__ = ["McpToolOut", "mcp_endpoint", "mcp_lifespan", "mcp_tools"]


_Guard = Callable[[Request[Any, Any, Any]], Awaitable[Response[None] | None]]


@dataclass(frozen=True)
class _Mcp:
    gateway: Gateway
    manager: StreamableHTTPSessionManager


@asynccontextmanager
async def mcp_lifespan(app: Litestar) -> AsyncIterator[None]:
    """The gateway and its session manager, for the app's life (after the runtime's lifespan)."""
    runtime: Runtime = app.state.runtime
    gateway = Gateway(runtime)
    manager = StreamableHTTPSessionManager(
        gateway.server,
        stateless=True,
        json_response=True,
        max_request_body_size=int(runtime.settings.server.max_body_bytes),
    )
    app.state.mcp = _Mcp(gateway, manager)
    # Host and origin checks are the app's guard's (web/guards.py): the SDK's own stay off (its
    # default). The SDK logs every request at INFO; the access log and the audit already say it.
    logging.getLogger("mcp.server").setLevel(logging.WARNING)
    async with manager.run():
        yield


def _mcp(state: State) -> _Mcp:
    mcp: _Mcp = state.mcp
    return mcp


def _caller(request: Request[Any, Any, Any]) -> Caller:
    context = provide_context(request)
    scope: TaskScope | None = request.state.get("task_scope")
    return Caller(actor=context.who, scope=scope, correlation_id=context.correlation_id)


async def _guard_audited(request: Request[Any, Any, Any]) -> Response[None] | None:
    """The app's guard; a request it refuses is audited (and counted) as an MCP call denied."""
    started = time.monotonic()
    try:
        answered = await cast(_Guard, request.app.before_request)(request)
    except (Unauthorized, Forbidden) as exc:
        target = await _called(request)
        note = AuditNote(
            target=target,
            outcome="error",
            detail={
                "result": "denied",
                "code": exc.code,
                "reason": exc.message,
                "request_bytes": int(request.headers.get("content-length") or 0),
                "response_bytes": None,  # unknown here: the error handler writes the answer next
                "truncated": False,
            },
        )
        runtime: Runtime = request.app.state.runtime
        seconds = time.monotonic() - started
        context = provide_context(request)
        await asyncio.to_thread(
            record, runtime.store, context, action="mcp.call", note=note, duration_ms=round(seconds * 1000)
        )
        _mcp(request.app.state).gateway.observe(target, "denied", seconds)
        raise
    return answered


async def _called(request: Request[Any, Any, Any]) -> str:
    """What a refused request asked for: the tool a ``tools/call`` names, else its JSON-RPC method."""
    if request.method != "POST":
        return f"{request.method} {MCP_PATH}"
    try:
        message = json.loads(await request.body())
    except (ValueError, ApplianceError):  # not JSON, or a body past server.max_body_bytes
        return "(not JSON-RPC)"
    if not isinstance(message, dict):
        return "(a batch)" if isinstance(message, list) else "(not JSON-RPC)"
    params = message.get("params")
    if (
        message.get("method") == "tools/call"
        and isinstance(params, dict)
        and isinstance(params.get("name"), str)
    ):
        return str(params["name"])[:200]
    return str(message.get("method", "(no method)"))[:200]


@route(
    MCP_PATH,
    http_method=["POST", "GET", "DELETE"],
    before_request=_guard_audited,
    include_in_schema=False,  # a protocol of its own, described by tools/list
)
async def mcp_endpoint(request: Request[Any, Any, Any], state: State) -> ASGIApp:
    """Hands the request to the SDK with its caller in the ASGI scope."""
    runtime: Runtime = state.runtime
    if not runtime.settings.mcp.enabled:
        raise NotFound(
            "the MCP gateway is off on this appliance",
            hint="set mcp.enabled = true (APPLIANCE_MCP__ENABLED=1)",
        )
    manager = _mcp(state).manager
    scope = cast(Scope, {**request.scope, CALLER_KEY: _caller(request)})

    async def answer(_scope: Scope, receive: Receive, send: Send) -> None:
        await manager.handle_request(scope, receive, send)  # type: ignore[arg-type]

    return answer


class McpToolOut(BaseModel):
    name: str
    title: str
    description: str
    action: str  # the policy action a caller's role needs (a task's job needs the tool granted instead)
    task_only: bool  # only a task's job may call it
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


@get("/api/v1/mcp/tools", tags=["mcp"], sync_to_thread=True)
def mcp_tools(request: Request[Any, Any, Any], state: State) -> list[McpToolOut]:
    """The MCP tools the caller may call, with their action and schemas."""
    tools = []
    for tool in _mcp(state).gateway.visible(_caller(request)):
        input_schema, output_schema = tool.schemas()
        tools.append(
            McpToolOut(
                name=tool.name,
                title=tool.title,
                description=tool.description,
                action=tool.action,
                task_only=tool.name in TASK_ONLY_TOOLS,
                input_schema=input_schema,
                output_schema=output_schema,
            )
        )
    return tools
