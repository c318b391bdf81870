"""The Ollama-compatible API, driven by the real ``ollama`` client against a live ``appliance serve``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from appliance.settings import OLLAMA_API_VERSION
from tests.conftest import CliResult, Server, import_file, started_server
from tests.fileserver import serve_files
from tests.tiny_model import TINY_CHAT_TEMPLATE, write_llama_gguf
from tests.web.conftest import ran
from tests.web.serving import serving

GREEDY = {"temperature": 0, "num_predict": 5}
NO_SUCH = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def server(shared_server: Server) -> Server:
    """One server for the module's tests that only ask (each reads only its own answers) and find
    ``tiny`` alone there; those that add, delete, load or unload models, or read what is loaded,
    or need other settings, have ``own_server``."""
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
    """Greedy decoding never stops on its own here: about 4,000 tokens, several seconds of work."""
    path = write_llama_gguf(tmp_path / "long.gguf", context=4096, chat_template=TINY_CHAT_TEMPLATE)
    import_file(data_dir, path, "long")
    return "long"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def consume(call: Callable[[], Any]) -> None:
    """Call the client and read a streamed answer to its end, where a stream's error is raised."""
    result = call()
    if isinstance(result, Iterator):
        list(result)


def response_error(call: Callable[[], Any]) -> ollama.ResponseError:
    with pytest.raises(ollama.ResponseError) as caught:
        consume(call)
    return caught.value


def wait_for(condition: Callable[[], bool], *, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- models ------------------------------------------------------------------------------------


def test_version_and_list(server: Server, client: ollama.Client, tiny: str, tiny_gguf: Path) -> None:
    assert server.client.get("/api/version").json() == {"version": OLLAMA_API_VERSION}
    listed = client.list().models
    assert [model.model for model in listed] == ["tiny:latest"]
    model = listed[0]
    assert model.digest == sha256(tiny_gguf.read_bytes()).removeprefix("sha256:")
    assert model.size == tiny_gguf.stat().st_size
    assert model.modified_at is not None
    assert model.modified_at.tzinfo is not None
    assert model.details is not None
    assert model.details.format == "gguf"
    assert (model.details.family, model.details.families) == ("llama", ["llama"])
    assert model.details.parameter_size == "116K"  # 115,520 parameters, shown as Ollama shows them
    assert model.details.quantization_level == "F32"
    assert server.client.get("/api/tags").json()["models"][0]["name"] == "tiny:latest"


def test_show(
    own_server: Server, own_client: ollama.Client, own_tiny: str, make_gguf: Any, data_dir: Path
) -> None:
    server, client = own_server, own_client
    shown = client.show("tiny")
    assert shown.template == TINY_CHAT_TEMPLATE
    assert shown.parameters == ""
    assert shown.capabilities == ["completion"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["general.parameter_count"] == 115520
    assert shown.modelinfo["llama.context_length"] == 256
    assert shown.details is not None
    assert shown.details.family == "llama"
    assert shown.modelfile is not None
    assert "\nFROM /" in shown.modelfile

    import_file(data_dir, make_gguf("plain.gguf"), "plain")  # no chat template: the engine uses ChatML
    plain = server.client.post("/api/show", json={"name": "plain"})  # "name": the older spelling
    assert plain.status_code == 200
    assert (plain.json()["template"], plain.json()["parameters"]) == ("", f'{"stop":<30} "<|im_end|>"')

    assert response_error(lambda: client.show("ghost")).status_code == 404
    missing = server.client.post("/api/show", json={})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})


def test_delete(own_server: Server, own_client: ollama.Client, own_tiny: str) -> None:
    server, client = own_server, own_client
    assert client.generate(model="tiny").done_reason == "load"
    assert client.delete("tiny").status == "success"
    assert client.list().models == []
    assert client.ps().models == []  # a loaded copy goes with it
    assert response_error(lambda: client.delete("tiny")).status_code == 404
    audit = server.client.get("/api/v1/audit", params={"action": "models.delete"}).json()
    assert [(event["target"], event["outcome"]) for event in audit] == [("tiny:latest", "ok")]


def delete_over(server: Server, surface: str, name: str) -> httpx.Response:
    if surface == "ollama":
        return server.client.request("DELETE", "/api/delete", json={"model": name})
    return server.client.delete(f"/api/v1/models/{name}")


def loaded_names(server: Server) -> list[str]:
    return [model["name"] for model in server.client.get("/api/v1/ps").json()["models"]]


@pytest.mark.parametrize("surface", ["ollama", "api"])
def test_deleting_a_model_unloads_it_once_its_requests_end(
    own_server: Server, own_client: ollama.Client, own_tiny: str, long_model: str, surface: str
) -> None:
    """One behaviour on every surface: an idle model unloads at once; one serving a request leaves
    ps at once, lets the request finish, then unloads."""
    server, client = own_server, own_client
    assert client.generate(model="tiny", keep_alive=-1).done_reason == "load"
    assert delete_over(server, surface, "tiny").status_code == 200
    assert loaded_names(server) == []
    assert [model["name"] for model in client.ps().models] == []

    body = {"model": "long", "prompt": "hi", "options": {"temperature": 0, "num_predict": 2000}}
    with server.client.stream("POST", "/api/generate", json=body) as running:
        lines = running.iter_lines()
        assert json.loads(next(lines))["done"] is False
        assert loaded_names(server) == ["long:latest"]
        assert delete_over(server, surface, "long").status_code == 200
        assert loaded_names(server) == []  # no longer offered, though still finishing
        last = json.loads(list(lines)[-1])
    assert (last.get("error"), last["done"], last["done_reason"]) == (None, True, "length")
    assert last["eval_count"] == 2000
    records = server.client.get("/api/v1/inference", params={"model": "long"}).json()
    assert [record["outcome"] for record in records] == ["length"]
    assert client.list().models == []
    assert response_error(lambda: client.generate(model="long", prompt="hi")).status_code == 404


def test_a_model_removed_by_the_cli_leaves_the_servers_pool(
    own_server: Server, own_client: ollama.Client, own_tiny: str, cli: object
) -> None:
    server, client = own_server, own_client
    assert client.generate(model="tiny", keep_alive=-1).done_reason == "load"
    removed: CliResult = cli("models", "rm", "tiny")  # type: ignore[operator]
    assert removed.returncode == 0, removed.stderr
    wait_for(lambda: loaded_names(server) == [], seconds=10)  # the pool notices within a reap round


# -- generate and chat -------------------------------------------------------------------------


def test_generate_streamed_and_whole(client: ollama.Client, tiny: str) -> None:
    parts = list(client.generate(model="tiny", prompt="hi", stream=True, options=GREEDY))
    *pieces, last = parts
    assert pieces
    assert all(part.done is False and part.model == "tiny" for part in pieces)
    assert last.done is True
    assert last.response == ""
    assert last.done_reason == "length"
    assert last.eval_count == 5
    assert last.prompt_eval_count is not None
    assert last.prompt_eval_count > 0
    assert last.context is not None
    assert len(last.context) > last.prompt_eval_count  # the prompt's token ids, then the answer's
    durations = (last.total_duration, last.load_duration, last.prompt_eval_duration, last.eval_duration)
    assert all(isinstance(value, int) and value >= 0 for value in durations)
    assert last.total_duration is not None
    assert last.total_duration > 0
    assert last.created_at is not None
    assert last.created_at.endswith("Z")

    whole = client.generate(model="tiny", prompt="hi", options=GREEDY)
    assert whole.done is True
    assert whole.done_reason == "length"
    assert whole.response == "".join(part.response or "" for part in pieces)  # greedy: the same text
    assert (whole.eval_count, whole.prompt_eval_count) == (5, last.prompt_eval_count)


def test_generate_raw_system_and_format(client: ollama.Client, tiny: str) -> None:
    templated = client.generate(model="tiny", prompt="hi", options=GREEDY).prompt_eval_count
    raw = client.generate(model="tiny", prompt="hi", raw=True, options=GREEDY).prompt_eval_count
    with_system = client.generate(model="tiny", prompt="hi", system="be brief", options=GREEDY)
    assert templated is not None
    assert raw is not None
    assert with_system.prompt_eval_count is not None
    assert raw < templated < with_system.prompt_eval_count

    options = {"temperature": 0, "num_predict": 8}
    as_json = client.generate(model="tiny", prompt="hi", format="json", options=options)
    assert as_json.done is True
    assert as_json.eval_count == 8
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    as_schema = client.generate(model="tiny", prompt="hi", format=schema, options=options)
    assert as_schema.response is not None
    assert re.match(r'\{\s*"a"\s*:', as_schema.response), "the schema's grammar shapes the answer"

    stopped = client.generate(model="tiny", prompt="hi", options={"num_predict": 50, "stop": ["a", "e"]})
    assert stopped.done is True
    assert stopped.done_reason in ("stop", "length")


def test_chat_streamed_and_whole(client: ollama.Client, tiny: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    *pieces, last = list(client.chat(model="tiny", messages=messages, stream=True, options=GREEDY))
    assert pieces
    assert all(piece.message.role == "assistant" and piece.done is False for piece in pieces)
    assert last.done is True
    assert last.done_reason == "length"
    assert last.eval_count == 5
    assert last.message.content == ""
    assert last.prompt_eval_count is not None
    assert last.prompt_eval_count > 0

    whole = client.chat(model="tiny", messages=messages, options=GREEDY)
    assert whole.message.role == "assistant"
    assert whole.message.content == "".join(piece.message.content or "" for piece in pieces)
    assert (whole.done_reason, whole.eval_count) == ("length", 5)


def test_load_unload_and_ps(own_client: ollama.Client, own_tiny: str, tiny_gguf: Path) -> None:
    client = own_client
    assert client.ps().models == []
    loaded = client.generate(model="tiny")  # no prompt: only load
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    running = client.ps().models
    assert [model.name for model in running] == ["tiny:latest"]
    model = running[0]
    assert model.digest == sha256(tiny_gguf.read_bytes()).removeprefix("sha256:")
    assert model.size is not None
    assert model.size > 0
    assert model.size_vram in (0, model.size)
    assert model.details is not None
    assert model.details.family == "llama"
    assert model.context_length == 256
    assert model.expires_at is not None
    assert model.expires_at > datetime.now(UTC)

    unloaded = client.generate(model="tiny", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []

    assert client.chat(model="tiny", messages=[]).done_reason == "load"
    client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], options=GREEDY, keep_alive=-1)
    kept = client.ps().models[0].expires_at
    assert kept is not None
    assert kept.year > datetime.now(UTC).year + 100
    assert client.chat(model="tiny", messages=[], keep_alive=0).done_reason == "unload"
    assert client.ps().models == []
    assert client.generate(model="tiny", keep_alive=0).done_reason == "unload"  # not loaded: fine

    # num_ctx loads with that context; a prompt longer than it is refused, not cut.
    small = client.generate(model="tiny", prompt="hi", raw=True, options={**GREEDY, "num_ctx": 64})
    assert small.done is True
    assert client.ps().models[0].context_length == 64
    error = response_error(lambda: client.generate(model="tiny", prompt="x" * 100, options={"num_ctx": 64}))
    assert "context holds 64" in error.error


@pytest.fixture
def coordinating(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server started after this fixture only coordinates (cluster.local_inference false)."""
    monkeypatch.setenv("APPLIANCE_CLUSTER__LOCAL_INFERENCE", "false")


def test_a_server_that_only_coordinates_refuses_to_load_into_its_own_engine(
    coordinating: None, own_server: Server, cli: object, own_tiny: str
) -> None:
    """Ollama's preload and `models load` would load where no request is routed: a 409 that says
    where to load instead; unloading a model that is not loaded still answers as before."""
    server = own_server
    port = server.url.rsplit(":", 1)[1]
    with ollama.Client(host=server.url, timeout=60) as client:
        refusals = [
            response_error(lambda: client.generate(model="tiny")),
            response_error(lambda: client.chat(model="tiny", messages=[])),
            response_error(lambda: client.generate(model="tiny", keep_alive="5m")),
        ]
        for refused in refusals:
            assert refused.status_code == 409
            assert "this server only coordinates" in refused.error
            assert "appliance nodes load NODE tiny:latest" in refused.error
        assert client.generate(model="tiny", keep_alive=0).done_reason == "unload"  # not loaded: fine
        assert response_error(lambda: client.generate(model="ghost")).status_code == 404
        assert client.ps().models == []
    api = server.client.post("/api/v1/models/load", json={"name": "tiny"})
    assert api.status_code == 409
    assert api.json()["code"] == "conflict"
    assert "`appliance nodes load NODE tiny:latest`" in api.json()["hint"]
    loaded: CliResult = cli("models", "load", "tiny", "--port", port)  # type: ignore[operator]
    assert loaded.returncode == 1
    assert "cannot load tiny:latest here: this server only coordinates" in loaded.stderr
    assert "appliance nodes load NODE tiny:latest" in loaded.stderr
    unloaded: CliResult = cli("models", "unload", "tiny", "--port", port)  # type: ignore[operator]
    assert unloaded.returncode == 0, unloaded.stderr
    assert "tiny was not loaded" in unloaded.stdout
    assert server.client.get("/api/ps").json()["models"] == []


# -- pull --------------------------------------------------------------------------------------


def test_pull_local_files(
    own_server: Server, own_client: ollama.Client, tiny_gguf: Path, tmp_path: Path
) -> None:
    server, client = own_server, own_client
    source = tmp_path / "pulled" / "Other-Model.gguf"
    source.parent.mkdir()
    source.write_bytes(tiny_gguf.read_bytes())
    assert client.pull(str(source)).status == "success"
    assert [model.model for model in client.list().models] == ["other-model:latest"]

    statuses = list(client.pull(f"file:{tiny_gguf}", stream=True))
    assert statuses[0].status == "importing"
    assert statuses[0].total == tiny_gguf.stat().st_size
    # the provisioner reports the import's bytes, as it reports a download's
    assert (statuses[-2].status, statuses[-2].completed) == ("importing", tiny_gguf.stat().st_size)
    assert statuses[-1].status == "success"
    assert [model.model for model in client.list().models] == ["other-model:latest", "tiny:latest"]
    audit = server.client.get("/api/v1/audit", params={"action": "models.import"}).json()
    assert len(audit) == 2


@pytest.mark.parametrize(
    ("ref", "status", "words"),
    [
        (NO_SUCH, 400, "names a blob"),
        ("/nonexistent/x.gguf", 404, "does not exist"),
        ("bad name!", 400, "invalid model ref"),
    ],
)
def test_pull_errors(client: ollama.Client, ref: str, status: int, words: str) -> None:
    before = client.list().models
    error = response_error(lambda: client.pull(ref))
    assert error.status_code == status
    assert words in error.error
    streamed = response_error(lambda: client.pull(ref, stream=True))  # fails before the stream starts
    assert streamed.status_code == status
    assert client.list().models == before  # the pulls added nothing


def test_pull_a_url_with_progress(own_client: ollama.Client, tiny_gguf: Path) -> None:
    client = own_client
    with serve_files() as files:
        url = files.add("/models/Web-Model.gguf", tiny_gguf.read_bytes())
        statuses = list(client.pull(url, stream=True))
        missing = f"{files.url}/models/missing.gguf"
        error = response_error(lambda: client.pull(missing, stream=True))
    assert statuses[0].status == "pulling manifest"
    pulling = [status for status in statuses if (status.status or "").startswith("pulling ") and status.total]
    assert pulling[-1].total == tiny_gguf.stat().st_size
    assert [status.status for status in statuses[-2:]] == ["verifying sha256 digest", "success"]
    assert [model.model for model in client.list().models] == ["web-model:latest"]
    assert "answered 404: no such file" in error.error  # reported in the stream, as Ollama does


def test_pull_of_a_file_that_is_not_a_model(client: ollama.Client, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    assert response_error(lambda: client.pull(str(notes))).status_code == 400


# -- blobs -------------------------------------------------------------------------------------


def test_blobs(
    own_server: Server, own_client: ollama.Client, data_dir: Path, own_tiny: str, tiny_gguf: Path
) -> None:
    server, client = own_server, own_client
    http = server.client
    assert http.head(f"/api/blobs/{sha256(tiny_gguf.read_bytes())}").status_code == 200

    content = os.urandom(9 * 1024 * 1024)  # more than one write chunk
    digest = sha256(content)
    assert http.head(f"/api/blobs/{digest}").status_code == 404
    wrong = http.post(f"/api/blobs/{NO_SUCH}", content=content)
    assert wrong.status_code == 400
    assert "digest mismatch" in wrong.json()["error"]
    assert http.head(f"/api/blobs/{NO_SUCH}").status_code == 404
    assert list((data_dir / "tmp").iterdir()) == []  # nothing left behind

    assert http.post(f"/api/blobs/{digest}", content=content).status_code == 201
    assert http.head(f"/api/blobs/{digest}").status_code == 200
    assert (data_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes() == content
    assert http.post(f"/api/blobs/{digest}", content=content).status_code == 200  # already there
    dashed = digest.replace(":", "-")  # newer clients write sha256-HEX
    assert http.head(f"/api/blobs/{dashed}").status_code == 200
    assert list((data_dir / "tmp").iterdir()) == []

    upload = tiny_gguf.parent / "upload.bin"
    upload.write_bytes(b"a small blob")
    assert client.create_blob(upload) == sha256(b"a small blob")
    assert http.head(f"/api/blobs/{sha256(b'a small blob')}").status_code == 200

    assert http.head("/api/blobs/sha256:nothex").status_code == 400
    bad = http.post("/api/blobs/md5:abc", content=b"x")
    assert bad.status_code == 400
    assert "invalid digest" in bad.json()["error"]


# -- errors ------------------------------------------------------------------------------------


def test_unknown_model_is_404(client: ollama.Client) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: client.generate(model="ghost", prompt="hi"),
        lambda: client.generate(model="ghost", prompt="hi", stream=True),
        lambda: client.generate(model="ghost"),  # load
        lambda: client.generate(model="ghost", keep_alive=0),  # unload
        lambda: client.chat(model="ghost", messages=[{"role": "user", "content": "hi"}]),
        lambda: client.chat(model="ghost", messages=[{"role": "user", "content": "hi"}], stream=True),
    ]
    for call in calls:
        error = response_error(call)
        assert error.status_code == 404
        assert "ghost:latest not found" in error.error


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"options": {"temperature": "hot"}}, "options.temperature"),
        ({"options": {"num_predict": -5}}, "options.num_predict"),
        ({"options": {"top_p": 2}}, "options.top_p"),
        ({"options": {"stop": 5}}, "options.stop"),
        ({"keep_alive": "forever"}, "keep_alive"),
        ({"format": "xml"}, "format 'xml' is not supported"),
        ({"format": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "JSON schema"),
        ({"stream": "sometimes"}, "stream"),
        ({"model": ""}, "model"),
    ],
)
def test_invalid_generate_requests_are_400(
    server: Server, client: ollama.Client, tiny: str, body: dict[str, Any], words: str
) -> None:
    response = server.client.post("/api/generate", json={"model": "tiny", "prompt": "hi", **body})
    assert response.status_code == 400
    assert words in response.json()["error"]
    chat = server.client.post(
        "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    )
    assert chat.status_code == 400
    assert client.generate(model="tiny", prompt="hi", options=GREEDY).done is True  # still serving


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.generate(model="tiny", prompt="hi", images=[b"\x89PNG"]), "images"),
        (lambda c: c.generate(model="tiny", prompt="hi", template="{{ .Prompt }}"), "template"),
        (
            lambda c: c.chat(model="tiny", messages=[{"role": "user", "content": "hi", "images": [b"x"]}]),
            "messages.0.images",
        ),
        (lambda c: c.chat(model="tiny", messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
        (lambda c: c.generate(model="tiny", prompt="hi", options={"tfs_z": 0.9}), "options.tfs_z"),
        (lambda c: c.generate(model="tiny", prompt="hi", options={"mirostat": 3}), "options.mirostat"),
        (lambda c: c.generate(model="tiny", prompt="hi", options={"typical_p": 0}), "options.typical_p"),
        (
            lambda c: c.chat(
                model="tiny", messages=[{"role": "user", "content": "hi"}], options={"presence_penalty": 3}
            ),
            "options.presence_penalty",
        ),
    ],
)
def test_fields_it_cannot_honour_are_refused_by_name(
    server: Server, tiny: str, call: Callable[[ollama.Client], Any], field: str
) -> None:
    request_id = uuid.uuid4().hex
    with ollama.Client(host=server.url, timeout=60, headers={"X-Request-ID": request_id}) as client:
        error = response_error(lambda: call(client))
    assert error.status_code == 400
    assert field in error.error
    assert ran(server, request_id) == []  # nothing ran


def test_sampling_options_reach_llama_cpps_samplers(client: ollama.Client, tiny: str) -> None:
    def generate(**options: Any) -> str:
        options = {"temperature": 0, "num_predict": 24, **options}
        return client.generate(model="tiny", prompt="hi", options=options).response

    plain = generate()
    assert generate() == plain  # greedy: the same every time, so a change below is the option's
    assert generate(repeat_penalty=50.0, repeat_last_n=-1) != plain
    assert generate(frequency_penalty=2.0, presence_penalty=2.0) != plain
    sampled = {"temperature": 1.0, "seed": 7}
    for options in ({"mirostat": 2, "mirostat_tau": 1.0}, {"mirostat": 1}, {"min_p": 0.5, "typical_p": 0.5}):
        assert generate(**sampled, **options) == generate(**sampled, **options)  # seeded: repeatable


def test_options_the_appliance_decides_are_ignored_and_said_in_the_log(
    tiny_gguf: Path, data_dir: Path
) -> None:
    import_file(data_dir, tiny_gguf, "tiny")
    with serving(data_dir) as server, ollama.Client(host=server.url, timeout=60) as client:
        options = {"num_thread": 2, "use_mmap": True, "num_keep": 4, **GREEDY}
        assert client.generate(model="tiny", prompt="hi", options=options).done
    assert "ignored Ollama options num_keep, num_thread, use_mmap" in "".join(server.output)


def test_fields_that_ask_for_nothing_are_accepted(client: ollama.Client, tiny: str) -> None:
    neutral = {"repeat_penalty": 1.1, "min_p": 0.0, "mirostat": 0, "num_thread": 2, **GREEDY}
    assert client.generate(model="tiny", prompt="hi", think=False, images=[], options=neutral).done
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "images": []}]
    assert client.chat(model="tiny", messages=messages, tools=[], options=neutral).done


@pytest.mark.parametrize("number", ["NaN", "Infinity"])
def test_a_number_that_is_not_finite_is_refused_as_such(server: Server, tiny: str, number: str) -> None:
    for body in (
        f'{{"model": "tiny", "prompt": "hi", "options": {{"temperature": {number}}}}}',
        f'{{"model": "tiny", "prompt": "hi", "keep_alive": {number}}}',
    ):
        refused = server.client.post("/api/generate", content=body)
        assert refused.status_code == 400
        assert "not a finite number" in refused.json()["error"]


def test_malformed_bodies_are_400(server: Server, client: ollama.Client, tiny: str) -> None:
    http = server.client
    for path in ("/api/generate", "/api/chat", "/api/show", "/api/pull"):
        for content in (b"", b"not json", b"[1, 2]"):
            response = http.post(path, content=content)
            assert response.status_code == 400, (path, content)
            assert set(response.json()) == {"error"}
    assert http.request("DELETE", "/api/delete", content=b"{").status_code == 400
    no_role = http.post("/api/chat", json={"model": "tiny", "messages": [{"content": "hi"}]})
    assert no_role.status_code == 400
    assert "messages.0.role" in no_role.json()["error"]
    error = response_error(lambda: client.generate(model="tiny", prompt="hi", options={"top_k": -1}))
    assert error.status_code == 400
    assert client.list().models[0].model == "tiny:latest"  # still serving


def test_a_prompt_too_long_fails_before_the_stream(client: ollama.Client, tiny: str) -> None:
    error = response_error(lambda: client.generate(model="tiny", prompt="x" * 300, raw=True, stream=True))
    assert error.status_code == 400
    assert "context holds 256" in error.error


@pytest.fixture
def one_slot_server(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Server:
    """A server whose models decode one request at a time and let one more wait."""
    monkeypatch.setenv("APPLIANCE_ENGINE__PARALLEL", "1")
    monkeypatch.setenv("APPLIANCE_ENGINE__QUEUE_SIZE", "1")
    server: Server = request.getfixturevalue("own_server")
    return server


def queued(server: Server) -> int:
    loaded = server.client.get("/api/v1/ps").json()["models"]
    return sum(model["queued_requests"] for model in loaded)


def test_a_full_queue_is_503_with_retry_after(one_slot_server: Server, long_model: str) -> None:
    server = one_slot_server
    busy = {"model": "long", "prompt": "hi", "options": {"temperature": 0}}
    with server.client.stream("POST", "/api/generate", json=busy) as running:  # takes the only slot
        lines = running.iter_lines()  # kept: a dropped line iterator closes the response
        assert json.loads(next(lines))["done"] is False
        waiting: list[httpx.Response] = []
        short = {**busy, "stream": False, "options": {"num_predict": 1}}
        thread = threading.Thread(
            target=lambda: waiting.append(httpx.post(f"{server.url}/api/generate", json=short, timeout=60))
        )
        thread.start()  # waits in the queue
        wait_for(lambda: queued(server) == 1, seconds=10)

        refused = server.client.post("/api/generate", json={**short, "stream": True})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert "already waiting" in refused.json()["error"]
        with ollama.Client(host=server.url, timeout=60) as client:
            assert response_error(
                lambda: client.chat(model="long", messages=[{"role": "user", "content": "x"}])
            )
            error = response_error(lambda: client.generate(model="long", prompt="hi"))
            assert error.status_code == 503
    thread.join(timeout=30)  # the running stream was dropped, so the waiting request gets its turn
    assert [response.status_code for response in waiting] == [200]


def test_a_stream_stops_when_its_client_goes_away(own_server: Server, long_model: str) -> None:
    server = own_server
    body = {"model": "long", "prompt": "hi", "options": {"temperature": 0}}
    with server.client.stream(
        "POST", "/api/chat", json={**body, "messages": [{"role": "user", "content": "hi"}]}
    ) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert json.loads(next(r.iter_lines()))["done"] is False

    def recorded() -> bool:
        return bool(server.client.get("/api/v1/inference", params={"model": "long"}).json())

    wait_for(recorded, seconds=3)  # the whole answer would take several seconds
    records = server.client.get("/api/v1/inference", params={"model": "long"}).json()
    assert [(record["endpoint"], record["outcome"]) for record in records] == [("/api/chat", "cancelled")]

    def slot_freed() -> bool:  # the batcher drops the sequence at its next step
        return server.client.get("/api/v1/ps").json()["models"][0]["active_requests"] == 0

    wait_for(slot_freed, seconds=1)
