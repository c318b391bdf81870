"""``appliance mcp stdio``: MCP over stdin/stdout, carried to a server's ``/mcp``.

The gateway is stateless and answers plain JSON, so each message a client writes is one POST and
its answer one JSON-RPC message back; requests go concurrently (a long ``tools/call`` holds no
other). A refusal at the HTTP level (401 without a key, 403, 404 with the gateway off) or a
server out of reach becomes a JSON-RPC error for that request, with the server's message and
hint, so the client shows why instead of hanging.

Imports: the SDK's stdio server and message types, httpx.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import anyio
import httpx
from anyio.streams.memory import MemoryObjectSendStream
from mcp import types
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage

__all__ = ["bridge"]

ACCEPT = "application/json, text/event-stream"  # what the transport requires a client to accept
UNREACHABLE = -32000  # a JSON-RPC server error: the request did not reach the gateway's answer


async def bridge(url: str, key: str | None, verify: ssl.SSLContext | bool = True) -> None:
    """Carry messages between stdin/stdout and ``url`` until stdin ends; ``verify`` trusts its
    certificate (a login's pinned CA, or the data dir's)."""
    headers = {"accept": ACCEPT, "content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    timeout = httpx.Timeout(30.0, read=600.0)  # a pull or a chat may take minutes to answer
    async with (
        httpx.AsyncClient(headers=headers, timeout=timeout, verify=verify) as client,
        stdio_server() as (local_read, local_write),
        anyio.create_task_group() as group,
    ):
        async for message in local_read:
            if isinstance(message, Exception):  # a line that is not JSON-RPC: the SDK says why
                continue
            group.start_soon(_forward, client, url, message, local_write)


async def _forward(
    client: httpx.AsyncClient,
    url: str,
    message: SessionMessage,
    local_write: MemoryObjectSendStream[SessionMessage],
) -> None:
    body = message.message.model_dump(by_alias=True, mode="json", exclude_none=True)
    request_id = body.get("id")
    try:
        answer = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        await _error(local_write, request_id, f"cannot reach {url}: {exc}", "is the appliance serving there?")
        return
    if answer.status_code == 202 or request_id is None:  # a notification, or a response we sent
        return
    if answer.status_code != 200:
        problem = _problem(answer)
        await _error(
            local_write, request_id, problem.get("detail", answer.reason_phrase), problem.get("hint", "")
        )
        return
    await local_write.send(SessionMessage(types.JSONRPCMessage.model_validate_json(answer.content)))


def _problem(answer: httpx.Response) -> dict[str, str]:
    try:
        problem = answer.json()
    except json.JSONDecodeError:
        return {"detail": f"{answer.status_code} {answer.reason_phrase}"}
    return {key: str(value) for key, value in problem.items()} if isinstance(problem, dict) else {}


async def _error(
    local_write: MemoryObjectSendStream[SessionMessage], request_id: Any, message: str, hint: str
) -> None:
    if request_id is None:
        return
    error = types.JSONRPCError(
        jsonrpc="2.0",
        id=request_id,
        error=types.ErrorData(code=UNREACHABLE, message=f"{message} ({hint})" if hint else message),
    )
    await local_write.send(SessionMessage(types.JSONRPCMessage(error)))
