"""MCP tools: the model registry. ``models.list`` pages as ``GET /api/v1/models`` does (a cut page
still gives the cursor to go on from its last model); ``models.show`` is one model; ``models.pull``
goes through the provisioner as ``POST /api/v1/models/pull`` does (the gateway checks
``models.pull`` with the site's granted roles first, and approval, offline mode and the allowed
sources apply as to any pull), and waits a bounded time: a pull still running, or waiting for an
admin's approval, answers its download's id and state, and a note on how to follow it
(``models.show`` once it is done, ``GET /api/v1/downloads/{id}``). Pulling the same ref again
would only wait behind the first, holding a pull thread: the note says so.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel, Field

from appliance.bridge import settled
from appliance.mcp.limits import answer_bytes, fit_list, fit_text
from appliance.mcp.types import Tool, ToolCall, ToolInput, ToolOutput
from appliance.models.listing import MAX_PAGE, encode_cursor
from appliance.models.schemas import ArtifactOut
from appliance.names import ModelName
from appliance.store.base import Model, ModelSummary

__all__ = ["TOOLS"]

_FOLLOW = (
    "see whether the model is there with models.show (or follow the download at GET "
    "/api/v1/downloads/{id}) rather than pulling it again, which only waits behind this pull"
)
DEFAULT_PAGE = 100
MAX_WAIT = 60.0  # seconds a pull may hold the call open; a longer one answers its download to poll


class ListIn(ToolInput):
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE, description="At most this many models.")
    cursor: str | None = Field(default=None, description="The next_cursor of the page before.")


class ModelItem(BaseModel):
    name: str = Field(description="name:tag, the id every API and the CLI take")
    size_bytes: int
    formats: list[str]
    state: str = Field(description="ok, or quarantined when an artifact failed verification")
    pinned: bool
    family: str | None = Field(description="The architecture (llama, qwen2, ...), when known.")
    parameter_count: int | None
    quantization: str | None

    @classmethod
    def of(cls, model: ModelSummary | Model) -> ModelItem:
        capabilities = model.capabilities
        return cls(
            name=str(model.name),
            size_bytes=model.size_bytes,
            formats=list(model.formats),
            state=model.state,
            pinned=model.pinned,
            family=capabilities.get("architecture"),
            parameter_count=capabilities.get("parameter_count"),
            quantization=capabilities.get("quantization"),
        )


class ListOut(ToolOutput):
    models: list[ModelItem]
    next_cursor: str | None = Field(
        description="Where the next page starts (pass it as cursor); null: the end."
    )


class ShowIn(ToolInput):
    name: str = Field(min_length=1, description="The model's name[:tag].")


class ShowOut(ToolOutput, ModelItem):
    capabilities: dict[str, Any] = Field(
        description="What the model's file says of it, less its chat template."
    )
    chat_template: str | None = Field(
        description="The model's chat template (cut first when the answer is long)."
    )
    artifacts: list[ArtifactOut]
    created_at: str
    last_used_at: str


class PullIn(ToolInput):
    ref: str = Field(
        min_length=1, description="A ModelRef: https://…, hf:…, s3://…, oci://…, a path or sha256:…"
    )
    name: str | None = Field(
        default=None, description="name[:tag] to register it under (default: from the file)"
    )
    digest: str | None = Field(default=None, description="sha256:HEX the content must have")
    strict: bool = Field(
        default=False, description="Fail when no digest (given or from the source) covers it."
    )
    wait_seconds: float = Field(
        default=10.0,
        ge=0,
        le=MAX_WAIT,
        description="How long to wait for the pull before answering its download.",
    )


class PullOut(ToolOutput):
    state: str = Field(
        description="done (the model is present), working (a local import or another pull of the ref), "
        "or the download's state: pending (awaits an admin's approval), approved, queued, running, ..."
    )
    name: str | None = Field(description="The model's name, once present.")
    digest: str | None
    size_bytes: int | None
    downloaded: bool | None = Field(description="False when it was already present and no network was used.")
    download_id: str | None = Field(
        description="Poll it with GET /api/v1/downloads/{id}, or pull the same ref again."
    )
    bytes_done: int | None
    bytes_total: int | None
    note: str | None = Field(default=None, description="What to do next, when the pull has not ended.")


async def _list(call: ToolCall, given: ListIn) -> ListOut:
    page = await asyncio.to_thread(call.runtime.models.summaries, limit=given.limit, cursor=given.cursor)
    return ListOut(models=[ModelItem.of(model) for model in page.models], next_cursor=page.next_cursor)


def _fit_list(output: ListOut, limit: int) -> ListOut:
    """Fewer models, with the cursor moved to go on right after the last one kept (the cursor can
    be longer than the one it replaces: then fewer again)."""
    budget = limit
    while True:
        cut = fit_list(output, "models", budget)
        if not cut.truncated or not cut.models:
            return cut
        cut = cut.model_copy(update={"next_cursor": encode_cursor(ModelName.parse(cut.models[-1].name))})
        over = answer_bytes(cut) - limit
        if over <= 0:
            return cut
        budget -= over


async def _show(call: ToolCall, given: ShowIn) -> ShowOut:
    model = await asyncio.to_thread(call.runtime.models.get, given.name)
    capabilities = {key: value for key, value in model.capabilities.items() if key != "chat_template"}
    template = model.capabilities.get("chat_template")
    return ShowOut(
        **ModelItem.of(model).model_dump(),
        capabilities=capabilities,
        chat_template=template if isinstance(template, str) else None,
        artifacts=[ArtifactOut(**artifact.__dict__) for artifact in model.artifacts],
        created_at=model.created_at,
        last_used_at=model.last_used_at,
    )


def _fit_show(output: ShowOut, limit: int) -> ShowOut:
    """The chat template cut first, then the artifacts."""
    if output.chat_template:
        output = fit_text(output, "chat_template", limit)
    return fit_list(output, "artifacts", limit)


async def _pull(call: ToolCall, given: PullIn) -> PullOut:
    provisioner = call.runtime.provisioner
    deadline = time.monotonic() + given.wait_seconds
    ticket = provisioner.start(
        given.ref, call.context, name=given.name, expected_digest=given.digest, strict=given.strict
    )
    await asyncio.to_thread(ticket.started.wait, given.wait_seconds)
    await settled(ticket.future, timeout=max(0.0, deadline - time.monotonic()))
    if ticket.future.done():
        resolved = ticket.future.result()  # a failed pull raises its error: the call's isError answer
        return PullOut(
            state="done",
            name=resolved.id,
            digest=resolved.digest,
            size_bytes=resolved.size,
            downloaded=resolved.downloaded,
            download_id=resolved.download_id,
            bytes_done=None,
            bytes_total=None,
        )
    if ticket.download_id is None:  # still importing, or waiting for a pull of the same ref
        return PullOut(
            state="working",
            name=None,
            digest=None,
            size_bytes=None,
            downloaded=None,
            download_id=None,
            bytes_done=None,
            bytes_total=None,
            note=f"still importing, or waiting for another pull of {given.ref}; {_FOLLOW}",
        )
    download = await asyncio.to_thread(provisioner.get_download, ticket.download_id)
    return PullOut(
        state=download.state,
        name=download.model_name,
        digest=download.digest,
        size_bytes=download.bytes_total,
        downloaded=None,
        download_id=download.id,
        bytes_done=download.bytes_done,
        bytes_total=download.bytes_total,
        note=(
            f"waits for an admin to approve it (appliance downloads approve {download.id}); {_FOLLOW}"
            if download.state == "pending"
            else f"still {download.state}; {_FOLLOW}"
        ),
    )


TOOLS: list[Tool[Any, Any]] = [
    Tool(
        name="models.list",
        title="List the models",
        description="The models in the registry by name, a page at a time: size, formats, family, "
        "parameter count and quantisation.",
        input=ListIn,
        output=ListOut,
        run=_list,
        fit=_fit_list,
    ),
    Tool(
        name="models.show",
        title="Show a model",
        description="One model: its capabilities, chat template and artifacts (files, digests, sources).",
        input=ShowIn,
        output=ShowOut,
        run=_show,
        fit=_fit_show,
    ),
    Tool(
        name="models.pull",
        title="Pull a model",
        description="Make a model present by reference, under the same policy, approval and allowed "
        "sources as any pull. Waits up to wait_seconds; then answers the download to poll.",
        input=PullIn,
        output=PullOut,
        run=_pull,
    ),
]
