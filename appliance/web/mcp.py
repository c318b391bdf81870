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
from typing import TYPE_CHECKING, Any, cast

from litestar import Litestar, Request, Response, get, route
from litestar.datastructures import State
from litestar.types import ASGIApp, Receive, Scope, Send
from pydantic import BaseModel

from appliance.audit import AuditNote, record
from appliance.errors import ApplianceError, Forbidden, NotFound, Unauthorized
from appliance.identity import TaskScope
from appliance.mcp.types import TASK_ONLY_TOOLS
from appliance.runtime import Runtime
from appliance.tasks.forwarder import MCP_PATH
from appliance.web.dependencies import provide_context

if TYPE_CHECKING:
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    from appliance.mcp.server import Caller, Gateway

__all__ = ["McpToolOut", "mcp_endpoint", "mcp_lifespan", "mcp_tools"]


_Guard = Callable[[Request[Any, Any, Any]], Awaitable[Response[None] | None]]


@dataclass(frozen=True)
class _Mcp:
    gateway: Gateway
    manager: StreamableHTTPSessionManager


class _Started:
    """The gateway and the SDK's session manager, started on the first call that needs them: the
    SDK and what it brings (Starlette, sse-starlette, jsonschema) take about 0.35 s to import,
    which every ``serve`` would otherwise pay before it answers. The manager's task group is
    entered and left by one task of its own, as anyio requires."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._started: asyncio.Future[_Mcp] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def get(self) -> _Mcp:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            self._task = asyncio.create_task(self._serve(self._started), name="mcp-gateway")
        return await asyncio.shield(self._started)

    async def _serve(self, started: asyncio.Future[_Mcp]) -> None:
        try:
            from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

            from appliance.mcp.server import Gateway

            gateway = Gateway(self._runtime)
            manager = StreamableHTTPSessionManager(
                gateway.server,
                stateless=True,
                json_response=True,
                max_request_body_size=int(self._runtime.settings.server.max_body_bytes),
            )
            # Host and origin checks are the app's guard's (web/guards.py): the SDK's own stay off
            # (its default). The SDK logs every request at INFO; the access log and the audit say it.
            logging.getLogger("mcp.server").setLevel(logging.WARNING)
            async with manager.run():
                started.set_result(_Mcp(gateway, manager))
                await self._stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


@asynccontextmanager
async def mcp_lifespan(app: Litestar) -> AsyncIterator[None]:
    """The gateway for the app's life (after the runtime's lifespan), started when first called."""
    started = _Started(app.state.runtime)
    app.state.mcp = started
    try:
        yield
    finally:
        await started.close()


async def _mcp(state: State) -> _Mcp:
    started: _Started = state.mcp
    return await started.get()


def _caller(request: Request[Any, Any, Any]) -> Caller:
    from appliance.mcp.server import Caller

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
        (await _mcp(request.app.state)).gateway.observe(target, "denied", seconds)
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
    from appliance.mcp.server import CALLER_KEY

    manager = (await _mcp(state)).manager
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


@get("/api/v1/mcp/tools", tags=["mcp"])
async def mcp_tools(request: Request[Any, Any, Any], state: State) -> list[McpToolOut]:
    """The MCP tools the caller may call, with their action and schemas."""
    gateway = (await _mcp(state)).gateway
    tools = []
    for tool in await asyncio.to_thread(gateway.visible, _caller(request)):
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
