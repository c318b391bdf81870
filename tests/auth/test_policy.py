"""``decide``: who may do what, as one pure function."""

from __future__ import annotations

import pytest

from appliance.auth.policy import ACTIONS, Allow, Deny, Resource, decide
from appliance.identity import Actor

ADMIN = Actor("root", "user", "admin")
ALICE = Actor("alice", "user", "user")
NODE = Actor("worker-1", "key", "node")
SERVICE = Actor("ci", "key", "user")
NOBODY = Actor("127.0.0.1", "anonymous")
PEER = Actor("srv-b", "server")
PEER_AS_ADMIN = Actor("srv-b", "server", "admin")  # a role never widens a server credential

USER_ACTIONS = {"public", "me", "infer", "models.read", "keys.own", "tasks.run", "mcp.tool.invoke"}
NODE_ACTIONS = {"public", "cluster.node", "blobs.read"}
PEER_ACTIONS = {"public", "blobs.read"}


@pytest.mark.parametrize("action", ACTIONS)
def test_each_role_gets_its_actions_and_no_more(action: str) -> None:
    assert decide(ADMIN, action) == Allow()  # type: ignore[arg-type]
    assert bool(decide(ALICE, action)) is (action in USER_ACTIONS)  # type: ignore[arg-type]
    assert bool(decide(NODE, action)) is (action in NODE_ACTIONS)  # type: ignore[arg-type]
    assert bool(decide(NOBODY, action)) is (action == "public")  # type: ignore[arg-type]
    assert bool(decide(PEER, action)) is (action in PEER_ACTIONS)  # type: ignore[arg-type]
    assert bool(decide(PEER_AS_ADMIN, action)) is (action in PEER_ACTIONS)  # type: ignore[arg-type]


def test_a_denial_says_why() -> None:
    decision = decide(ALICE, "models.manage")
    assert decision == Deny("models.manage needs the admin role; user:alice has the user role")


def test_users_manage_only_their_own_keys() -> None:
    assert decide(ALICE, "keys.own", Resource(owner="alice")) == Allow()
    assert isinstance(decide(ALICE, "keys.own", Resource(owner="bob")), Deny)
    assert isinstance(decide(SERVICE, "keys.own", Resource(owner="")), Deny)  # a key of no user makes none
    assert decide(ADMIN, "keys.own", Resource(owner="bob")) == Allow()


def test_the_site_may_let_users_pull() -> None:
    assert isinstance(decide(ALICE, "models.pull"), Deny)
    assert decide(ALICE, "models.pull", Resource(granted_roles=["admin", "user"])) == Allow()
    assert isinstance(decide(NODE, "models.pull", Resource(granted_roles=["admin", "user"])), Deny)
