"""Which node serves a request for a model (REQ-MODELS-0105, 0115, 0118): pure, so every rule
is a table row in its test.

Tiers, best first; within a tier the least loaded node wins, then the first name::

    loaded   the model is loaded there: it answers at once
    cached   the blob is in its cache and the model fits its memory budget: it loads first
    room     its free memory holds the model now: it fetches the blob, then loads it
    budget   its budget holds the model once idle models are unloaded: it fetches, unloads, loads

A draining or unavailable node is never picked, nor one whose budget cannot hold the model at all.
The local engine is one candidate like any node (named ``local``): its cache holds every
registered model, so it is always at least ``cached``. Imports: ``appliance.errors`` only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from appliance.errors import NotReady

__all__ = ["LOCAL", "Candidate", "Placement", "place"]

LOCAL = "local"  # the in-process engine's node name in routing decisions


@dataclass(frozen=True)
class Candidate:
    """A node as routing sees it at one moment."""

    id: str
    name: str
    local: bool = False
    state: str = "ready"  # "ready", "draining" or "unavailable" (cluster-contract: derived, not stored)
    loaded: frozenset[str] = frozenset()  # digests loaded in its engine
    cached: frozenset[str] = frozenset()  # digests in its cache
    memory_budget: int = 0  # bytes its engine may hold
    memory_free: int = 0  # estimate: the budget less what its loaded models hold
    load: int = 0  # requests active and queued there


@dataclass(frozen=True)
class Placement:
    """The chosen node, why (a sentence for the inference log), and a note on every node weighed."""

    candidate: Candidate
    reason: str
    considered: tuple[str, ...]


_TIERS = (  # tier, what the reason says of the node, what it does first
    ("loaded", "has the model loaded", ""),
    ("cached", "has the model cached", "; it loads it first"),
    ("room", "has memory free for the model", "; it fetches and loads it first"),
    ("budget", "can hold the model once idle models are unloaded", "; it fetches and loads it first"),
)


def _tier(candidate: Candidate, digest: str, size_bytes: int) -> tuple[str | None, str]:
    """The candidate's tier (None: refused) and a note saying why."""
    if candidate.state != "ready":
        return None, f"{candidate.name} is {candidate.state}"
    if digest in candidate.loaded:
        return "loaded", f"{candidate.name} has it loaded (load {candidate.load})"
    if size_bytes > candidate.memory_budget:
        return None, (
            f"{candidate.name} cannot hold it: it needs {size_bytes} bytes, the node's memory budget"
            f" is {candidate.memory_budget}"
        )
    if digest in candidate.cached:
        return "cached", f"{candidate.name} has it cached (load {candidate.load})"
    if size_bytes <= candidate.memory_free:
        return "room", f"{candidate.name} has {candidate.memory_free} bytes free (load {candidate.load})"
    return "budget", (
        f"{candidate.name} has {candidate.memory_free} bytes free of {candidate.memory_budget}"
        f" (load {candidate.load})"
    )


def place(digest: str, size_bytes: int, candidates: Iterable[Candidate]) -> Placement:
    """The node for a model of ``size_bytes`` whose blob is ``digest``; NotReady naming why each
    node was refused when none can serve it."""
    weighed = [(candidate, *_tier(candidate, digest, size_bytes)) for candidate in candidates]
    considered = tuple(note for _, _, note in weighed)
    for tier, says, then in _TIERS:
        peers = sorted(
            (candidate for candidate, found, _ in weighed if found == tier),
            key=lambda candidate: (candidate.load, candidate.name),
        )
        if peers:
            chosen = peers[0]
            among = f" (least loaded of {len(peers)})" if len(peers) > 1 else ""
            return Placement(chosen, f"node {chosen.name} {says}{among}{then}", considered)
    raise NotReady(
        f"no node can serve the model {digest}: " + ("; ".join(considered) or "there are no nodes"),
        hint="undrain a node, wait for an unavailable one to return, or raise a node's memory budget",
    )
