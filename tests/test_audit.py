"""Who acted: one Actor per caller, carried in the audit Context; rows keep their actor text."""

from __future__ import annotations

import getpass

import pytest

from appliance.audit import AuditNote, AuditService, Context, record
from appliance.identity import Actor
from appliance.runtime import Runtime


@pytest.mark.parametrize(
    ("actor", "label"),
    [
        (Actor.client("127.0.0.1"), "api:127.0.0.1"),
        (Actor.cli(), f"cli:{getpass.getuser()}"),
        (Actor(id="k1", kind="key", role="user"), "key:k1"),
        (Actor(id="gpu-box", kind="node", role="node"), "node:gpu-box"),
    ],
)
def test_an_actor_is_stored_as_the_label_rows_always_had(actor: Actor, label: str) -> None:
    assert actor.label == label
    assert Context(actor).actor == label
    assert Actor.from_label(label) == Actor(id=actor.id, kind=actor.kind)


def test_the_cli_acts_as_an_admin_and_a_client_without_credentials_as_nobody() -> None:
    assert Context.cli().who == Actor(id=getpass.getuser(), kind="cli", role="admin")
    assert Actor.client("::1").role is None


def test_a_context_from_text_keeps_the_text(runtime: Runtime) -> None:
    context = Context("engine", correlation_id="corr-1")
    assert context.who == Actor(id="engine", kind="task")
    record(runtime.store, context, action="models.verify", note=AuditNote(target="tiny:latest"))
    [event] = AuditService(runtime.store).list_events(action="models.verify")
    assert (event.actor, event.correlation_id, event.target) == ("engine", "corr-1", "tiny:latest")
