"""The cluster service on a real store: join tokens, joins (and refusals, audited), heartbeats,
node states, and models assigned to a node through the registry."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.audit import Context
from appliance.cluster.service import ClusterService, HeartbeatIn, expiry_of
from appliance.cluster.tokens import parse_join_token
from appliance.cluster.wire import decode_spec
from appliance.errors import (
    InvalidInput,
    JoinTokenNotFound,
    ModelNotFound,
    ModelNotLoadable,
    NodeExists,
    NodeNotFound,
    NotFound,
    Unauthorized,
)
from appliance.runtime import Runtime
from appliance.settings import ClusterSettings, Settings
from appliance.store.base import JoinToken

CAPS = {"cpu": {"cores": 2}, "memory_budget": 10**9, "version": "x"}


@pytest.fixture
def cluster(runtime: Runtime) -> ClusterService:
    return runtime.cluster


def test_a_join_trades_the_token_for_a_credential_and_is_audited(
    cluster: ClusterService, runtime: Runtime, context: Context
) -> None:
    made = cluster.create_token(context, expires="1h")
    assert parse_join_token(made.token).fingerprint is None  # no TLS set up: plain HTTP
    joined = cluster.join(made.token, "w1", CAPS, context)
    assert joined.name == "w1"
    assert joined.heartbeat_interval == 3.0
    node = cluster.authenticate(joined.credential)
    assert (node.id, node.capabilities, node.config) == (joined.node_id, CAPS, {"models": []})
    assert runtime.store.get_join_token(made.id).uses == 1  # type: ignore[union-attr]
    # A token is good for many workers until it expires or is revoked.
    cluster.join(made.token, "w2", CAPS, context)
    joins = runtime.store.list_audit(action="nodes.join")
    assert [(e.target, e.outcome) for e in joins] == [("w2", "ok"), ("w1", "ok")]
    assert joined.credential not in str([e.detail for e in runtime.store.list_audit()])


def test_a_token_carries_the_fingerprint_of_the_ca_of_tls_init(tmp_path: Path, context: Context) -> None:
    from appliance.tls import ca_fingerprint, init_tls

    settings = Settings(data_dir=tmp_path / "data")
    files = init_tls(settings, [])
    runtime = Runtime.open(settings)
    try:
        token = runtime.cluster.create_token(context).token
        assert parse_join_token(token).fingerprint == ca_fingerprint(files.ca_cert)
    finally:
        runtime.close()


def _expired(runtime: Runtime, token: str) -> str:
    """The token, made to have expired (written as create_token writes it, with a past expiry)."""
    parsed = parse_join_token(token)
    stored = runtime.store.get_join_token(parsed.token_id)
    assert stored is not None
    again = replace(stored, id="0" * 16, expires_at="2000-01-01T00:00:00.000000Z")
    runtime.store.create_join_token(again)
    return str(replace(parsed, token_id=again.id))


@pytest.mark.parametrize(
    ("spoil", "complaint"),
    [
        (lambda runtime, token: token[:-3] + "xyz", "not one this server made"),
        (lambda runtime, token: token.replace("apjoin1", "nope"), "not a join token"),
        (_expired, "is expired"),
        (
            lambda runtime, token: (runtime.cluster.revoke_token(token.split(".")[2], Context.cli()), token)[
                1
            ],
            "is revoked",
        ),
    ],
    ids=["wrong", "malformed", "expired", "revoked"],
)
def test_a_wrong_expired_or_revoked_token_is_refused_and_audited(
    cluster: ClusterService, runtime: Runtime, context: Context, spoil: object, complaint: str
) -> None:
    token = spoil(runtime, cluster.create_token(context).token)  # type: ignore[operator]
    with pytest.raises(Unauthorized, match=complaint):
        cluster.join(token, "w1", CAPS, context)
    assert cluster.list_nodes() == []
    (refused,) = runtime.store.list_audit(action="nodes.join")
    assert (refused.target, refused.outcome, refused.detail["error"]) == ("w1", "error", "unauthorized")


def test_a_name_taken_or_malformed_is_refused(cluster: ClusterService, context: Context) -> None:
    token = cluster.create_token(context).token
    cluster.join(token, "w1", CAPS, context)
    with pytest.raises(NodeExists):
        cluster.join(token, "w1", CAPS, context)
    for name in ("local", "tokens", "-x", "a b", ""):
        with pytest.raises(InvalidInput):
            cluster.join(token, name, CAPS, context)
    assert [node.name for node in cluster.list_nodes()] == ["w1"]


def test_token_lifetimes(cluster: ClusterService, context: Context) -> None:
    assert expiry_of("never") is None
    assert expiry_of("2h") > expiry_of("1h")  # type: ignore[operator]
    for bad in ("0h", "1y", "soon", "-1h"):
        with pytest.raises(InvalidInput, match="lifetime"):
            cluster.create_token(context, expires=bad)
    assert cluster.list_tokens() == []
    kept = cluster.create_token(context, expires="never")
    (listed,) = cluster.list_tokens()
    assert (listed.id, listed.state, listed.expires_at) == (kept.id, "active", None)
    assert cluster.revoke_token(kept.id, context).state == "revoked"
    with pytest.raises(JoinTokenNotFound):
        cluster.revoke_token("nope", context)


def test_the_default_lifetime_is_the_setting(tmp_path: Path, context: Context) -> None:
    runtime = Runtime.open(Settings(data_dir=tmp_path, cluster=ClusterSettings(token_expiry="never")))
    try:
        assert runtime.cluster.create_token(context).expires_at is None
    finally:
        runtime.close()


def test_an_unknown_credential_is_refused_and_audited_when_asked(
    cluster: ClusterService, runtime: Runtime, context: Context
) -> None:
    for credential in ("apnode_" + "x" * 43, "apl_whatever", ""):
        with pytest.raises(Unauthorized):
            cluster.authenticate(credential, context)
    assert len(runtime.store.list_audit(action="auth.failed")) == 3


def test_heartbeats_record_the_report_and_carry_the_config_until_it_is_applied(
    cluster: ClusterService, runtime: Runtime, context: Context, tiny_gguf: Path
) -> None:
    runtime.models.import_file(tiny_gguf, context, name="tiny")
    joined = cluster.join(cluster.create_token(context).token, "w1", CAPS, context)
    node = cluster.authenticate(joined.credential)
    assert cluster.get_node("w1").state == "unavailable"  # no heartbeat yet
    report = HeartbeatIn.model_validate(
        {
            "capabilities": None,
            "load": {"active": 1, "queued": 2, "loaded": []},
            "models": [{"digest": "sha256:" + "a" * 64, "model": "x:latest", "state": "cached"}],
            "config_applied": None,
        }
    )
    reply = cluster.heartbeat(node, report)
    assert (reply.config_version, reply.config, reply.drained) == (
        joined.config_version,
        {"models": []},
        False,
    )
    shown = cluster.get_node(joined.node_id)
    assert shown.state == "ready"
    assert shown.capabilities == CAPS  # null: unchanged
    assert shown.load == {"active": 1, "queued": 2, "loaded": []}
    assert [(m.model, m.state) for m in shown.models] == [("x:latest", "cached")]
    first_update = shown.models[0].updated_at
    applied = report.model_copy(update={"config_applied": joined.config_version, "capabilities": {"new": 1}})
    reply = cluster.heartbeat(cluster.authenticate(joined.credential), applied)
    assert reply.config is None  # up to date
    assert cluster.get_node("w1").models[0].updated_at == first_update  # unchanged state keeps its time
    assert cluster.get_node("w1").capabilities == {"new": 1}

    assigned = cluster.assign_model("w1", "tiny", context)
    assert assigned.config_version > joined.config_version
    (entry,) = assigned.config["models"]
    model = runtime.models.get("tiny")
    assert (entry["model"], entry["digest"], entry["size_bytes"]) == (
        "tiny:latest",
        model.artifacts[0].digest,
        model.size_bytes,
    )
    spec = decode_spec(entry["spec"], Path("/elsewhere"))
    assert (spec.key, spec.digest, spec.n_gpu_layers) == ("tiny:latest", entry["digest"], None)
    reply = cluster.heartbeat(cluster.authenticate(joined.credential), applied)
    assert reply.config_version == assigned.config_version
    assert reply.config == assigned.config
    # Assigning it again replaces the entry; a newer version each time.
    again = cluster.assign_model("w1", "tiny:latest", context)
    assert again.config_version > assigned.config_version
    assert len(again.config["models"]) == 1
    removed = cluster.unassign_model("w1", "tiny", context)
    assert removed.config["models"] == []
    assert removed.config_version > again.config_version
    with pytest.raises(ModelNotFound, match="not told to load"):
        cluster.unassign_model("w1", "tiny", context)
    actions = [e.action for e in runtime.store.list_audit() if e.action.startswith("nodes.")]
    assert actions.count("nodes.assign") == 2
    assert actions.count("nodes.unassign") == 2


def test_assigning_a_model_that_cannot_load_changes_nothing(
    cluster: ClusterService, runtime: Runtime, context: Context
) -> None:
    joined = cluster.join(cluster.create_token(context).token, "w1", CAPS, context)
    with pytest.raises(ModelNotFound):
        cluster.assign_model("w1", "nope", context)
    with pytest.raises(NodeNotFound):
        cluster.assign_model("w9", "nope", context)
    assert cluster.get_node("w1").config_version == joined.config_version


def test_a_quarantined_model_cannot_be_assigned(
    cluster: ClusterService, runtime: Runtime, context: Context, tiny_gguf: Path
) -> None:
    result = runtime.models.import_file(tiny_gguf, context, name="tiny")
    digest = runtime.models.get("tiny").artifacts[0].digest
    runtime.store.mark_verified(digest, state="quarantined")
    cluster.join(cluster.create_token(context).token, "w1", CAPS, context)
    with pytest.raises(ModelNotLoadable):
        cluster.assign_model("w1", "tiny", context)
    with pytest.raises(NotFound):
        cluster.blob(digest)
    assert result is not None


def test_states_drain_and_what_routing_sees(
    cluster: ClusterService, runtime: Runtime, context: Context
) -> None:
    token = cluster.create_token(context).token
    nodes = {name: cluster.join(token, name, CAPS, context) for name in ("w1", "w2", "w3")}
    report = HeartbeatIn.model_validate(
        {"models": [{"digest": "sha256:" + "a" * 64, "model": "x", "state": "available"}]}
    )
    for name in ("w1", "w2"):
        cluster.heartbeat(cluster.authenticate(nodes[name].credential), report)
    assert cluster.drain("w2", context).state == "draining"
    (view,) = cluster.available_nodes()  # w2 draining, w3 never heartbeated
    assert (view.name, view.memory_budget, view.models) == ("w1", 10**9, {"sha256:" + "a" * 64: "available"})
    assert cluster.undrain("w2", context).state == "ready"
    # A node silent past the timeout is unavailable.
    old = "2000-01-01T00:00:00.000000Z"
    runtime.store.update_node(nodes["w1"].node_id, last_heartbeat_at=old)
    assert cluster.get_node("w1").state == "unavailable"
    assert [view.name for view in cluster.available_nodes()] == ["w2"]
    removed = cluster.remove("w2", context)
    assert removed.name == "w2"
    with pytest.raises(Unauthorized):
        cluster.authenticate(nodes["w2"].credential)
    with pytest.raises(NodeNotFound):
        cluster.drain("w2", context)
    actions = [e.action for e in runtime.store.list_audit() if e.action.startswith("nodes.")]
    for action in ("nodes.drain", "nodes.undrain", "nodes.rm", "nodes.token.create"):
        assert action in actions


def test_tokens_are_stored_hashed(cluster: ClusterService, runtime: Runtime, context: Context) -> None:
    made = cluster.create_token(context)
    stored = runtime.store.get_join_token(made.id)
    secret = parse_join_token(made.token).secret
    assert stored == JoinToken(
        made.id,
        hashlib.sha256(secret.encode()).hexdigest(),
        context.actor,
        stored.created_at,
        made.expires_at,  # type: ignore[union-attr]
    )
