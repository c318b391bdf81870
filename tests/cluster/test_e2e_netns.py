"""A server and two workers in network namespaces of their own (``tests/cluster/netns_cluster.py``,
run under ``unshare -n -m`` so nothing touches the host's network): each worker reaches the
server's address on its link and nothing else, listens on no port, and the server cannot reach
it; models reach the workers from the server's cache only, chats are routed to the node that has
the model, a worker killed mid-answer ends its client's stream with an error and comes back with
its cache, and wrong, expired and revoked join tokens are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parent.parent.parent


def run_cluster(tmp_path: Path) -> dict[str, Any]:
    completed = subprocess.run(
        [
            "unshare",
            "-n",
            "-m",
            sys.executable,
            "-m",
            "tests.cluster.netns_cluster",
            str(tmp_path / "cluster"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    logs = "\n".join(
        f"--- {log.name}\n{log.read_text()}" for log in sorted((tmp_path / "cluster").glob("*.log"))
    )
    assert completed.returncode == 0, f"{completed.stderr}\n{logs}"
    report: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))  # the facts, for -s or a failure's output
    return report


def test_workers_in_their_own_namespaces_join_load_from_the_server_and_serve_routed_chats(
    tmp_path: Path,
) -> None:
    report = run_cluster(tmp_path)

    # The network: each worker reaches the server on its link, not the other worker nor anything
    # beyond its link (the file server on the server's loopback); it listens on no port; the
    # server gets no answer from a worker's address.
    assert report["w1_to_server"] == "connected"
    assert report["w1_to_w2"] == "ENETUNREACH"
    assert report["w2_to_w1"] == "ENETUNREACH"
    assert report["w1_to_file_server"] == "ECONNREFUSED"  # its own loopback: nothing there
    assert report["listening"] == {"w1": [], "w2": []}
    assert report["server_to"] == {"w1": "ECONNREFUSED", "w2": "ECONNREFUSED"}
    assert report["token_fingerprint"] == report["fingerprint"].removeprefix("sha256:")

    # The file server was asked for each model by the server's pull, and never again.
    assert report["file_server"] == report["file_server_after_pull"]
    assert report["file_server"] == {"GET /tiny.gguf": 1, "GET /other.gguf": 1}
    assert report["fetched_from_server"] == {"w1": 1, "w2": 1}

    tiny = report["chat_tiny"]
    assert (tiny["node"], tiny["model"]) == ("w2", "tiny:latest")
    assert tiny["reason"].startswith("node w2 has the model loaded")
    assert tiny["tokens"] >= 1

    # Only worker 1 has the second model (cached, not loaded); the server's own engine holds it
    # too, and wins the tie while it is a candidate; once it only coordinates, worker 1 serves.
    assert report["w2_models"] == ["tiny:latest"]
    assert report["chat_other_local_inference"]["node"] == "local"
    other = report["chat_other_coordinating"]
    assert (other["node"], other["model"]) == ("w1", "other:latest")
    assert other["reason"].startswith("node w1 has the model cached; it loads it first")
    assert other["tokens"] >= 1

    # Worker 2 SIGKILLed mid-answer: the client's stream ends in an error after the words it had;
    # restarted (`worker run`), it is the same node, its cache intact (fetched once in all).
    killed = report["killed_mid_answer"]
    assert killed["killed"] == -9
    assert killed["chunks"] >= 1
    assert killed["finish_reason"] is None
    assert "node w2's answer broke off" in killed["error"], killed
    assert killed["logged"]["node"] == "w2"
    assert killed["logged"]["outcome"] == "error", killed
    assert report["chat_after_restart"]["node"] == "w2"

    for label, says in (
        ("wrong", "not one this server made"),
        ("expired", "is expired"),
        ("revoked", "is revoked"),
    ):
        refused = report["refused"][label]
        assert refused["exit"] == 1, (label, refused)
        assert "refused the join token" in refused["said"], (label, refused)
        assert says in refused["said"], (label, refused)
        assert not refused["joined"], (label, refused)
    assert report["nodes"] == ["w1", "w2"]
