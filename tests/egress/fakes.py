"""Fake external providers: real HTTP servers on loopback that speak OpenAI's and Anthropic's
streaming wire formats, with knobs for what a test needs (they fake the *providers*, not us).

    with serve_fake_openai() as fake:          # fake.base_url is "http://127.0.0.1:PORT/v1"
        fake.script = "Hello there"            # the answer, streamed in chunks of fake.chunk_size
        fake.script = FakeToolCall("get_weather", {"city": "Paris"})   # or a tool call (or a list)
        fake.fail_first = [429, 503]           # answered first (Retry-After: 0), then a 200
        fake.echo_key = True                   # the answer (and error bodies) carry the key it got
        fake.require_key = "sk-test"           # 401 without it
        fake.requests                          # what it received: method, path, headers, body

Both serve their model list (``GET /v1/models``); the OpenAI one also ``/v1/completions`` and
``/v1/embeddings``. Chat and completions must ask for ``stream: true`` (the egress always streams).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

from appliance.store.base import Operation, Provider, ProviderKind

__all__ = [
    "FakeAnthropic",
    "FakeOpenAI",
    "FakeProvider",
    "FakeToolCall",
    "Received",
    "provider_for",
    "serve_fake_anthropic",
    "serve_fake_openai",
]


@dataclass(frozen=True)
class FakeToolCall:
    """A tool call the fake makes; its arguments are streamed as partial JSON."""

    name: str
    arguments: dict[str, Any]
    id: str = "call_fake_1"


@dataclass(frozen=True)
class Received:
    """One request as the fake got it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None


Script = str | FakeToolCall | Sequence[str | FakeToolCall]


@dataclass
class FakeProvider:
    """The knobs and the server both fakes share; subclasses write the wire format."""

    kind: ClassVar[ProviderKind]
    script: Script = "Hello from the fake provider."
    reasoning: str | None = None  # streamed before the answer (OpenAI reasoning_content, Anthropic thinking)
    chunk_size: int = 4  # characters per text delta (and per partial-JSON delta)
    finish: str = "stop"  # "stop" or "length": how a text answer ends (tool calls end as tool calls)
    stop_sequence: str | None = None  # reported as the stop string that ended the answer
    fail_first: list[int] = field(default_factory=list)  # statuses answered (and consumed) first
    retry_after: str | None = "0"  # the Retry-After header of those (None: none)
    echo_key: bool = False  # answer (and error messages) say the key the request carried
    require_key: str | None = None  # 401 unless the request carries this key
    delay: float = 0.0  # seconds before answering anything
    drop_after: int | None = None  # close the connection after this many SSE events ...
    drop_times: int | None = None  # ... in this many answers (None: every one)
    redirect_to: str | None = None  # answer every request with a 307 to this URL
    garbage: bytes | None = None  # a 200 of these bytes (JSON) in place of every answer
    usage: tuple[int, int] = (11, 7)  # (prompt tokens, completion tokens)
    models: list[str] = field(default_factory=lambda: ["fake-model", "fake-model-large"])
    requests: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._httpd.daemon_threads = True
        # A short poll: stop() waits for it, and every test stops a fake.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def base_url(self) -> str:
        """What a provider's ``base_url`` is set to for this fake."""
        return self.url

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def received(self, path: str) -> list[Received]:
        with self._lock:
            return [request for request in self.requests if request.path == path]

    # what a subclass writes
    def key_of(self, headers: dict[str, str]) -> str | None:
        raise NotImplementedError

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        raise NotImplementedError

    def answer(self, handler: _Handler, request: Received) -> None:
        raise NotImplementedError

    # shared helpers
    def items(self) -> list[str | FakeToolCall]:
        if isinstance(self.script, (str, FakeToolCall)):
            return [self.script]
        return list(self.script)

    def text_of(self, text: str, key: str | None) -> str:
        return f"{text} Your key is {key}." if self.echo_key else text

    def pieces(self, text: str) -> list[str]:
        size = max(1, self.chunk_size)
        return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class FakeOpenAI(FakeProvider):
    """OpenAI's API under ``/v1``: chat/completions and completions (SSE, usage when
    ``stream_options.include_usage``), embeddings, models. Key: ``Authorization: Bearer``."""

    kind = "openai"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def key_of(self, headers: dict[str, str]) -> str | None:
        value = headers.get("authorization")
        if value is None:
            return None
        return value.removeprefix("Bearer ")

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = {401: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": str(status)}}

    def answer(self, handler: _Handler, request: Received) -> None:
        key = self.key_of(request.headers)
        body = request.body if isinstance(request.body, dict) else {}
        if request.method == "GET" and request.path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
            handler.json(200, {"object": "list", "data": data})
        elif request.method == "POST" and request.path == "/v1/embeddings":
            texts = body.get("input", [])
            texts = [texts] if isinstance(texts, str) else texts
            data = [
                {"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5, -0.25]}
                for i, t in enumerate(texts)
            ]
            usage = {"prompt_tokens": self.usage[0], "total_tokens": self.usage[0]}
            handler.json(200, {"object": "list", "data": data, "model": body.get("model"), "usage": usage})
        elif request.method == "POST" and request.path in ("/v1/chat/completions", "/v1/completions"):
            if body.get("stream") is not True:
                handler.json(400, self.error_body(400, "this fake only streams: set stream to true"))
                return
            chat = request.path == "/v1/chat/completions"
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            handler.sse(
                self._chat_events(key, body, include_usage)
                if chat
                else self._completion_events(key, body, include_usage)
            )
        else:
            handler.json(404, self.error_body(404, f"no route {request.method} {request.path}"))

    def _chat_events(self, key: str | None, body: dict[str, Any], include_usage: bool) -> Iterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _data(_openai_chunk(body, "chat.completion.chunk", [choice]))

        yield chunk({"role": "assistant", "content": ""})
        if self.reasoning:
            for piece in self.pieces(self.reasoning):
                yield chunk({"reasoning_content": piece})
        calls = 0
        for item in self.items():
            if isinstance(item, str):
                for piece in self.pieces(self.text_of(item, key)):
                    yield chunk({"content": piece})
                continue
            start = {"index": calls, "id": item.id, "type": "function"}
            yield chunk({"tool_calls": [{**start, "function": {"name": item.name, "arguments": ""}}]})
            for piece in self.pieces(json.dumps(item.arguments)):
                yield chunk({"tool_calls": [{"index": calls, "function": {"arguments": piece}}]})
            calls += 1
        yield chunk({}, "tool_calls" if calls else self.finish)
        if include_usage:
            prompt, completion = self.usage
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            yield _data({**_openai_chunk(body, "chat.completion.chunk", []), "usage": usage})
        yield "data: [DONE]\n\n"

    def _completion_events(self, key: str | None, body: dict[str, Any], include_usage: bool) -> Iterator[str]:
        text = "".join(item for item in self.items() if isinstance(item, str))
        for piece in self.pieces(self.text_of(text, key)):
            choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}
            yield _data(_openai_chunk(body, "text_completion", [choice]))
        last = {"index": 0, "text": "", "logprobs": None, "finish_reason": self.finish}
        yield _data(_openai_chunk(body, "text_completion", [last]))
        if include_usage:
            prompt, completion = self.usage
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            yield _data({**_openai_chunk(body, "text_completion", []), "usage": usage})
        yield "data: [DONE]\n\n"


class FakeAnthropic(FakeProvider):
    """Anthropic's Messages API: ``/v1/messages`` (SSE events) and ``/v1/models``. Key: ``x-api-key``;
    every request must carry ``anthropic-version``."""

    kind = "anthropic"

    def key_of(self, headers: dict[str, str]) -> str | None:
        return headers.get("x-api-key")

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}

    def answer(self, handler: _Handler, request: Received) -> None:
        key = self.key_of(request.headers)
        body = request.body if isinstance(request.body, dict) else {}
        if "anthropic-version" not in request.headers:
            handler.json(400, self.error_body(400, "anthropic-version: header is required"))
        elif request.method == "GET" and request.path == "/v1/models":
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
                for m in self.models
            ]
            first, last = (self.models[0], self.models[-1]) if self.models else (None, None)
            handler.json(200, {"data": data, "has_more": False, "first_id": first, "last_id": last})
        elif request.method == "POST" and request.path == "/v1/messages":
            if body.get("stream") is not True:
                handler.json(400, self.error_body(400, "this fake only streams: set stream to true"))
            elif "max_tokens" not in body:
                handler.json(400, self.error_body(400, "max_tokens: Field required"))
            else:
                handler.sse(self._events(key, body))
        else:
            handler.json(404, self.error_body(404, f"no route {request.method} {request.path}"))

    def _events(self, key: str | None, body: dict[str, Any]) -> Iterator[str]:
        prompt, completion = self.usage
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": body.get("model"),
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": 1},
        }
        yield _event("message_start", {"type": "message_start", "message": message})
        yield _event("ping", {"type": "ping"})
        index = 0
        if self.reasoning:
            yield _block_start(index, {"type": "thinking", "thinking": ""})
            for piece in self.pieces(self.reasoning):
                yield _block_delta(index, {"type": "thinking_delta", "thinking": piece})
            yield _block_delta(index, {"type": "signature_delta", "signature": "c2lnbmF0dXJl"})
            yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        tools = False
        for item in self.items():
            if isinstance(item, str):
                yield _block_start(index, {"type": "text", "text": ""})
                for piece in self.pieces(self.text_of(item, key)):
                    yield _block_delta(index, {"type": "text_delta", "text": piece})
            else:
                tools = True
                tool_id = item.id.replace("call_", "toolu_")
                yield _block_start(index, {"type": "tool_use", "id": tool_id, "name": item.name, "input": {}})
                for piece in self.pieces(json.dumps(item.arguments)):
                    yield _block_delta(index, {"type": "input_json_delta", "partial_json": piece})
            yield _event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        if tools:
            stop_reason = "tool_use"
        elif self.finish == "length":
            stop_reason = "max_tokens"
        else:
            stop_reason = "stop_sequence" if self.stop_sequence else "end_turn"
        delta = {"stop_reason": stop_reason, "stop_sequence": self.stop_sequence if not tools else None}
        yield _event(
            "message_delta", {"type": "message_delta", "delta": delta, "usage": {"output_tokens": completion}}
        )
        yield _event("message_stop", {"type": "message_stop"})


def provider_for(
    fake: FakeProvider,
    *,
    name: str | None = None,
    models: tuple[str, ...] = (),
    operations: tuple[Operation, ...] = ("chat", "complete", "embed", "models"),
    subjects: tuple[str, ...] = ("*",),
    key_set: bool = True,
) -> Provider:
    """A ``Provider`` row pointing at the fake (not stored anywhere: for egress-level tests)."""
    return Provider(
        name=name or f"fake{fake.kind}",
        kind=fake.kind,
        base_url=fake.base_url,
        models=models,
        operations=operations,
        subjects=subjects,
        key_set=key_set,
    )


@contextmanager
def serve_fake_openai() -> Iterator[FakeOpenAI]:
    fake = FakeOpenAI()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@contextmanager
def serve_fake_anthropic() -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


def _openai_chunk(body: dict[str, Any], kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": kind,
        "created": 0,
        "model": body.get("model"),
        "choices": choices,
    }


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _event(name: str, payload: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(payload)}\n\n"


def _block_start(index: int, block: dict[str, Any]) -> str:
    return _event(
        "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
    )


def _block_delta(index: int, delta: dict[str, Any]) -> str:
    return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: ClassVar[FakeProvider]

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.headers.items()}
        request = Received(self.command, self.path.split("?", 1)[0], headers, body)
        with fake._lock:
            fake.requests.append(request)
            status = fake.fail_first.pop(0) if fake.fail_first else None
        if fake.delay:
            time.sleep(fake.delay)
        if fake.redirect_to is not None:
            self.send_response(307)
            self.send_header("Location", fake.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fake.garbage is not None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(fake.garbage)))
            self.end_headers()
            self.wfile.write(fake.garbage)
            return
        key = fake.key_of(headers)
        if fake.require_key is not None and key != fake.require_key:
            message = f"invalid x-api-key: {key}" if fake.echo_key else "invalid API key"
            self.json(401, fake.error_body(401, message))
            return
        if status is not None:
            message = f"try again later (key {key})" if fake.echo_key else "try again later"
            extra = {"Retry-After": fake.retry_after} if fake.retry_after is not None else {}
            self.json(status, fake.error_body(status, message), extra)
            return
        fake.answer(self, request)

    def json(self, status: int, document: object, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def sse(self, events: Iterator[str]) -> None:
        """Stream the events as a chunked ``text/event-stream``, each flushed as it is written."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        fake = self.fake
        with fake._lock:
            drop = fake.drop_after is not None and (fake.drop_times is None or fake.drop_times > 0)
            if drop and fake.drop_times is not None:
                fake.drop_times -= 1
        try:
            for sent, event in enumerate(events):
                if drop and fake.drop_after is not None and sent >= fake.drop_after:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                data = event.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _handler_class(fake: FakeProvider) -> type[_Handler]:
    return type("FakeHandler", (_Handler,), {"fake": fake})
