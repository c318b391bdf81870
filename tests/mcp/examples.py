"""One call of every tool in the catalogue, in an order where each finds what the ones before it
made: the tests that call every tool once go through this table, and a test keeps it whole."""

from __future__ import annotations

from typing import Any

from appliance.mcp.types import TASK_ONLY_TOOLS

MODEL = "m00"  # a model the calling test's server has

EXAMPLES: dict[str, dict[str, Any]] = {
    "preference.get": {"key": "offline"},
    "preference.list": {},
    "preference.effective": {"key": "models.cache.evict_policy"},
    "models.list": {"limit": 2},
    "models.show": {"name": MODEL},
    "models.pull": {"ref": "{file}", "name": "pulled-once", "wait_seconds": 30},  # a GGUF the test wrote
    "chat": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "embed": {"model": MODEL, "input": ["a"]},
    "tasks.create": {"mode": "prompt", "text": "Hi", "model": MODEL},
    "tasks.get": {"task_id": "{task}"},  # the task tasks.create made
    "tasks.output": {"task_id": "{task}"},
    "artifacts.write": {"path": "out/a.txt", "content": "é\n"},
    "artifacts.read": {"path": "out/a.txt"},
    "artifacts.list": {"path": "out"},
}


def filled(arguments: dict[str, Any], **values: str) -> dict[str, Any]:
    """``arguments`` with ``{task}`` and ``{file}`` replaced by what the test made."""
    return {
        key: value.format(**values) if isinstance(value, str) and value.startswith("{") else value
        for key, value in arguments.items()
    }


def task_only(only: bool) -> list[str]:
    """The examples' tools that only a task's job may call (or every other one), in order."""
    return [name for name in EXAMPLES if (name in TASK_ONLY_TOOLS) is only]
