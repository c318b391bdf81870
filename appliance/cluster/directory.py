"""The cluster's ``NodeDirectory`` (``engine/router.py``): the worker nodes as placement candidates,
and the remote engine that reaches each one.

Routing asks on every request, so the nodes are read from the store at most once a second (one
read of every node, draining and unavailable ones too, so placement's notes name them); the work
in flight on each node is read live from the work channel, on the server's event loop where the
channel lives.

A node's memory is estimated from what it reported: its engine's memory budget, less the sizes
(from its configuration) of the models its last heartbeat listed as loaded.

Imports: this package (service, channel, placement, remote) and the engine's base.
"""

from __future__ import annotations

import asyncio
import threading
import time

from appliance.cluster.channel import WorkChannel
from appliance.cluster.placement import Candidate
from appliance.cluster.remote import RemoteEngine
from appliance.cluster.service import ClusterService, NodeOut
from appliance.engine.base import Engine

__all__ = ["ClusterDirectory"]

MAX_AGE_SECONDS = 1.0  # how stale the nodes routing reads may be


class ClusterDirectory:
    def __init__(
        self,
        cluster: ClusterService,
        channel: WorkChannel,
        *,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.cluster = cluster
        self.channel = channel
        self.loop = loop  # the channel's
        self._lock = threading.Lock()  # guards the snapshot
        self._nodes: list[NodeOut] = []
        self._read_at: float | None = None

    def nodes(self) -> list[NodeOut]:
        """Every node, as read at most ``MAX_AGE_SECONDS`` ago (blocking: it may read the store)."""
        with self._lock:
            now = time.monotonic()
            if self._read_at is None or now - self._read_at >= MAX_AGE_SECONDS:
                self._nodes, self._read_at = self.cluster.list_nodes(), now
            return self._nodes

    def candidates(self, digest: str) -> list[Candidate]:
        """Every node (blocking: called from a thread other than the channel's loop)."""
        nodes = self.nodes()
        if not nodes:
            return []

        async def in_flight() -> dict[str, int]:  # on the channel's loop: the channel is not thread-safe
            return {node.id: self.channel.load(node.id) for node in nodes}

        counts = asyncio.run_coroutine_threadsafe(in_flight(), self.loop).result()
        return [_candidate(node, counts[node.id]) for node in nodes]

    def engine(self, candidate: Candidate) -> Engine:
        node = next((node for node in self.nodes() if node.id == candidate.id), None)
        engine = node.capabilities.get("engine") if node is not None else None
        return RemoteEngine(
            candidate.id,
            candidate.name,
            self.channel,
            loop=self.loop,
            memory_budget=candidate.memory_budget,
            gpu_offload=isinstance(engine, dict) and bool(engine.get("gpu_offload")),
        )

    def inference_paths(self) -> int:
        """Ready nodes with a model available: each is a way to answer an inference request."""
        return sum(
            1
            for node in self.nodes()
            if node.state == "ready" and any(model.state == "available" for model in node.models)
        )


def _budget(node: NodeOut) -> int:
    budget = node.capabilities.get("memory_budget")
    return budget if isinstance(budget, int) else 0


def _candidate(node: NodeOut, in_flight: int) -> Candidate:
    reported = node.load.get("loaded")
    loaded = {str(digest) for digest in reported} if isinstance(reported, list) else set()
    loaded |= {model.digest for model in node.models if model.state == "available"}
    cached = {model.digest for model in node.models if model.state in ("cached", "available")}
    sizes = {
        str(entry.get("digest")): int(entry.get("size_bytes") or 0)
        for entry in node.config.get("models", [])
        if isinstance(entry, dict)
    }
    budget = _budget(node)
    active, queued = node.load.get("active", 0), node.load.get("queued", 0)
    reported_load = (active if isinstance(active, int) else 0) + (queued if isinstance(queued, int) else 0)
    return Candidate(
        id=node.id,
        name=node.name,
        state=node.state,
        loaded=frozenset(loaded),
        cached=frozenset(cached),
        memory_budget=budget,
        memory_free=max(0, budget - sum(sizes.get(digest, 0) for digest in loaded)),
        # The heartbeat's count is up to an interval old; the channel's is now but misses work
        # the node took from elsewhere: the larger of the two.
        load=max(reported_load, in_flight),
    )
