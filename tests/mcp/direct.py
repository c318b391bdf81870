"""Calling a tool's ``run`` directly, in this process, against a real Runtime: each tool's own logic
and its refusals, without a server (the gateway's checks and the transport have their own tests)."""

from __future__ import annotations

import asyncio
from typing import Any

from appliance.audit import Context
from appliance.identity import Actor, TaskScope
from appliance.mcp.catalog import CATALOG
from appliance.mcp.limits import answer_bytes
from appliance.mcp.types import ToolCall, ToolOutput
from appliance.runtime import Runtime
from appliance.tasks.forwarder import task_actor

ANYONE = Actor.client("127.0.0.1")


def job_scope(task_id: str) -> TaskScope:
    return TaskScope(task_id=task_id, run_id="1", job_id="0123456789abcdef")


async def arun(
    runtime: Runtime,
    name: str,
    arguments: dict[str, Any],
    *,
    who: Actor | None = None,
    scope: TaskScope | None = None,
    limit: int | None = None,
) -> Any:
    """``name``'s answer to ``arguments`` as the gateway sends it: cut with the tool's ``fit`` when
    its JSON passes ``limit`` (``mcp.max_result_bytes`` unless given), and checked to fit then. A
    job's call (``scope``) acts as its task, as the forwarder's do."""
    tool = CATALOG[name]
    limit = runtime.settings.mcp.max_result_bytes if limit is None else limit
    actor = task_actor(scope.task_id) if scope is not None else (who or ANYONE)
    call = ToolCall(runtime=runtime, context=Context(actor), scope=scope, max_result_bytes=limit)
    output: ToolOutput = await tool.run(call, tool.input.model_validate(arguments))
    if answer_bytes(output) > limit:
        assert tool.fit is not None, f"{name} answered {answer_bytes(output)} bytes and cannot cut"
        output = tool.fit(output, limit)
        assert output.truncated
    assert answer_bytes(output) <= limit
    assert tool.output.model_validate_json(output.model_dump_json()) == output
    return output


def run_tool(runtime: Runtime, name: str, arguments: dict[str, Any], **how: Any) -> Any:
    """``arun`` from a test that has no event loop running."""
    return asyncio.run(arun(runtime, name, arguments, **how))
