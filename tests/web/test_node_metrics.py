"""The nodes in ``/metrics`` of a real server, with httpx playing the workers: each one's heartbeat
age as the nodes list reads at the scrape, beside the sweep's count of nodes by state."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server


@pytest.fixture(autouse=True)
def _patient_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's workers heartbeat once: they stay ready for the test's length."""
    monkeypatch.setenv("APPLIANCE_CLUSTER__HEARTBEAT_TIMEOUT", "600")


@pytest.fixture
def worker_clients() -> Iterator[list[httpx.Client]]:
    made: list[httpx.Client] = []
    yield made
    for client in made:
        client.close()


def scrape(server: Server) -> tuple[dict[str, float], dict[str, float]]:
    """(nodes by state, heartbeat age by node) from one scrape."""
    answer = server.client.get("/metrics")
    assert answer.status_code == 200
    states: dict[str, float] = {}
    ages: dict[str, float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "appliance_nodes":
                states[sample.labels["state"]] = sample.value
            elif sample.name == "appliance_node_heartbeat_age_seconds":
                ages[sample.labels["node"]] = sample.value
    return states, ages


def settled(server: Server, states: dict[str, float]) -> dict[str, float]:
    """The heartbeat ages of the first scrape whose counts by state are ``states`` (the server's
    sweep sets those about once a second)."""
    deadline = time.monotonic() + 10
    while True:
        seen, ages = scrape(server)
        if seen == states:
            return ages
        assert time.monotonic() < deadline, f"nodes by state: {seen}, not {states}"
        time.sleep(0.1)


def test_metrics_give_each_nodes_heartbeat_age_and_count_them_by_state(
    server: Server, worker_clients: list[httpx.Client]
) -> None:
    assert scrape(server)[1] == {}
    token = server.client.post("/api/v1/nodes/tokens", json={}).json()["token"]
    for name in ("w1", "w2", "w3"):
        joined = server.client.post(
            "/api/v1/cluster/join", json={"token": token, "name": name, "capabilities": {}}
        )
        assert joined.status_code == 201, joined.text
        headers = {"Authorization": f"Bearer {joined.json()['credential']}"}
        worker_clients.append(httpx.Client(base_url=server.url, headers=headers, timeout=30))
    for client in worker_clients[:2]:  # w3 never heartbeats: unavailable, and no age to give
        assert client.post("/api/v1/cluster/heartbeat", json={}).status_code == 200
    assert server.client.post("/api/v1/nodes/w2/drain").status_code == 200

    ages = settled(server, {"ready": 1, "draining": 1, "unavailable": 1})
    assert set(ages) == {"w1", "w2"}
    assert all(0 <= age < 60 for age in ages.values())
    time.sleep(1.1)
    later = scrape(server)[1]["w1"]
    assert later >= ages["w1"] + 1  # read at the scrape: it grows until the next heartbeat
    assert worker_clients[0].post("/api/v1/cluster/heartbeat", json={}).status_code == 200
    assert scrape(server)[1]["w1"] < later

    assert server.client.delete("/api/v1/nodes/w1").status_code == 200
    assert set(scrape(server)[1]) == {"w2"}  # a removed node leaves no series behind, at once
    settled(server, {"ready": 0, "draining": 1, "unavailable": 1})
