"""Tasks in every store backend: idempotency per actor, state moves, claims (see conftest.py)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from appliance.errors import LeaseLost, TaskFinished, TaskNotFound
from appliance.store.base import Store, Task


def task(task_id: str, *, actor: str = "user:ann", key: str | None = None) -> Task:
    return Task(
        id=task_id,
        mode="script",
        text="echo hi",
        model=None,
        state="queued",
        actor=actor,
        limits={"timeout_seconds": 5.0},
        idempotency_key=key,
    )


def test_a_task_round_trips_with_its_limits_and_result(store: Store) -> None:
    created, added = store.create_task(task("t1"))
    assert added
    assert store.get_task("t1") == created
    result = {
        "exit_code": 0,
        "truncated": {"stdout": False, "stderr": True},
        "reason": "exited with status 0",
    }
    done = store.update_task(
        "t1", state="succeeded", result=result, finished_at="2026-01-01T00:00:00.000000Z"
    )
    assert (done.state, done.result, done.limits) == ("succeeded", result, {"timeout_seconds": 5.0})
    assert store.get_task("nope") is None


def test_an_idempotency_key_gives_back_the_same_task_per_actor(store: Store) -> None:
    first, added = store.create_task(task("t1", key="k"))
    again, added_again = store.create_task(task("t2", key="k"))
    assert (added, added_again, again) == (True, False, first)
    other, added_other = store.create_task(task("t3", actor="user:bob", key="k"))
    assert (added_other, other.id) == (True, "t3")
    store.create_task(task("t4"))
    store.create_task(task("t5"))  # no key: never a duplicate
    assert {t.id for t in store.list_tasks()} == {"t1", "t3", "t4", "t5"}
    assert [t.id for t in store.list_tasks(actor="user:bob")] == ["t3"]


def test_a_task_moves_from_a_state_only_once(store: Store) -> None:
    store.create_task(task("t1"))
    store.update_task("t1", only_from=("queued", "running"), state="canceled")
    with pytest.raises(TaskFinished, match="is canceled, not queued or running"):
        store.update_task("t1", only_from=("queued", "running"), state="failed")
    assert store.get_task("t1").state == "canceled"  # type: ignore[union-attr]
    with pytest.raises(TaskNotFound):
        store.update_task("nope", state="failed")


def test_a_change_for_another_owner_or_attempt_is_refused_and_changes_nothing(store: Store) -> None:
    store.create_task(task("t1"))
    lease = "2099-01-01T00:00:00.000000Z"
    assert store.claim_task(owner="node:n1", lease_expires_at=lease) is not None
    with pytest.raises(LeaseLost, match="leased to node:n1, not node:n2"):
        store.update_task("t1", only_owner="node:n2", only_attempt=1, state="failed")
    with pytest.raises(LeaseLost, match="on attempt 1, not 2"):
        store.update_task("t1", only_owner="node:n1", only_attempt=2, state="failed")
    assert store.get_task("t1").state == "running"  # type: ignore[union-attr]
    done = store.update_task("t1", only_owner="node:n1", only_attempt=1, state="succeeded")
    assert (done.state, done.attempts) == ("succeeded", 1)


def test_a_made_up_task_column_is_refused_and_changes_nothing(store: Store) -> None:
    store.create_task(task("t1"))
    before = store.get_task("t1")
    with pytest.raises(ValueError, match="not a task column"):
        store.update_task("t1", state="failed", text="rm -rf /")  # type: ignore[call-arg]
    assert store.get_task("t1") == before


def test_claims_take_the_oldest_first_and_never_the_same_task_twice(store: Store) -> None:
    for n in range(20):
        store.create_task(task(f"t{n:02}"))
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all(owner: str) -> None:
        while (
            found := store.claim_task(owner=owner, lease_expires_at="2099-01-01T00:00:00.000000Z")
        ) is not None:
            with lock:
                claimed.append(found.id)

    threads = [threading.Thread(target=claim_all, args=(f"w{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed) == [f"t{n:02}" for n in range(20)]
    first = store.get_task("t00")
    assert first is not None
    assert (first.state, first.attempts, first.started_at is not None) == ("running", 1, True)
    assert store.claim_task(owner="w", lease_expires_at="2099-01-01T00:00:00.000000Z") is None


def test_a_server_claims_no_task_whose_attachments_another_holds_and_marks_where_it_ran(
    store: Store,
) -> None:
    lease = "2099-01-01T00:00:00.000000Z"
    store.create_task(replace(task("held"), attachments_on="server-b"))
    store.create_task(task("free"))

    claimed = store.claim_task(owner="a:1", lease_expires_at=lease, server="server-a")

    assert claimed is not None
    assert (claimed.id, claimed.ran_on) == ("free", "server-a")
    assert store.claim_task(owner="a:1", lease_expires_at=lease, server="server-a") is None
    held = store.claim_task(owner="b:1", lease_expires_at=lease, server="server-b")
    assert held is not None
    assert (held.id, held.attachments_on, held.ran_on) == ("held", "server-b", "server-b")
