"""``appliance tasks``: hand the running server a prompt, a script or commands, and follow them.

Tasks run in the server (``/api/v1/tasks``); these commands are its client. Attached to the CLI
by ``appliance/cli.py``. Imports only click at load; the client and helpers when a command runs,
so that ``appliance --help`` stays quick.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from appliance.client import ServerClient

__all__ = ["tasks"]

TASK_STATES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")

host_option = click.option("--host", help="The server's address (default: the host setting, 127.0.0.1).")
port_option = click.option(
    "--port", type=click.IntRange(1, 65535), help="The server's port (default: the port setting, 8080)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _server(ctx: click.Context, host: str | None, port: int | None) -> ServerClient:
    from appliance.client import ServerClient

    return ServerClient(ctx.obj["settings"](host=host, port=port))


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _summary(task: dict[str, Any]) -> str:
    result = task.get("result") or {}
    reason = f": {result['reason']}" if result.get("reason") else ""
    return f"task {task['id']} {task['state']}{reason}"


def _follow(server: ServerClient, task_id: str) -> dict[str, Any]:
    """Print the task's output as it comes (stdout to stdout, stderr to stderr); its last state."""
    ended: dict[str, Any] = {}
    for name, data in server.events(f"/api/v1/tasks/{task_id}/events"):
        if name == "output":
            click.echo(data["text"], nl=False, err=data["stream"] == "stderr")
        elif name in ("state", "end"):
            ended = data
        elif name == "error":
            from appliance.client import ServerError

            raise ServerError(data, int(data.get("status") or 500))
        if name == "end":
            break
    return ended


@click.group()
def tasks() -> None:
    """Run prompts, scripts and commands in the running server (scripts in its sandbox)."""


@tasks.command("create")
@click.argument("text")
@click.option(
    "--mode",
    type=click.Choice(["prompt", "script", "commands"]),
    default="prompt",
    show_default=True,
    help="prompt: ask --model; script: run TEXT as a script; commands: one per line, stopping at "
    "the first that fails.",
)
@click.option("--model", help="The model a prompt goes to.")
@click.option(
    "--attach",
    "attachments",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file for the task's /work (repeatable).",
)
@click.option(
    "--limit",
    "limits",
    multiple=True,
    metavar="NAME=VALUE",
    help="Lower a limit: timeout_seconds=60 (repeatable).",
)
@click.option(
    "--key", "idempotency_key", help="An idempotency key: sending it again gives back the same task."
)
@click.option(
    "--inference",
    is_flag=True,
    help="Let a script or commands call models: $INFERENCE_URL (OpenAI) and $OLLAMA_BASE_URL inside.",
)
@click.option(
    "--tools",
    metavar="NAME,NAME",
    help="The MCP tools a script or commands may call at $MCP_URL (`appliance mcp tools` lists them).",
)
@click.option("--follow", is_flag=True, help="Print its output as it comes; exit 1 unless it succeeds.")
@json_option
@host_option
@port_option
@click.pass_context
def create_task(
    ctx: click.Context,
    text: str,
    mode: str,
    model: str | None,
    attachments: tuple[Path, ...],
    limits: tuple[str, ...],
    idempotency_key: str | None,
    inference: bool,
    tools: str | None,
    follow: bool,
    as_json: bool,
    host: str | None,
    port: int | None,
) -> None:
    """Queue a task: TEXT is the prompt, the script or the commands (`-` reads it from stdin).

    Example: appliance tasks create --mode script --attach data.csv 'wc -l /work/data.csv' --follow
    """
    from appliance.errors import InvalidInput

    if text == "-":
        text = sys.stdin.read()
    asked: dict[str, float] = {}
    for limit in limits:
        name, _, value = limit.partition("=")
        try:
            asked[name.strip()] = float(value)
        except ValueError:
            raise InvalidInput(
                f"--limit {limit!r} is not NAME=NUMBER", hint="e.g. --limit timeout_seconds=60"
            ) from None
    fields: dict[str, Any] = {"mode": mode, "text": text, "model": model, "limits": asked}
    if inference:
        fields["inference"] = True
    granted = [name.strip() for name in (tools or "").split(",") if name.strip()]
    if granted:
        fields["tools"] = granted
    if idempotency_key is not None:
        fields["idempotency_key"] = idempotency_key
    with _server(ctx, host, port) as server:
        if attachments:
            form = {
                name: value
                for name, value in fields.items()
                if value is not None and name not in ("limits", "tools")
            }
            form["limits"] = json.dumps(asked)
            if inference:
                form["inference"] = "true"
            if granted:
                form["tools"] = ",".join(granted)
            files = [("attachment", (path.name, path.read_bytes())) for path in attachments]
            task = server.request("POST", "/api/v1/tasks", data=form, files=files)
        else:
            task = server.request("POST", "/api/v1/tasks", json=fields)
        if not follow:
            _emit_json(task) if as_json else click.echo(task["id"])
            return
        ended = _follow(server, task["id"])
    if as_json:
        _emit_json(ended)
    else:
        click.echo(_summary(ended), err=True)
    if ended.get("state") != "succeeded":
        ctx.exit(1)


@tasks.command("ls")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(TASK_STATES), help="Only these (repeatable)."
)
@json_option
@host_option
@port_option
@click.pass_context
def list_tasks(
    ctx: click.Context, states: tuple[str, ...], as_json: bool, host: str | None, port: int | None
) -> None:
    """List tasks, newest first: yours, or everyone's for an admin.

    Example: appliance tasks ls --state running
    """
    with _server(ctx, host, port) as server:
        found = server.request("GET", "/api/v1/tasks", params=[("state", state) for state in states])
    if as_json:
        _emit_json(found)
        return
    for task in found:
        first_line = task["text"].strip().splitlines()[0] if task["text"].strip() else ""
        click.echo(
            f"{task['id']}  {task['state']:<9}  {task['mode']:<8}  {task['created_at']}  {first_line[:60]}"
        )


@tasks.command("show")
@click.argument("task_id")
@json_option
@host_option
@port_option
@click.pass_context
def show_task(ctx: click.Context, task_id: str, as_json: bool, host: str | None, port: int | None) -> None:
    """Show a task: its state, attempts, grants (inference, tools) and result.

    Example: appliance tasks show 3f2a9c
    """
    with _server(ctx, host, port) as server:
        task = server.request("GET", f"/api/v1/tasks/{task_id}")
    if as_json:
        _emit_json(task)
        return
    click.echo(_summary(task))
    for name in ("mode", "model", "actor", "attempts", "created_at", "started_at", "finished_at"):
        if task.get(name) is not None:
            click.echo(f"{name}: {task[name]}")
    if task.get("inference"):
        click.echo("inference: yes")
    if task.get("tools"):
        click.echo(f"tools: {', '.join(task['tools'])}")
    for name, value in (task.get("result") or {}).items():
        click.echo(f"result.{name}: {value}")


@tasks.command("logs")
@click.argument("task_id")
@click.option("--follow", is_flag=True, help="Keep printing its output as it comes, until it ends.")
@host_option
@port_option
@click.pass_context
def task_logs(ctx: click.Context, task_id: str, follow: bool, host: str | None, port: int | None) -> None:
    """Print what a task printed: stdout to stdout, stderr to stderr.

    Example: appliance tasks logs 3f2a9c --follow
    """
    with _server(ctx, host, port) as server:
        if follow:
            _follow(server, task_id)
            return
        output = server.request("GET", f"/api/v1/tasks/{task_id}/output")
    click.echo(output["stdout"], nl=False)
    click.echo(output["stderr"], nl=False, err=True)


@tasks.command("cancel")
@click.argument("task_id")
@host_option
@port_option
@click.pass_context
def cancel_task(ctx: click.Context, task_id: str, host: str | None, port: int | None) -> None:
    """Stop a queued or running task.

    Example: appliance tasks cancel 3f2a9c
    """
    with _server(ctx, host, port) as server:
        task = server.request("POST", f"/api/v1/tasks/{task_id}/cancel")
    click.echo(_summary(task))
