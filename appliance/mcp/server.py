"""The MCP gateway: who may call which tool, the call itself, its answer's size, and its audit row.

The SDK's low-level ``Server`` carries the protocol; ``tools/list`` and ``tools/call`` are our own
handlers (the SDK's ``call_tool`` decorator turns every exception into an ``isError`` result, and a
refusal must be a protocol error). A ``tools/call`` goes, before any tool runs:

    caller a task's job (scope vouched for by its forwarder)?
    ├── yes: _meta task_id/run_id/job_id all there ............. else mcp_scope_missing
    │        and each the scope's own ......................... else mcp_scope_mismatch
    │        tool known ....................................... else tool_not_found
    │        tool granted to the task ......................... else tool_not_granted
    └── no:  no _meta ids at all ............................... else mcp_scope_mismatch
             tool known ....................................... else tool_not_found
             not a job's own tool ............................. else tool_task_only
             auth on: decide(actor, the tool's action) ........ else tool_denied
    arguments valid for the tool's input model ................ else invalid_input

A refusal is a JSON-RPC error (-32001 for a denial, -32602 for an unknown tool or bad arguments)
whose ``data`` has our ``code`` and ``hint``. A tool that runs and fails (an ``ApplianceError``)
answers an ``isError`` result naming the error's code. Every call, whatever its end, writes one
``mcp.call`` audit row with sizes and ids, never arguments or results.

The web layer (``web/mcp.py``) finds the caller and puts it in the request's ASGI scope under
``CALLER_KEY``; the handlers read it from the SDK's request context.

Imports: the SDK, the runtime (for the services tools call), audit, policy, errors and the catalogue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from mcp import types
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import McpError
from pydantic import ValidationError

from appliance import __version__
from appliance.audit import AuditNote, Context, record
from appliance.auth.policy import Deny, Resource, decide
from appliance.errors import (
    ApplianceError,
    InvalidInput,
    McpScopeMismatch,
    McpScopeMissing,
    ResultTooLarge,
    ToolDenied,
    ToolNotFound,
    ToolNotGranted,
    ToolTaskOnly,
)
from appliance.identity import Actor, TaskScope
from appliance.mcp.catalog import CATALOG
from appliance.mcp.limits import answer_bytes
from appliance.mcp.types import TASK_ONLY_TOOLS, Tool, ToolCall, ToolOutput
from appliance.preferences import ALLOWED_ROLES
from appliance.runtime import Runtime
from appliance.tasks.records import granted_tools

__all__ = ["CALLER_KEY", "SCOPE_KEYS", "Caller", "Gateway", "tool_listing"]

CALLER_KEY = "appliance.mcp.caller"  # the ASGI scope's key the web layer puts the Caller under
SCOPE_KEYS = ("task_id", "run_id", "job_id")  # in a call's _meta: the job it comes from
DENIED = -32001  # a JSON-RPC server error: the call was refused
INVALID_PARAMS = types.INVALID_PARAMS  # -32602: unknown tool, or arguments its input model refuses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who sent the HTTP request the MCP message came in: the guard's actor, and the job it came
    from when its forwarder vouched for one."""

    actor: Actor
    scope: TaskScope | None
    correlation_id: str


class _Refused(Exception):
    """A call refused before its tool ran: the JSON-RPC error to answer and the audit's reason."""

    def __init__(self, error: ApplianceError, *, rpc_code: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.rpc_code = rpc_code


def tool_listing(tool: Tool[Any, Any]) -> types.Tool:
    """A tool as ``tools/list`` shows it."""
    input_schema, output_schema = tool.schemas()
    return types.Tool(
        name=tool.name,
        title=tool.title,
        description=tool.description,
        inputSchema=input_schema,
        outputSchema=output_schema,
    )


class Gateway:
    """The MCP server over the runtime's services; one per app, its session manager in the lifespan."""

    def __init__(self, runtime: Runtime, *, catalog: dict[str, Tool[Any, Any]] | None = None) -> None:
        self.runtime = runtime
        self.catalog = CATALOG if catalog is None else catalog
        self.server: Server[Any, Any] = Server("appliance", version=__version__)
        # Registered as raw handlers (see the module's docstring); the SDK then says it has tools.
        self.server.request_handlers[types.ListToolsRequest] = self._list_tools
        self.server.request_handlers[types.CallToolRequest] = self._call_tool

    # -- who may call what -------------------------------------------------------------------

    def may_call(self, caller: Caller, name: str) -> bool:
        """Whether ``tools/call`` of ``name`` would pass the checks that do not depend on _meta."""
        try:
            self._admit(caller, name)
        except _Refused:
            return False
        return True

    def visible(self, caller: Caller) -> list[Tool[Any, Any]]:
        """The tools ``caller`` may call, in catalogue order."""
        return [tool for name, tool in self.catalog.items() if self.may_call(caller, name)]

    def _admit(self, caller: Caller, name: str) -> Tool[Any, Any]:
        tool = self.catalog.get(name)
        if tool is None:
            raise _Refused(ToolNotFound(f"no MCP tool {name!r}"), rpc_code=INVALID_PARAMS)
        if caller.scope is not None:
            task = self.runtime.store.get_task(caller.scope.task_id)
            if task is None or name not in granted_tools(task):
                raise _Refused(
                    ToolNotGranted(f"task {caller.scope.task_id} was not granted the tool {name}"),
                    rpc_code=DENIED,
                )
            return tool
        if name in TASK_ONLY_TOOLS:
            raise _Refused(
                ToolTaskOnly(
                    f"{name} acts on a task job's own work directory; {caller.actor.label} is no job"
                ),
                rpc_code=DENIED,
            )
        if self.runtime.auth.enabled:
            granted = (
                self.runtime.preferences.effective(ALLOWED_ROLES) if tool.action == "models.pull" else ()
            )
            decision = decide(caller.actor, tool.action, Resource(granted_roles=granted))
            if isinstance(decision, Deny):
                raise _Refused(ToolDenied(f"{name} needs {tool.action}: {decision.reason}"), rpc_code=DENIED)
        return tool

    @staticmethod
    def _check_meta(caller: Caller, meta: dict[str, Any]) -> None:
        sent = {key: meta.get(key) for key in SCOPE_KEYS}
        scope = caller.scope
        if scope is None:
            if any(value is not None for value in sent.values()):
                raise _Refused(
                    McpScopeMismatch(
                        f"the call's _meta carries {', '.join(k for k, v in sent.items() if v is not None)}"
                        f", but {caller.actor.label} is not a task's job"
                    ),
                    rpc_code=DENIED,
                )
            return
        missing = [key for key, value in sent.items() if value is None]
        if missing:
            raise _Refused(
                McpScopeMissing(f"a job's call must carry {', '.join(missing)} in its _meta"), rpc_code=DENIED
            )
        own = {"task_id": scope.task_id, "run_id": scope.run_id, "job_id": scope.job_id}
        wrong = [key for key in SCOPE_KEYS if str(sent[key]) != own[key]]
        if wrong:
            raise _Refused(
                McpScopeMismatch(f"the call's {', '.join(wrong)} in _meta are not the calling job's own"),
                rpc_code=DENIED,
            )

    # -- the protocol's handlers ---------------------------------------------------------------

    def _caller(self) -> Caller:
        request = self.server.request_context.request
        caller = None if request is None else request.scope.get(CALLER_KEY)
        if not isinstance(caller, Caller):  # the web layer always sets it; fail closed
            raise McpError(types.ErrorData(code=DENIED, message="the MCP request came without its caller"))
        return caller

    async def _list_tools(self, request: types.ListToolsRequest) -> types.ServerResult:
        caller = self._caller()
        tools = await asyncio.to_thread(self.visible, caller)
        return types.ServerResult(types.ListToolsResult(tools=[tool_listing(tool) for tool in tools]))

    async def _call_tool(self, request: types.CallToolRequest) -> types.ServerResult:
        return types.ServerResult(await self.call(self._caller(), request))

    async def call(self, caller: Caller, request: types.CallToolRequest) -> types.CallToolResult:
        """One ``tools/call`` from ``caller``, checked, run and audited; a refusal raises ``McpError``."""
        started = time.monotonic()
        name = request.params.name
        meta = request.params.meta.model_dump() if request.params.meta is not None else {}
        note = AuditNote(target=name, outcome="error")
        note.detail.update(
            request_bytes=len(request.model_dump_json(by_alias=True, exclude_none=True).encode()),
            truncated=False,
        )
        if caller.scope is not None:
            note.detail.update(
                task_id=caller.scope.task_id, run_id=caller.scope.run_id, job_id=caller.scope.job_id
            )
        try:
            result = await self._run(caller, name, request.params.arguments or {}, meta, note)
        except _Refused as refused:
            error = refused.error
            answer = types.ErrorData(
                code=refused.rpc_code,
                message=f"{error.message} ({error.hint})" if error.hint else error.message,
                data={"code": error.code, "hint": error.hint},
            )
            note.bytes = len(answer.model_dump_json(exclude_none=True).encode())
            note.detail.update(
                result="denied", code=error.code, reason=error.message, response_bytes=note.bytes
            )
            await self._finish(caller, note, started, tool=name, outcome="denied")
            raise McpError(answer) from None
        size = len(result.model_dump_json(by_alias=True, exclude_none=True).encode())
        note.bytes = size
        note.detail["response_bytes"] = size
        await self._finish(caller, note, started, tool=name, outcome=note.detail["result"])
        return result

    async def _run(
        self, caller: Caller, name: str, arguments: dict[str, Any], meta: dict[str, Any], note: AuditNote
    ) -> types.CallToolResult:
        self._check_meta(caller, meta)
        tool = await asyncio.to_thread(self._admit, caller, name)
        try:
            given = tool.input.model_validate(arguments)
        except ValidationError as exc:
            raise _Refused(
                InvalidInput(
                    f"invalid arguments for {name}: {_problems(exc)}", hint="see the tool's inputSchema"
                ),
                rpc_code=INVALID_PARAMS,
            ) from exc
        limit = int(self.runtime.settings.mcp.max_result_bytes)
        call = ToolCall(
            runtime=self.runtime,
            context=Context(caller.actor, caller.scope.task_id if caller.scope else caller.correlation_id),
            scope=caller.scope,
            max_result_bytes=limit,
        )
        try:
            output = self._fit(tool, await tool.run(call, given), limit)
        except ApplianceError as exc:
            note.detail.update(result="failed", code=exc.code)
            return _failure(exc)
        except Exception as exc:  # a bug: the caller gets an answer, the log gets the trace
            log.exception("MCP tool %s failed", name)
            note.detail.update(result="failed", code="internal_error")
            return _failure(ApplianceError(f"{name} failed: {exc}", hint="a bug: see the server log"))
        note.outcome = "ok"
        note.detail.update(result="ok", truncated=output.truncated)
        answer = output.model_dump(mode="json")
        text = output.model_dump_json()
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)], structuredContent=answer
        )

    @staticmethod
    def _fit(tool: Tool[Any, Any], output: ToolOutput, limit: int) -> ToolOutput:
        """The answer within ``limit`` bytes of JSON: as it is, or cut by the tool's ``fit``."""
        if answer_bytes(output) <= limit:
            return output
        fitted: ToolOutput = tool.fit(output, limit) if tool.fit is not None else output
        size = answer_bytes(fitted)
        if size > limit:
            raise ResultTooLarge(
                f"{tool.name}'s answer takes {size} bytes, more than mcp.max_result_bytes ({limit})"
                + (" even cut" if tool.fit is not None else "")
            )
        return fitted

    async def _finish(
        self, caller: Caller, note: AuditNote, started: float, *, tool: str, outcome: str
    ) -> None:
        seconds = time.monotonic() - started
        correlation_id = caller.scope.task_id if caller.scope is not None else caller.correlation_id
        context = Context(caller.actor, correlation_id)
        await asyncio.to_thread(
            record,
            self.runtime.store,
            context,
            action="mcp.call",
            note=note,
            duration_ms=round(seconds * 1000),
        )
        self.observe(tool, outcome, seconds)

    def observe(self, tool: str, outcome: str, seconds: float) -> None:
        """Count a call in the metrics (the web layer's refusals too)."""
        label = tool if tool in self.catalog else "unknown"  # no label per name a client makes up
        self.runtime.metrics.observe_mcp_call(tool=label, outcome=outcome, seconds=seconds)


def _problems(exc: ValidationError) -> str:
    """Pydantic's complaints without the values given: the message is audited, arguments never are."""
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    return "; ".join(
        f"{'.'.join(map(str, problem['loc'])) or 'arguments'}: {problem['msg']}" for problem in problems
    )


def _failure(error: ApplianceError) -> types.CallToolResult:
    text = f"{error.code}: {error.message}" + (f" ({error.hint})" if error.hint else "")
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], isError=True)
