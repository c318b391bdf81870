"""Fixtures and helpers of the MCP gateway's tests: the official ``mcp`` client (Streamable HTTP)
against a real ``appliance serve``, one per module, and the audit rows a call wrote."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jsonschema
import pytest
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import McpError

from tests.conftest import Server, started_server
from tests.web.conftest import isolated

T = TypeVar("T")


def with_session(
    server: Server, work: Callable[[ClientSession], Awaitable[T]], *, key: str | None = None
) -> T:
    """``work`` on an initialised session of the official client, with ``key`` as a Bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key else None

    async def run() -> T:
        async with (
            httpx.AsyncClient(headers=headers, timeout=60) as client,
            streamable_http_client(f"{server.url}/mcp", http_client=client) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await work(session)

    return asyncio.run(run())


def call(
    server: Server,
    name: str,
    arguments: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    meta: dict[str, Any] | None = None,
) -> types.CallToolResult:
    """One ``tools/call``; a refusal raises the client's ``McpError``."""
    return with_session(server, lambda session: session.call_tool(name, arguments or {}, meta=meta), key=key)


def refusal(
    server: Server,
    name: str,
    arguments: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    meta: dict[str, Any] | None = None,
) -> types.ErrorData:
    """The JSON-RPC error a refused ``tools/call`` answered."""

    async def work(session: ClientSession) -> types.ErrorData:
        try:
            result = await session.call_tool(name, arguments or {}, meta=meta)
        except McpError as refused:
            return refused.error
        raise AssertionError(f"{name} was not refused: {result}")

    return with_session(server, work, key=key)


def listed(server: Server, *, key: str | None = None) -> dict[str, types.Tool]:
    result = with_session(server, lambda session: session.list_tools(), key=key)
    return {tool.name: tool for tool in result.tools}


def checked(tool: types.Tool, result: types.CallToolResult) -> dict[str, Any]:
    """A successful answer's structured content, valid against the tool's output schema, and the
    same JSON as its text."""
    assert not result.isError, result.content
    assert result.structuredContent is not None
    jsonschema.validate(result.structuredContent, tool.outputSchema or {})
    text = result.content[0]
    assert isinstance(text, types.TextContent)
    assert json.loads(text.text) == result.structuredContent
    return result.structuredContent


def mcp_rows(server: Server, *, key: str | None = None) -> list[dict[str, Any]]:
    """The ``mcp.call`` audit rows, newest first."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = server.client.get("/api/v1/audit", params={"action": "mcp.call", "limit": 1000}, headers=headers)
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()
    return rows


@contextmanager
def module_server(data_dir: Path, **environment: str) -> Iterator[Server]:
    """``appliance serve`` on ``data_dir`` with ``environment`` set, for a module's tests."""
    with ExitStack() as stack:
        with isolated(data_dir.parent), pytest.MonkeyPatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            started = stack.enter_context(started_server(data_dir, log=data_dir.parent / "serve.log"))
        yield started
