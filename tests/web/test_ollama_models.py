"""Ollama's create, copy, push, embeddings and version routes, driven by the real ``ollama`` client
against a live ``appliance serve``; pushes go to Debian's docker-registry on loopback."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from appliance.settings import OLLAMA_API_VERSION
from tests.conftest import CliResult, Server, import_file, started_server
from tests.provision.test_oci import registry, serving_registry  # noqa: F401 (registry: a fixture)
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf
from tests.web.serving import serving
from tests.web.test_ollama import response_error

GREEDY = {"temperature": 0, "num_predict": 4}


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server for the module's tests that only ask, or add a model no other test reads; those
    that read the data dir or the whole list of models, or need other settings, have
    ``own_server``."""
    return shared_server


@pytest.fixture(scope="module")
def tiny(shared_tiny: str) -> str:
    return shared_tiny


@pytest.fixture
def client(server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, timeout=60) as client:
        yield client


@pytest.fixture
def own_server(data_dir: Path) -> Iterator[Server]:
    with started_server(data_dir) as started:
        yield started


@pytest.fixture
def own_client(own_server: Server) -> Iterator[ollama.Client]:
    with ollama.Client(host=own_server.url, timeout=60) as client:
        yield client


@pytest.fixture
def own_tiny(data_dir: Path, tiny_gguf: Path) -> str:
    """``tiny`` in this test's own data dir."""
    import_file(data_dir, tiny_gguf, "tiny")
    return "tiny"


@pytest.fixture
def long_model(data_dir: Path, tmp_path: Path) -> str:
    """Greedy decoding never stops on its own here (about 4,000 tokens)."""
    path = write_llama_gguf(tmp_path / "long.gguf", context=4096, chat_template=TINY_CHAT_TEMPLATE)
    import_file(data_dir, path, "long")
    return "long"


def models_ls(cli: Any) -> dict[str, list[str]]:
    """Model name → its artifacts as filename@digest, as `models ls --json` says."""
    listed: CliResult = cli("models", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    return {
        model["name"]: sorted(f"{a['filename']}@{a['digest']}" for a in model["artifacts"])
        for model in json.loads(listed.stdout)
    }


def blob_files(data_dir: Path) -> set[str]:
    return {path.name for path in (data_dir / "blobs" / "sha256").iterdir()}


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


# -- version -----------------------------------------------------------------------------------


def test_version_reports_the_ollama_api_level_and_answers_head(own_server: Server, data_dir: Path) -> None:
    server = own_server
    assert server.client.get("/api/version").json() == {"version": OLLAMA_API_VERSION}
    for path in ("/api/version", "/api/tags"):
        answer = server.client.head(path)
        assert (answer.status_code, answer.content) == (200, b"")
    with serving(data_dir, env={"APPLIANCE_SERVER__OLLAMA_VERSION": "0.6.4"}) as other:
        assert other.client.get("/api/version").json() == {"version": "0.6.4"}


@pytest.mark.parametrize(
    ("variable", "value", "setting"),
    [
        ("APPLIANCE_SERVER__OLLAMA_VERSION", "latest", "server.ollama_version"),
        ("APPLIANCE_MODELS__DOWNLOAD__OLLAMA_REGISTRY", "https://mirror.lan", "is not a registry host"),
    ],
)
def test_settings_that_are_not_a_version_or_a_registry_are_refused(
    cli: Any, variable: str, value: str, setting: str
) -> None:
    result: CliResult = cli("models", "ls", env={variable: value})
    assert result.returncode != 0
    assert setting in result.stderr


# -- embeddings --------------------------------------------------------------------------------


def test_embed_texts_and_lists_normalized_and_cut_to_dimensions(client: ollama.Client, tiny: str) -> None:
    one = client.embed(model=tiny, input="hello")
    assert len(one.embeddings) == 1
    assert len(one.embeddings[0]) == 64  # the tiny model's embedding length
    assert norm(list(one.embeddings[0])) == pytest.approx(1.0, abs=1e-4)
    assert one.prompt_eval_count

    two = client.embed(model=tiny, input=["hello", "world"], keep_alive="1m")
    assert len(two.embeddings) == 2
    assert list(two.embeddings[0]) == pytest.approx(list(one.embeddings[0]), abs=1e-5)

    short = client.embed(model=tiny, input="hello", dimensions=8)
    assert len(short.embeddings[0]) == 8
    assert norm(list(short.embeddings[0])) == pytest.approx(1.0, abs=1e-4)

    legacy = client.embeddings(model=tiny, prompt="hello")
    raw = list(legacy.embedding)
    assert [value / norm(raw) for value in raw] == pytest.approx(list(one.embeddings[0]), abs=1e-4)

    assert client.embed(model=tiny, input=[]).embeddings == []  # only loads the model


def test_embed_truncates_unless_told_not_to(client: ollama.Client, tiny: str) -> None:
    long_text = "x" * 2000  # byte tokens: far past the tiny model's 256-token context
    assert len(client.embed(model=tiny, input=long_text).embeddings[0]) == 64
    refused = response_error(lambda: client.embed(model=tiny, input=long_text, truncate=False))
    assert refused.status_code == 400
    assert "context" in refused.error
    legacy = response_error(lambda: client.embeddings(model=tiny, prompt=long_text))
    assert legacy.status_code == 400


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "tiny", "input": "hi", "dimensions": 65}, 400, "dimensions 65 is more than the 64"),
        ({"model": "tiny", "input": "hi", "dimensions": 0}, 400, "dimensions"),
        ({"model": "tiny", "input": 3}, 400, "input"),
        ({"model": "ghost", "input": "hi"}, 404, "ghost"),
    ],
)
def test_embed_refusals(server: Server, tiny: str, body: dict[str, Any], status: int, words: str) -> None:
    answer = server.client.post("/api/embed", json=body)
    assert answer.status_code == status
    assert words in answer.json()["error"]


# -- create and copy ---------------------------------------------------------------------------


def test_create_from_an_uploaded_blob_then_from_that_model(
    own_server: Server, own_client: ollama.Client, cli: Any, data_dir: Path, tiny_gguf: Path
) -> None:
    server, client = own_server, own_client
    digest = client.create_blob(tiny_gguf)
    statuses = [
        update.status
        for update in client.create(
            model="terse",
            files={"tiny.gguf": digest},
            system="Answer in one word.",
            parameters={"num_predict": 3, "temperature": 0},
            stream=True,
        )
    ]
    assert statuses[0] == "parsing GGUF"
    assert statuses[-1] == "success"
    blobs_before = blob_files(data_dir)

    made = client.create(model="terser", from_="terse", system="Answer in two words.", stream=False)
    assert made.status == "success"
    listed = models_ls(cli)
    gguf = f"tiny.gguf@{digest}"
    assert gguf in listed["terse:latest"]
    assert gguf in listed["terser:latest"]  # the derived model shares the GGUF blob
    assert len(blob_files(data_dir) - blobs_before) == 1  # only its new system layer was written

    tags = {entry.model: entry.digest for entry in client.list().models}
    assert tags["terse:latest"] == tags["terser:latest"] == digest.removeprefix("sha256:")

    junk = tiny_gguf.parent / "junk.gguf"
    junk.write_bytes(b"not a model")
    refused = response_error(
        lambda: client.create(model="junk", files={"junk.gguf": client.create_blob(junk)})
    )
    assert (refused.status_code, "is not a GGUF file" in refused.error) == (400, True)

    # the system layer leads a conversation without one: 19 more prompt tokens (bytes) than ""
    user = {"role": "user", "content": "hi"}
    plain = client.chat(model="terse", messages=[{"role": "system", "content": ""}, user], options=GREEDY)
    with_system = client.chat(model="terse", messages=[user], options=GREEDY)
    assert with_system.prompt_eval_count == (plain.prompt_eval_count or 0) + len("Answer in one word.")

    shown = client.show("terse")  # what it was made with, as Ollama's show says it
    assert server.client.post("/api/show", json={"model": "terse"}).json()["system"] == "Answer in one word."
    assert shown.parameters is not None
    assert [line.split() for line in shown.parameters.splitlines()] == [
        ["num_predict", "3"],
        ["temperature", "0"],
    ]
    assert 'SYSTEM """Answer in one word."""' in (shown.modelfile or "")
    assert "PARAMETER num_predict" in (shown.modelfile or "")


def test_parameters_are_the_models_defaults_under_the_request(
    own_client: ollama.Client, long_model: str
) -> None:
    client = own_client
    client.create(
        model="brief", from_=long_model, parameters={"num_predict": 3, "stop": "never"}, stream=False
    )
    answered = client.generate(model="brief", prompt="hi", options={"temperature": 0})
    assert (answered.eval_count, answered.done_reason) == (3, "length")
    asked = client.generate(model="brief", prompt="hi", options={"temperature": 0, "num_predict": 6})
    assert (asked.eval_count, asked.done_reason) == (6, "length")


def test_create_with_a_jinja_template_and_messages(client: ollama.Client, tiny: str) -> None:
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    client.create(
        model="scripted",
        from_=tiny,
        template=template,
        messages=[{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}],
        stream=False,
    )
    assert client.show("scripted").template == template
    bare = client.chat(model=tiny, messages=[{"role": "user", "content": "hi"}], options=GREEDY)
    scripted = client.chat(model="scripted", messages=[{"role": "user", "content": "hi"}], options=GREEDY)
    assert scripted.prompt_eval_count != bare.prompt_eval_count  # another template, earlier turns


def test_copy_shares_the_blobs(own_client: ollama.Client, own_tiny: str, cli: Any, data_dir: Path) -> None:
    client, tiny = own_client, own_tiny
    before = blob_files(data_dir)
    assert client.copy(tiny, "tiny-copy").status == "success"
    listed = models_ls(cli)
    assert listed["tiny-copy:latest"] == listed["tiny:latest"]
    assert blob_files(data_dir) == before
    assert client.generate(model="tiny-copy", prompt="hi", options=GREEDY).done


# (body, status, words in its error): what create cannot honour, and mistakes in a request.
CREATE_REFUSALS: list[tuple[dict[str, Any], int, str]] = [
    ({"model": "m", "from": "tiny", "quantize": "q4_K_M"}, 400, "quantize is not supported"),
    ({"model": "m", "from": "tiny", "adapters": {"a.gguf": "sha256:" + "1" * 64}}, 400, "adapters"),
    ({"model": "m", "modelfile": "FROM tiny"}, 400, "modelfile is not supported"),
    ({"model": "m"}, 400, "send either files"),
    ({"model": "m", "from": "tiny", "files": {}}, 400, "send either files"),
    ({"model": "m", "files": {"x.gguf": "sha256:" + "1" * 64}}, 404, "has not been uploaded"),
    ({"model": "m", "files": {"x.safetensors": "sha256:" + "1" * 64}}, 400, "exactly one .gguf"),
    ({"model": "m", "files": {"x.gguf": "md5:1"}}, 400, "invalid digest"),
    ({"model": "m", "from": "ghost"}, 404, "ghost"),
    ({"model": "tiny", "from": "tiny"}, 409, "already exists"),
    ({"model": "bad name!", "from": "tiny"}, 400, "invalid model name"),
    ({"model": "m", "from": "tiny", "template": "{{ .Prompt }}"}, 400, "Go template"),
    ({"model": "m", "from": "tiny", "template": "{% for %}"}, 400, "not a valid Jinja template"),
    ({"model": "m", "from": "tiny", "parameters": {"repeat_penalty": 1.2}}, 400, "repeat_penalty"),
    ({"model": "m", "from": "tiny", "parameters": {"num_ctx": "big"}}, 400, "num_ctx must be an integer"),
    ({"model": "m", "from": "tiny", "messages": [{"role": "tool", "content": "x"}]}, 400, "role 'tool'"),
    ({"model": "m", "from": "tiny", "messages": [{"role": "user", "content": 1}]}, 400, "must be text"),
    (
        {"model": "m", "from": "tiny", "messages": [{"role": "user", "content": "x", "images": ["a"]}]},
        400,
        "images",
    ),
    ({"model": "m", "from": "tiny", "parameters": {"temperature": -1}}, 400, "a number of 0 or more"),
    ({"model": "m", "from": "tiny", "parameters": {"stop": [1]}}, 400, "a string or a list of strings"),
]


def test_create_refusals_change_nothing(own_server: Server, own_tiny: str, cli: Any, data_dir: Path) -> None:
    """One server for every case: each is refused before anything is written."""
    server = own_server
    before, blobs = models_ls(cli), blob_files(data_dir)
    for body, status, words in CREATE_REFUSALS:
        answer = server.client.post("/api/create", json=body)
        assert answer.status_code == status, (body, answer.text)
        assert words in answer.json()["error"], body
    assert models_ls(cli) == before
    assert blob_files(data_dir) == blobs


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"source": "ghost", "destination": "x"}, 404, "ghost"),
        ({"source": "tiny", "destination": "tiny"}, 409, "already exists"),
        ({"source": "tiny", "destination": "bad name!"}, 400, "invalid model name"),
        ({"source": "tiny"}, 400, "destination"),
    ],
)
def test_copy_refusals(server: Server, tiny: str, body: dict[str, Any], status: int, words: str) -> None:
    answer = server.client.post("/api/copy", json=body)
    assert answer.status_code == status
    assert words in answer.json()["error"]


# -- push and pull by name ---------------------------------------------------------------------


def test_push_to_a_site_registry_and_pull_back_by_name(
    registry: str,  # noqa: F811
    data_dir: Path,
    cli: Any,
    tiny_gguf: Path,
) -> None:
    """With the site's registry as models.download.ollama_registry, bare names push and pull there."""
    env = {
        "APPLIANCE_MODELS__DOWNLOAD__OLLAMA_REGISTRY": registry,
        "APPLIANCE_MODELS__DOWNLOAD__OCI_PLAIN_HTTP": json.dumps([registry]),
    }
    import_file(data_dir, tiny_gguf, "tiny")
    with serving(data_dir, env=env) as server, ollama.Client(host=server.url, timeout=60) as client:
        client.create(model="terse", from_="tiny", system="Answer in one word.", stream=False)
        pushed = list(client.push("terse", stream=True))
        assert pushed[0].status == "retrieving manifest"
        assert any(update.status.startswith("pushing ") and update.total for update in pushed)
        assert pushed[-1].status == "success"
        before = models_ls(cli)["terse:latest"]

        manifest = httpx.get(
            f"http://{registry}/v2/library/terse/manifests/latest",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        ).json()
        assert [layer["mediaType"] for layer in manifest["layers"]] == [
            "application/vnd.ollama.image.model",
            "application/vnd.ollama.image.system",
        ]

        client.delete("terse")
        assert [update.status for update in client.pull("terse", stream=True)][-1] == "success"
        assert models_ls(cli)["terse:latest"] == before  # the GGUF and its system layer, by name
        assert client.push("terse", stream=False).status == "success"  # the registry has it all

        # a full name pushes the local model of that name without the registry, and pulls back to it
        client.copy("tiny", "team/tiny:v1")
        assert client.push(f"{registry}/team/tiny:v1", stream=False).status == "success"
        client.delete("team/tiny:v1")
        assert client.pull(f"{registry}/team/tiny:v1", stream=False).status == "success"
        assert models_ls(cli)["team/tiny:v1"] == models_ls(cli)["tiny:latest"]


def test_insecure_pushes_only_to_loopback(
    client: ollama.Client,
    tiny: str,
    registry: str,  # noqa: F811
) -> None:
    refused = response_error(lambda: client.push(f"{registry}/library/tiny", stream=False))
    assert refused.status_code == 502  # no TLS on that registry, and it is not listed as plain HTTP
    assert "cannot reach" in refused.error
    assert client.push(f"{registry}/library/tiny", insecure=True, stream=False).status == "success"
    remote = response_error(
        lambda: client.push("mirror.example:5000/library/tiny", insecure=True, stream=False)
    )
    assert remote.status_code == 400
    assert "only to registries on loopback" in remote.error


def test_what_cannot_be_pushed_or_is_refused_by_the_registry(
    own_client: ollama.Client,
    data_dir: Path,
    tmp_path: Path,
    own_tiny: str,
    readonly_registry: str,
) -> None:
    client = own_client
    weights = tmp_path / "encoder.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    weights.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    import_file(data_dir, weights, "encoder")
    other = response_error(lambda: client.push(f"{readonly_registry}/library/encoder", insecure=True))
    assert other.status_code == 400
    assert "cannot be pushed in Ollama's layout" in other.error

    refused = response_error(lambda: client.push(f"{readonly_registry}/library/tiny", insecure=True))
    assert refused.status_code == 502
    assert "answered 405 to an upload" in refused.error


@pytest.fixture
def readonly_registry(tmp_path: Path) -> Iterator[str]:
    with serving_registry(tmp_path, readonly=True) as address:
        yield address


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"model": "ghost"}, 404, "no local model"),
        ({"model": "a/b/c/d"}, 400, "at most three parts"),
        ({}, 400, "model is required"),
    ],
)
def test_push_refusals(server: Server, tiny: str, body: dict[str, Any], status: int, words: str) -> None:
    answer = server.client.post("/api/push", json=body)
    assert answer.status_code == status
    assert words in answer.json()["error"]


def test_bare_names_and_pushes_follow_offline_mode(data_dir: Path, cli: Any, tiny_gguf: Path) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    with serving(data_dir, env={"APPLIANCE_OFFLINE": "1"}) as server:
        insecure = server.client.post("/api/pull", json={"model": "llama3.2", "insecure": True})
        assert insecure.status_code == 400
        assert "insecure is not supported" in insecure.json()["error"]
        refused = server.client.post("/api/pull", json={"model": "llama3.2"})
        assert refused.status_code == 403
        assert "oci://registry.ollama.ai/library/llama3.2:latest" in refused.json()["error"]
        pushed = server.client.post("/api/push", json={"model": "tiny"})
        assert pushed.status_code == 403
        assert "offline mode is on" in pushed.json()["error"]
    result: CliResult = cli("--offline", "models", "pull", "qwen3:4b")
    assert result.returncode != 0
    assert "oci://registry.ollama.ai/library/qwen3:4b" in result.stderr
