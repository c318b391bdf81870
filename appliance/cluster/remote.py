"""A worker's engine as the server's router sees it: the ``Engine`` protocol over the work channel.

A generation is a ``generate`` work item (the load spec without its path, and the prompt, as
``wire`` writes them) that the worker picks up on its long-poll; its events come back as the
worker streams them, one JSON object per line, and are decoded into the engine's own types. The
worker's error comes back as the same error class (a prompt too long is a 400 from a worker too).
Closing the stream early cancels the work on the worker. A node lost mid-answer ends the stream
with NotReady, never a hang: the channel fails every item of a node it declares lost.

The channel lives on the server's event loop. A request on another loop (the task queue runs on
its own) has its answer relayed: the channel is used on its own loop, and the lines cross to the
asking loop through a ``LoopInbox``.

Loading and unloading are the node's configuration (``/api/v1/nodes/{id}/models``), not
requests: here they only say so. Imports: the engine's base, ``wire``, the errors and the thread bridge.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from appliance.bridge import LoopInbox
from appliance.cluster.wire import decode_embeddings, decode_error, decode_event, encode_prompt, encode_spec
from appliance.engine.base import Embeddings, EngineEvent, Finished, LoadedInfo, LoadSpec, Prompt, Ready
from appliance.errors import EngineFailure, InvalidInput, NotReady

__all__ = ["ENGINE_NAME", "RemoteEngine"]

ENGINE_NAME = "worker:llama.cpp"

T = TypeVar("T")
_FINAL_TYPES = ("finished", "embeddings")  # the last line of an answer


class Work(Protocol):
    id: str

    def events(self) -> AsyncIterator[dict[str, Any]]: ...


class Channel(Protocol):
    """What the remote engine uses of ``WorkChannel``."""

    def submit(self, node_id: str, item: dict[str, Any], *, name: str | None = None) -> Work: ...

    def cancel(self, work_id: str) -> None: ...


class RemoteEngine:
    """The engine of one worker node."""

    name = ENGINE_NAME

    def __init__(
        self,
        node_id: str,
        node_name: str,
        channel: Channel,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        memory_budget: int = 0,
        gpu_offload: bool = False,
    ) -> None:
        self.node_id = node_id
        self.node = node_name
        self.channel = channel
        self.loop = loop  # the channel's; None: every request comes on the channel's loop
        self._memory_budget = memory_budget
        self._gpu_offload = gpu_offload

    @property
    def memory_budget(self) -> int:
        """What the node reported with its capabilities."""
        return self._memory_budget

    @property
    def gpu_offload(self) -> bool:
        return self._gpu_offload

    async def generate(self, spec: LoadSpec, prompt: Prompt) -> AsyncGenerator[EngineEvent]:
        """As the local engine: an error before Ready (the model cannot load) is raised, one after
        it ends the stream as a Finished that carries it."""
        item = {"kind": "generate", "spec": encode_spec(spec), "prompt": encode_prompt(prompt)}
        ready = False
        async with aclosing(self._answer(item)) as lines:
            async for line in lines:
                event = self._decode(line, decode_event)
                if isinstance(event, Ready):
                    ready = True
                if isinstance(event, Finished) and event.error is not None and not ready:
                    raise event.error
                yield event
                if isinstance(event, Finished):
                    return
        raise NotReady(
            f"node {self.node} stopped before the answer was finished",
            hint="retry: the request goes to another node, or to this one once it is back",
        )

    async def embed(
        self, spec: LoadSpec, texts: list[str], *, keep_alive: float | None, truncate: bool = False
    ) -> Embeddings:
        item = {
            "kind": "embed",
            "spec": encode_spec(spec),
            "texts": texts,
            "keep_alive": keep_alive,
            "truncate": truncate,
        }
        async with aclosing(self._answer(item)) as lines:
            async for line in lines:
                if line.get("type") == "finished" and line.get("error") is not None:
                    raise decode_error(line["error"])
                return self._decode(line, decode_embeddings)
        raise NotReady(f"node {self.node} stopped before the embeddings were sent")

    async def _answer(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        """The node's answer to ``item``, line by line, on whichever loop asks."""
        if self.loop is None or asyncio.get_running_loop() is self.loop:
            async with aclosing(self._submit(item)) as lines:
                async for line in lines:
                    yield line
            return
        inbox: LoopInbox[dict[str, Any] | Exception | None] = LoopInbox()

        async def relay() -> None:  # on the channel's loop
            try:
                async with aclosing(self._submit(item)) as lines:
                    async for line in lines:
                        inbox.put(line)
            except Exception as exc:
                inbox.put(exc)
            else:
                inbox.put(None)

        relaying = asyncio.run_coroutine_threadsafe(relay(), self.loop)
        try:
            while (got := await inbox.get()) is not None:
                if isinstance(got, Exception):
                    raise got
                yield got
        finally:
            relaying.cancel()  # the asker went away: closing _submit there cancels the work

    async def _submit(self, item: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        """On the channel's loop: submit ``item`` and yield the answer's lines; closed before the
        last one (the client went away, a line was unreadable), the work is cancelled on the node."""
        work = self.channel.submit(self.node_id, item, name=self.node)
        final = False
        try:
            async for line in work.events():
                final = line.get("type") in _FINAL_TYPES
                yield line
        finally:
            if not final:  # also after the channel failed it: cancelling ended work does nothing
                self.channel.cancel(work.id)

    def _decode(self, line: dict[str, Any], decode: Callable[[dict[str, Any]], T]) -> T:
        try:
            return decode(line)
        except InvalidInput as exc:  # the worker's fault, not the client's: not a 400
            raise EngineFailure(f"node {self.node} sent an unreadable answer: {exc}") from exc

    # -- the node's configuration decides what it loads --------------------------------------------

    def load(self, spec: LoadSpec, *, keep_alive: float | None) -> tuple[LoadedInfo, str]:
        """A worker loads what its configuration lists, not on request."""
        raise NotReady(
            f"node {self.node} loads the models its configuration lists",
            hint=f"add the model to the node: POST /api/v1/nodes/{self.node_id}/models",
        )

    def loaded(self) -> list[LoadedInfo]:
        """Empty: a worker's loaded models are in its heartbeat (``GET /api/v1/nodes``), not here."""
        return []

    def unload(self, key: str) -> bool:
        """False: nothing is loaded on a worker through this engine (see ``load``)."""
        return False

    def unload_when_idle(self, key: str) -> None:
        """Nothing to do: a request's own keep_alive reaches the worker with its prompt."""

    def retire(self, key: str) -> None:
        """Nothing to do: a removed model leaves the node's configuration on the server."""

    def close(self) -> None:
        """Nothing to close: the channel belongs to the server."""
