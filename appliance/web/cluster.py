"""Workers over HTTP. The worker opens every connection; the server never dials it.

Worker routes (``/api/v1/cluster/*``, ``/api/v1/blobs/*``) take a node credential
(``Authorization: Bearer apnode_…``) and check it themselves, whatever ``server.auth`` says;
join takes a join token instead. The blob routes take a server credential too (``apserver_…``):
servers sharing the database fetch blobs from each other there (``cluster/peers.py``). Admin
routes (``/api/v1/nodes…``, ``/api/v1/servers``) are guarded like any other (``nodes.read``,
``nodes.manage``, ``servers.read``).

Imports: the cluster's service and channel, audit, refs, settings and the web helpers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.to_thread
from litestar import Controller, Litestar, Request, Response, delete, get, head, post
from litestar.datastructures import State
from litestar.di import Provide
from litestar.params import Parameter
from litestar.response import Stream
from pydantic import BaseModel, Field

from appliance.audit import Context
from appliance.cluster.channel import WorkChannel, watch_nodes
from appliance.cluster.peers import Peers, ServerOut
from appliance.cluster.service import (
    NODE_NAME_PATTERN,
    ClusterService,
    HeartbeatIn,
    HeartbeatReply,
    Joined,
    JoinTokenOut,
    NewJoinTokenOut,
    Node,
    NodeOut,
)
from appliance.cluster.tokens import is_server_credential
from appliance.errors import Unauthorized
from appliance.refs import parse_digest
from appliance.runtime import Runtime
from appliance.settings import TOKEN_EXPIRY_PATTERN, Settings
from appliance.web.dependencies import provide_context

__all__ = ["CLUSTER_DEPENDENCIES", "CLUSTER_ROUTES", "NodesController", "cluster_lifespan", "list_servers"]

BLOCK_BYTES = 1024 * 1024  # a blob is read and sent in blocks of this size
MAX_WAIT = 300.0  # the most a poll may ask for; cluster.work_wait caps it further


def provide_cluster(state: State) -> ClusterService:
    runtime: Runtime = state.runtime
    return runtime.cluster


def provide_channel(state: State) -> WorkChannel:
    runtime: Runtime = state.runtime
    assert runtime.channel is not None, "the server always opens the runtime with its channel"
    return runtime.channel


def provide_node(request: Request[Any, Any, Any], state: State) -> Node:
    """The node whose credential the request carries; Unauthorized (audited) otherwise. A
    synchronous store call, as the guards' are: one indexed read."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthorized(
            "this route needs a node credential (Authorization: Bearer apnode_…)",
            hint="a worker gets one with `appliance worker join`",
        )
    return provide_cluster(state).authenticate(credential.strip(), provide_context(request))


def provide_peers(state: State) -> Peers:
    runtime: Runtime = state.runtime
    return runtime.peers


def provide_blob_reader(request: Request[Any, Any, Any], state: State) -> str:
    """Who fetches a blob: a node, or a server sharing the database (its id); Unauthorized
    (audited) otherwise, whatever ``server.auth`` says."""
    _, _, credential = request.headers.get("authorization", "").partition(" ")
    if is_server_credential(credential.strip()):
        return provide_peers(state).authenticate(credential.strip(), provide_context(request)).id
    return provide_node(request, state).id


@asynccontextmanager
async def cluster_lifespan(app: Litestar) -> AsyncIterator[None]:
    """The sweep beside the work channel, for as long as the server runs (after the runtime opened)."""
    runtime: Runtime = app.state.runtime
    assert runtime.channel is not None, "the server always opens the runtime with its channel"
    every = min(1.0, runtime.settings.cluster.heartbeat_interval)
    sweep = asyncio.create_task(
        watch_nodes(runtime.cluster, runtime.channel, every=every, metrics=runtime.metrics)
    )
    app.state.on_stopping = runtime.channel.stop  # web/staged.py calls it as the server begins to stop
    try:
        yield
    finally:
        sweep.cancel()
        with suppress(asyncio.CancelledError):
            await sweep


# -- the worker's routes -----------------------------------------------------------------------


class JoinIn(BaseModel):
    token: str = Field(max_length=300)
    name: str = Field(pattern=NODE_NAME_PATTERN)
    capabilities: dict[str, Any] = Field(default_factory=dict)


@post("/api/v1/cluster/join", status_code=201, sync_to_thread=True)
def join(data: JoinIn, cluster: ClusterService, context: Context) -> Joined:
    """Trade a join token for this node's credential (shown once). 401 for a wrong, expired or
    revoked token; 409 when another node has the name."""
    return cluster.join(data.token, data.name, data.capabilities, context)


@post("/api/v1/cluster/heartbeat", status_code=200, sync_to_thread=True)
def heartbeat(data: HeartbeatIn, node: Node, cluster: ClusterService) -> HeartbeatReply:
    """Report load and model availability; the answer carries the config when a newer one waits."""
    return cluster.heartbeat(node, data)


@get("/api/v1/cluster/work")
async def take_work(
    request: Request[Any, Any, Any],
    node: Node,
    channel: WorkChannel,
    settings: Settings,
    wait: Annotated[float, Parameter(ge=0, le=MAX_WAIT, description="seconds to hold the poll open")] = 25,
) -> dict[str, list[dict[str, Any]]]:
    """Long-poll: the node's work as soon as there is any, else an empty list after ``wait``
    seconds (at most ``cluster.work_wait``). Work handed out is leased to the node."""
    poll = asyncio.ensure_future(channel.poll(node.id, min(wait, settings.cluster.work_wait)))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait((poll, gone), return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not poll.done():  # the worker went away: what waits stays queued for its next poll
        poll.cancel()
        with suppress(asyncio.CancelledError):
            await poll
        return {"items": []}
    return {"items": poll.result()}


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Returns when the client closes the connection (a poll's request has no body to read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@post("/api/v1/cluster/work/{work_id:str}/events", status_code=200, request_max_body_size=None)
async def work_events(
    work_id: str, request: Request[Any, Any, Any], node: Node, channel: WorkChannel
) -> dict[str, Any]:
    """The answer to one work item: NDJSON, streamed, each line handed on as it arrives, ending
    with a ``finished`` (or ``embeddings``) line. 409 when the work is not leased to this node."""
    return await channel.accept(node.id, work_id, request.stream())


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a ``Range: bytes=…`` header, None without one; ValueError when it cannot
    be served (malformed, several ranges, or past the end)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise ValueError("one bytes range per request")
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash or not (first_text or last_text) or not (first_text + last_text).isdigit():
        raise ValueError(f"not a bytes range: {header!r}")
    if not first_text:  # the last N bytes
        count = int(last_text)
        if count == 0 or size == 0:
            raise ValueError("an empty range")
        return max(0, size - count), size - 1
    first = int(first_text)
    last = min(int(last_text), size - 1) if last_text else size - 1
    if first >= size or last < first:
        raise ValueError("past the end of the blob")
    return first, last


async def _read(path: Path, first: int, length: int) -> AsyncIterator[bytes]:
    """``length`` bytes of the file from ``first``, a block at a time (never the whole file)."""
    async with await anyio.open_file(path, "rb") as file:
        await file.seek(first)
        left = length
        while left > 0:
            block = await file.read(min(BLOCK_BYTES, left))
            if not block:
                return  # shorter than its row says: the client sees a short body and retries
            left -= len(block)
            yield block


def _blob_answer(
    digest: str, request: Request[Any, Any, Any], cluster: ClusterService
) -> tuple[Path, int, int, dict[str, str], int]:
    """(path, first byte, length, headers, status) for a GET or HEAD of a blob."""
    digest = parse_digest(digest)
    path, size = cluster.blob(digest)
    headers = {"ETag": f'"{digest}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    try:
        wanted = _byte_range(request.headers.get("range"), size)
    except ValueError:
        return path, 0, 0, {**headers, "Content-Range": f"bytes */{size}", "Content-Length": "0"}, 416
    if wanted is None:
        return path, 0, size, {**headers, "Content-Length": str(size)}, 200
    first, last = wanted
    length = last - first + 1
    ranged = {**headers, "Content-Length": str(length), "Content-Range": f"bytes {first}-{last}/{size}"}
    return path, first, length, ranged, 206


@get("/api/v1/blobs/{digest:str}")
async def get_blob(
    digest: str, request: Request[Any, Any, Any], reader: str, cluster: ClusterService
) -> Response[Any]:
    """A verified blob from the server's cache (``Range`` supported): how a worker fetches the
    models it is told to load, and a server sharing the database one its cache lacks. A
    quarantined or absent blob is 404; a malformed digest 400."""
    path, first, length, headers, status = await anyio.to_thread.run_sync(
        _blob_answer, digest, request, cluster
    )
    if status == 416:
        return Response(b"", status_code=416, headers=headers)
    return Stream(_read(path, first, length), status_code=status, headers=headers)


@head("/api/v1/blobs/{digest:str}")
async def head_blob(
    digest: str, request: Request[Any, Any, Any], reader: str, cluster: ClusterService
) -> Response[None]:
    """A blob's size, ETag and whether the range asked for can be served, without its bytes."""
    _, _, _, headers, status = await anyio.to_thread.run_sync(_blob_answer, digest, request, cluster)
    return Response(None, status_code=status, headers=headers)


# -- the admin's routes ------------------------------------------------------------------------


class TokenIn(BaseModel):
    expires: str | None = Field(None, pattern=TOKEN_EXPIRY_PATTERN)  # None: cluster.token_expiry


class AssignIn(BaseModel):
    model: str = Field(min_length=1, max_length=300)


class NodesController(Controller):
    path = "/api/v1/nodes"
    tags = ["nodes"]  # noqa: RUF012 (Litestar reads it as a class attribute)

    @get("/", sync_to_thread=True)
    def list_nodes(self, cluster: ClusterService) -> list[NodeOut]:
        """The nodes that joined: state (ready, draining, unavailable), last heartbeat,
        capabilities, load, config and the models each holds."""
        return cluster.list_nodes()

    @post("/tokens", status_code=201, sync_to_thread=True)
    def create_token(self, data: TokenIn, cluster: ClusterService, context: Context) -> NewJoinTokenOut:
        """Make a join token (shown this once): `{"expires": "24h"}` (or `"never"`)."""
        return cluster.create_token(context, expires=data.expires)

    @get("/tokens", sync_to_thread=True)
    def list_tokens(self, cluster: ClusterService) -> list[JoinTokenOut]:
        """Join tokens: state, expiry, uses; never their secrets."""
        return cluster.list_tokens()

    @delete("/tokens/{token_id:str}", status_code=200, sync_to_thread=True)
    def revoke_token(self, token_id: str, cluster: ClusterService, context: Context) -> JoinTokenOut:
        """Revoke a join token; the nodes that joined with it stay."""
        return cluster.revoke_token(token_id, context)

    @get("/{node_ref:str}", sync_to_thread=True)
    def show_node(self, node_ref: str, cluster: ClusterService) -> NodeOut:
        """One node, by id or name."""
        return cluster.get_node(node_ref)

    @post("/{node_ref:str}/drain", status_code=200, sync_to_thread=True)
    def drain(self, node_ref: str, cluster: ClusterService, context: Context) -> NodeOut:
        """Send the node no new work; what runs there finishes."""
        return cluster.drain(node_ref, context)

    @post("/{node_ref:str}/undrain", status_code=200, sync_to_thread=True)
    def undrain(self, node_ref: str, cluster: ClusterService, context: Context) -> NodeOut:
        return cluster.undrain(node_ref, context)

    @delete("/{node_ref:str}", status_code=200)
    async def remove(
        self, node_ref: str, cluster: ClusterService, channel: WorkChannel, context: Context
    ) -> NodeOut:
        """Forget the node: its credential stops working and its work in flight fails cleanly."""
        removed = await anyio.to_thread.run_sync(cluster.remove, node_ref, context)
        channel.node_lost(removed.id, f"node {removed.name} was removed")
        return removed

    @post("/{node_ref:str}/models", status_code=202)
    async def assign(
        self, node_ref: str, data: AssignIn, cluster: ClusterService, channel: WorkChannel, context: Context
    ) -> NodeOut:
        """Tell the node to keep a model cached and loaded; it fetches it from this server."""
        node = await anyio.to_thread.run_sync(cluster.assign_model, node_ref, data.model, context)
        channel.announce_config(node.id, node.config_version)
        return node

    @delete("/{node_ref:str}/models/{model:path}", status_code=200)
    async def unassign(
        self, node_ref: str, model: str, cluster: ClusterService, channel: WorkChannel, context: Context
    ) -> NodeOut:
        """Take a model out of what the node keeps loaded (its blob stays cached there)."""
        node = await anyio.to_thread.run_sync(cluster.unassign_model, node_ref, model.lstrip("/"), context)
        channel.announce_config(node.id, node.config_version)
        return node


@get("/api/v1/servers", tags=["servers"], sync_to_thread=True)
def list_servers(peers: Peers) -> list[ServerOut]:
    """The servers sharing this database: the URL each is reached at, its version, when it started
    and was last heard from, and whether it is alive (heard from within 45 s)."""
    return peers.list_servers()


CLUSTER_ROUTES = [join, heartbeat, take_work, work_events, get_blob, head_blob, list_servers]
CLUSTER_DEPENDENCIES = {
    "cluster": Provide(provide_cluster, sync_to_thread=False),
    "channel": Provide(provide_channel, sync_to_thread=False),
    "node": Provide(provide_node, sync_to_thread=False),
    "reader": Provide(provide_blob_reader, sync_to_thread=False),
    "peers": Provide(provide_peers, sync_to_thread=False),
}
