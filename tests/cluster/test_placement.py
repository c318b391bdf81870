"""Placement: loaded, then cached, then room, then budget; least loaded, then name (REQ-MODELS-0105, 0115)."""

from __future__ import annotations

import pytest

from appliance.cluster.placement import LOCAL, Candidate, place
from appliance.errors import NotReady

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64
GIB = 1 << 30


def node(
    name: str,
    *,
    state: str = "ready",
    loaded: tuple[str, ...] = (),
    cached: tuple[str, ...] = (),
    budget: int = 8 * GIB,
    free: int = 8 * GIB,
    load: int = 0,
) -> Candidate:
    return Candidate(
        id=f"n-{name}",
        name=name,
        local=name == LOCAL,
        state=state,
        loaded=frozenset(loaded),
        cached=frozenset(cached),
        memory_budget=budget,
        memory_free=free,
        load=load,
    )


@pytest.mark.parametrize(
    ("candidates", "chosen", "reason"),
    [
        pytest.param(
            [node(LOCAL, cached=(DIGEST,)), node("w1", loaded=(DIGEST,), load=3)],
            "w1",
            "node w1 has the model loaded",
            id="loaded-beats-cached-however-busy",
        ),
        pytest.param(
            [node("w2", loaded=(DIGEST,), load=2), node("w1", loaded=(DIGEST,), load=1)],
            "w1",
            "node w1 has the model loaded (least loaded of 2)",
            id="least-loaded-of-the-loaded",
        ),
        pytest.param(
            [node("w2", loaded=(DIGEST,), load=1), node("w1", loaded=(DIGEST,), load=1)],
            "w1",
            "node w1 has the model loaded (least loaded of 2)",
            id="a-tie-goes-to-the-first-name",
        ),
        pytest.param(
            [node("w1", cached=(DIGEST,), load=5), node("w2", loaded=(OTHER,))],
            "w1",
            "node w1 has the model cached; it loads it first",
            id="cached-beats-room",
        ),
        pytest.param(
            [node(LOCAL, cached=(DIGEST,), load=1), node("w1", cached=(DIGEST,))],
            "w1",
            "node w1 has the model cached (least loaded of 2); it loads it first",
            id="the-local-engine-is-a-node-like-any",
        ),
        pytest.param(
            [node("w2", free=2 * GIB), node("w1", free=GIB // 2)],
            "w2",
            "node w2 has memory free for the model; it fetches and loads it first",
            id="room-now-beats-room-after-unloading",
        ),
        pytest.param(
            [node("w2", free=0, load=4), node("w1", free=0, load=7)],
            "w2",
            "node w2 can hold the model once idle models are unloaded (least loaded of 2);"
            " it fetches and loads it first",
            id="budget-least-loaded",
        ),
        pytest.param(
            [node("w1", state="draining", loaded=(DIGEST,)), node("w2", cached=(DIGEST,), load=9)],
            "w2",
            "node w2 has the model cached; it loads it first",
            id="a-draining-node-is-never-picked",
        ),
        pytest.param(
            [node("w1", state="unavailable", loaded=(DIGEST,)), node(LOCAL, cached=(DIGEST,))],
            LOCAL,
            "node local has the model cached; it loads it first",
            id="an-unavailable-node-is-never-picked",
        ),
        pytest.param(
            [node("w1", cached=(DIGEST,), budget=GIB // 2), node("w2", free=0)],
            "w2",
            "node w2 can hold the model once idle models are unloaded; it fetches and loads it first",
            id="cached-but-too-small-is-refused",
        ),
        pytest.param(
            [node("w1", loaded=(DIGEST,), budget=GIB // 2, free=0)],
            "w1",
            "node w1 has the model loaded",
            id="loaded-needs-no-memory-check",
        ),
    ],
)
def test_placement_order_and_reasons(candidates: list[Candidate], chosen: str, reason: str) -> None:
    placement = place(DIGEST, GIB, candidates)
    assert placement.candidate.name == chosen
    assert placement.reason == reason
    assert len(placement.considered) == len(candidates)


def test_every_node_weighed_has_a_note() -> None:
    placement = place(
        DIGEST,
        GIB,
        [node("w1", state="draining"), node("w2", loaded=(DIGEST,), load=2), node("w3", budget=GIB // 2)],
    )
    assert placement.considered == (
        "w1 is draining",
        "w2 has it loaded (load 2)",
        f"w3 cannot hold it: it needs {GIB} bytes, the node's memory budget is {GIB // 2}",
    )


def test_no_node_fits_names_why_each_was_refused() -> None:
    candidates = [
        node(LOCAL, cached=(DIGEST,), budget=GIB // 4),
        node("w1", state="draining", loaded=(DIGEST,)),
        node("w2", state="unavailable", cached=(DIGEST,)),
    ]
    with pytest.raises(NotReady) as caught:
        place(DIGEST, GIB, candidates)
    message = caught.value.message
    assert message.startswith(f"no node can serve the model {DIGEST}: ")
    assert f"local cannot hold it: it needs {GIB} bytes, the node's memory budget is {GIB // 4}" in message
    assert "w1 is draining" in message
    assert "w2 is unavailable" in message
    assert caught.value.hint


def test_no_candidates_at_all_is_not_ready() -> None:
    with pytest.raises(NotReady, match="there are no nodes"):
        place(DIGEST, GIB, [])
