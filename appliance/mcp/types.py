"""The MCP gateway's vocabulary: the tools it knows, what a tool is, and what a call carries.

A tool is a typed function: a pydantic model in (its JSON schema is the tool's input schema), a
pydantic model out (the output schema), and ``run(call, arguments)``. The gateway (``server.py``)
checks who may call it before ``run`` starts, audits every call, and makes the answer fit
``mcp.max_result_bytes`` with the tool's ``fit`` (which cuts and sets ``truncated``).

Imports: audit, identity, auth.policy (the action names) and pydantic.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context
from appliance.auth.policy import Action
from appliance.identity import TaskScope

if TYPE_CHECKING:
    from appliance.runtime import Runtime

__all__ = [
    "TASK_ONLY_TOOLS",
    "TOOL_ACTIONS",
    "TOOL_NAMES",
    "Tool",
    "ToolCall",
    "ToolInput",
    "ToolOutput",
]

# The catalogue, in the order `appliance mcp tools` lists it.
TOOL_ACTIONS: dict[str, Action] = {
    "preference.get": "preferences.read",
    "preference.list": "preferences.read",
    "preference.effective": "preferences.read",
    "models.list": "models.read",
    "models.show": "models.read",
    "models.pull": "models.pull",
    "chat": "infer",
    "embed": "infer",
    "tasks.create": "tasks.run",
    "tasks.get": "tasks.run",
    "tasks.output": "tasks.run",
    "artifacts.list": "tasks.run",
    "artifacts.read": "tasks.run",
    "artifacts.write": "tasks.run",
}
TOOL_NAMES: tuple[str, ...] = tuple(TOOL_ACTIONS)
# Tools that act on the calling job's own work directory: only a task's job may call them.
TASK_ONLY_TOOLS = frozenset({"artifacts.list", "artifacts.read", "artifacts.write"})


class ToolInput(BaseModel):
    """A tool's arguments: unknown ones are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class ToolOutput(BaseModel):
    """A tool's answer; ``truncated`` says it was cut to fit ``mcp.max_result_bytes``."""

    truncated: bool = Field(default=False, description="The answer was cut to fit the size limit.")


In = TypeVar("In", bound=ToolInput)
Out = TypeVar("Out", bound=ToolOutput)


@dataclass(frozen=True)
class ToolCall:
    """What a tool's ``run`` gets besides its arguments."""

    runtime: Runtime
    context: Context  # who calls (``context.who``) and the request's correlation id
    scope: TaskScope | None  # the job the call came from, checked already; None: not a job
    max_result_bytes: int


@dataclass(frozen=True)
class Tool(Generic[In, Out]):
    name: str
    title: str
    description: str
    input: type[In]
    output: type[Out]
    run: Callable[[ToolCall, In], Awaitable[Out]]
    # Cut an answer to fit a number of bytes of JSON, setting truncated; None: its answers are
    # small by construction (the gateway then refuses one that is not, as an error).
    fit: Callable[[Out, int], Out] | None = None

    @property
    def action(self) -> Action:
        return TOOL_ACTIONS[self.name]

    def schemas(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.input.model_json_schema(), self.output.model_json_schema()
