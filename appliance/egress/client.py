"""``Egress``: the one place a call to an external provider is made (REQ-MODELS-0119, 0124, 0125).

Every call (``chat``, ``complete``, ``embed``, ``probe``) goes through the same steps:

1. admission: refused with ``Offline`` when offline is on (setting or preference), with
   ``EgressDenied`` when the caller matches none of the provider's ``subjects`` or the operation
   is not among its ``operations`` (``probe`` is the appliance's own check: offline only);
2. the request for the provider's kind (``adapters``; a field it cannot honour is refused) and its
   key (``KeySource``; a provider without one is called without, as a LAN server wants);
3. one shared ``httpx.AsyncClient`` (``egress.*`` timeouts, no redirects followed, HTTP/1.1);
   429, 5xx, a refused connection or a stream that broke off are tried again (``egress.retries``
   more times, waits of 0.5 s doubling up to ``egress.retry_max_wait``, or the provider's
   Retry-After) until the first piece of the answer is passed on; after that a break is an error;
4. the answer streamed as engine events: ``Ready`` (tool format "native"), text, reasoning and
   tool calls as they come, ``Finished`` with the provider's token counts;
5. every configured provider's key scrubbed from all text that leaves (``scrub``), across chunks;
6. whatever the outcome, one audit row (``egress.call``: operation, model, HTTP status, outcome,
   attempts, tokens, task; never a prompt, an answer or a key), one log line on
   ``appliance.egress`` and the ``appliance_egress_*`` metrics.

``reachable(provider)`` answers from the last probe, probing again in the background once it is
older than ``egress.probe_every`` (the first call waits up to 2 s for it).

Imports: settings, errors, audit, identity, metrics, preferences, the store, engine events and
the egress modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.to_thread
import httpx

from appliance.audit import AuditNote, Context, record
from appliance.egress import adapters
from appliance.egress.scrub import HeldText, Scrubber
from appliance.egress.streams import (
    AnthropicStream,
    OpenAIStream,
    StreamBroken,
    StreamError,
    error_message,
    model_ids,
    read_events,
)
from appliance.egress.types import ExternalEvent, ExternalRequest, Operation, Provider, ProviderDirectory
from appliance.engine.base import Embeddings, Ready, ReasoningChunk, TextChunk, ToolCall
from appliance.errors import (
    ApplianceError,
    EgressDenied,
    Offline,
    ProviderFailed,
    ProviderKeyUnreadable,
    ProviderUnsupported,
)
from appliance.identity import Actor
from appliance.metrics import Metrics
from appliance.preferences import OFFLINE, PreferenceService
from appliance.settings import Settings
from appliance.store.base import Store

__all__ = ["Egress", "KeySource", "ProbeResult", "subject_allowed"]

log = logging.getLogger("appliance.egress")

FIRST_PROBE_WAIT = 2.0  # seconds reachable() waits for a provider's first probe
PROBE_READ_TIMEOUT = 10.0  # a model list comes at once, or the provider is not well
_ERROR_BODY_LIMIT = 64 * 1024


class KeySource(Protocol):
    """Where the egress reads a provider's key (``ProviderService``); nothing else may."""

    def key(self, name: str) -> str | None: ...


@dataclass(frozen=True)
class ProbeResult:
    """What a provider's model list said: reachable with its key (``ok``), or why not."""

    ok: bool
    status: int | None  # the HTTP status; None when it was not reached
    models: list[str]
    seconds: float
    error: str | None = None


def subject_allowed(subjects: tuple[str, ...], who: Actor) -> bool:
    """Whether ``who`` matches one of a provider's subjects: ``*``, ``role:R``, ``user:NAME``,
    ``key:NAME`` or ``task``. A task's job matches only ``task`` (or ``*``), whatever its role."""
    for subject in subjects:
        if subject == "*" or (subject == "task" and who.kind == "task"):
            return True
        if who.kind == "task":
            continue
        kind, _, value = subject.partition(":")
        if (kind == "role" and who.role == value) or (
            kind in ("user", "key") and who.kind == kind and who.id == value
        ):
            return True
    return False


@dataclass
class _Call:
    """One call as its log line, audit row and metrics tell it."""

    provider: Provider
    operation: Operation
    model: str
    context: Context
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    outcome: str = "ok"
    attempts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    error: str | None = None  # the error's code
    reason: str | None = None  # what went wrong, in our words (a provider's message may quote a prompt)

    def failed(self, exc: BaseException) -> None:
        outcomes = {Offline: "offline", EgressDenied: "denied", ProviderUnsupported: "unsupported"}
        if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
            self.outcome = "cancelled"
            return
        self.outcome = next((name for kind, name in outcomes.items() if isinstance(exc, kind)), "failed")
        self.error = exc.code if isinstance(exc, ApplianceError) else "internal_error"
        self.reason = _summary(exc) if isinstance(exc, ProviderFailed) else str(exc)

    def detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "operation": self.operation,
            "model": self.model,
            "status": self.status,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
        }
        if self.context.who.kind == "task":
            detail["task"] = self.context.who.id
        if self.error is not None:
            detail.update(error=self.error, reason=self.reason)
        return detail


class _Failure(Exception):
    """An attempt that failed: the error to raise, and whether another try may do better."""

    def __init__(self, error: ProviderFailed, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after


class Egress:
    def __init__(
        self,
        settings: Settings,
        keys: KeySource,
        *,
        store: Store,
        metrics: Metrics,
        preferences: PreferenceService,
        directory: ProviderDirectory | None = None,
    ) -> None:
        self.options = settings.egress
        self.keys = keys
        self.store = store
        self.metrics = metrics
        self.preferences = preferences
        self.directory = directory  # every provider, for scrubbing all their keys
        # One client per event loop (the server has one; each CLI asyncio.run another); a keeper
        # task closes it on that loop when the loop ends or ``close`` is called.
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._lock = threading.Lock()  # guards the probe cache and the probes in flight
        # name -> (when, the provider's updated_at then, result): a changed provider is probed afresh
        self._probed: dict[str, tuple[float, str, ProbeResult]] = {}
        self._probing: dict[str, threading.Thread] = {}

    # the calls

    def chat(
        self, provider: Provider, request: ExternalRequest, *, context: Context
    ) -> AsyncGenerator[ExternalEvent]:
        return self._generate(provider, "chat", request, context=context)

    def complete(
        self, provider: Provider, request: ExternalRequest, *, context: Context
    ) -> AsyncGenerator[ExternalEvent]:
        return self._generate(provider, "complete", request, context=context)

    async def embed(
        self, provider: Provider, model: str, texts: list[str], *, context: Context
    ) -> Embeddings:
        call = _Call(provider, "embed", model, context)
        try:
            key, scrubber = await anyio.to_thread.run_sync(lambda: self._admit(call))
            outbound = adapters.embed_request(provider, model, texts)
            while True:
                call.attempts += 1
                try:
                    async with self._response(call, outbound, key, scrubber) as response:
                        document = (await response.aread()).decode()
                    break
                except (_Failure, httpx.TransportError) as exc:
                    await self._again_or_raise(call, exc, scrubber, answered=False)
            vectors, tokens = _embeddings(provider, document)
            call.tokens_in = tokens
            return Embeddings(vectors=vectors, tokens=tokens, reason=f"external provider {provider.name}")
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            await self._settle_async(call)

    async def probe(self, provider: Provider, *, context: Context) -> ProbeResult:
        """GET the provider's model list with its key (one try); Offline when offline. The
        result also answers ``reachable`` until it is ``egress.probe_every`` old."""
        call = _Call(provider, "models", "", context)
        try:
            key, scrubber = await anyio.to_thread.run_sync(lambda: self._admit(call, allow_lists=False))
            result = await self._probe_with(self._client(), call, key, scrubber)
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            await self._settle_async(call)
        with self._lock:
            self._probed[provider.name] = (time.monotonic(), provider.updated_at, result)
        return result

    def reachable(self, provider: Provider) -> bool:
        """Whether the provider's last probe got its model list; never when offline."""
        if self.preferences.effective(OFFLINE):
            return False
        with self._lock:
            seen = self._last_probe(provider)
            if seen is not None and time.monotonic() - seen[0] < self.options.probe_every:
                return seen[1].ok
            thread = self._probing.get(provider.name)
            if thread is None:
                thread = threading.Thread(
                    target=self._probe_in_background,
                    args=(provider,),
                    name=f"probe {provider.name}",
                    daemon=True,
                )
                self._probing[provider.name] = thread
                thread.start()
        if seen is None:  # nothing known of the provider as it is now: wait a little for its answer
            thread.join(FIRST_PROBE_WAIT)
            with self._lock:
                seen = self._last_probe(provider)
        return seen is not None and seen[1].ok

    def close(self) -> None:
        """Close the shared client (on its loop, once that loop runs again)."""
        keeper, loop = self._keeper, self._loop
        self._http = self._keeper = self._loop = None
        if keeper is None or loop is None or loop.is_closed() or keeper.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            keeper.cancel()
        else:
            loop.call_soon_threadsafe(keeper.cancel)

    # one streamed generation

    async def _generate(
        self, provider: Provider, operation: Operation, request: ExternalRequest, *, context: Context
    ) -> AsyncGenerator[ExternalEvent]:
        call = _Call(provider, operation, request.model, context)
        try:
            key, scrubber = await anyio.to_thread.run_sync(lambda: self._admit(call))
            build = adapters.chat_request if operation == "chat" else adapters.complete_request
            outbound = build(provider, request)
            ready = answered = False
            while True:
                call.attempts += 1
                decoder = AnthropicStream() if provider.kind == "anthropic" else OpenAIStream()
                text, reasoning = HeldText(scrubber), HeldText(scrubber)
                try:
                    async with self._response(call, outbound, key, scrubber) as response:
                        if not ready:
                            ready = True
                            yield Ready(f"external provider {provider.name}", 0, 0, tool_format="native")
                        async for name, data in read_events(response.aiter_lines()):
                            for event in decoder.feed(name, data):
                                for out in _scrubbed(event, scrubber, text, reasoning):
                                    answered = True
                                    yield out
                            call.tokens_in = decoder.usage.prompt_tokens
                            call.tokens_out = decoder.usage.completion_tokens
                        finished = decoder.finish()
                    break
                except (_Failure, StreamBroken, StreamError, httpx.TransportError) as exc:
                    await self._again_or_raise(call, exc, scrubber, answered=answered)
            for out in _flushed(text, reasoning):
                yield out
            yield finished
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            await self._settle_async(call)

    # admission, sending, retrying

    def _admit(self, call: _Call, *, allow_lists: bool = True) -> tuple[str | None, Scrubber]:
        """Check offline and the allow-lists; the provider's key, and a scrubber of every key."""
        provider, who = call.provider, call.context.who
        if self.preferences.effective(OFFLINE):
            raise Offline(
                f"offline: no call to provider {provider.name}",
                hint="unset offline (APPLIANCE_OFFLINE, --offline or the preference) to reach providers",
            )
        if allow_lists and not subject_allowed(provider.subjects, who):
            raise EgressDenied(
                f"provider {provider.name} takes no calls for {who.label} "
                f"(its subjects: {', '.join(provider.subjects) or 'none'})"
            )
        if allow_lists and call.operation not in provider.operations:
            raise EgressDenied(
                f"provider {provider.name} does not allow {call.operation} "
                f"(its operations: {', '.join(provider.operations) or 'none'})"
            )
        key = self.keys.key(provider.name)
        return key, Scrubber([key, *self._other_keys(provider)])

    def _other_keys(self, provider: Provider) -> list[str]:
        found: list[str] = []
        for other in self.directory.list() if self.directory is not None else ():
            if other.name == provider.name or not other.key_set:
                continue
            try:
                key = self.keys.key(other.name)
            except ProviderKeyUnreadable:
                continue  # never sent anywhere, so it cannot come back
            if key:
                found.append(key)
        return found

    @asynccontextmanager
    async def _response(
        self, call: _Call, outbound: adapters.Outbound, key: str | None, scrubber: Scrubber
    ) -> AsyncIterator[httpx.Response]:
        """The provider's 200 response, open for reading; any other answer is a ``_Failure``."""
        client = self._client()
        request = client.build_request(
            outbound.method, outbound.url, json=outbound.body, headers=adapters.headers(call.provider, key)
        )
        response = await client.send(request, stream=True)
        try:
            call.status = response.status_code
            if response.status_code != 200:
                raise await _refusal(call, response, scrubber, keyed=key is not None)
            yield response
        finally:
            await response.aclose()

    async def _again_or_raise(
        self, call: _Call, exc: Exception, scrubber: Scrubber, *, answered: bool
    ) -> None:
        """Wait before the next try, or raise the call's ProviderFailed when it gets none."""
        failure = exc if isinstance(exc, _Failure) else _broken(call, exc, scrubber)
        wait = min(0.5 * 2 ** (call.attempts - 1), self.options.retry_max_wait)
        if failure.retry_after is not None:
            wait = failure.retry_after
        out_of_time = wait > self.options.retry_max_wait
        if answered or not failure.retryable or call.attempts > self.options.retries or out_of_time:
            raise failure.error from exc
        await asyncio.sleep(wait)

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._http is None or self._loop is not loop:
            self._http, self._loop = self._new_client(), loop
            self._keeper = loop.create_task(_keep(self._http))
        return self._http

    def _new_client(self, *, read: float | None = None) -> httpx.AsyncClient:
        timeout = httpx.Timeout(
            self.options.connect_timeout,
            read=read or self.options.read_timeout,
            connect=self.options.connect_timeout,
        )
        # http2 off: httpx's default; redirects off, so a key never follows one to another host.
        return httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    # probes

    async def _probe_with(
        self, client: httpx.AsyncClient, call: _Call, key: str | None, scrubber: Scrubber
    ) -> ProbeResult:
        outbound = adapters.models_request(call.provider)
        call.attempts = 1
        try:
            request = client.build_request(
                outbound.method,
                outbound.url,
                headers=adapters.headers(call.provider, key),
                timeout=httpx.Timeout(self.options.connect_timeout, read=PROBE_READ_TIMEOUT),
            )
            response = await client.send(request)
        except httpx.TransportError as exc:
            failure = _broken(call, exc, scrubber)
            return self._probed_failure(call, failure.error)
        call.status = response.status_code
        if response.status_code != 200:
            failure = await _refusal(call, response, scrubber, keyed=key is not None)
            return self._probed_failure(call, failure.error)
        models = [scrubber.text(model) for model in model_ids(response.content)]
        return ProbeResult(True, 200, models, time.monotonic() - call.started)

    def _last_probe(self, provider: Provider) -> tuple[float, ProbeResult] | None:
        """When the provider as it is now (same key, same URL) was last probed, and what it said."""
        seen = self._probed.get(provider.name)
        return (seen[0], seen[2]) if seen is not None and seen[1] == provider.updated_at else None

    def _probed_failure(self, call: _Call, error: ProviderFailed) -> ProbeResult:
        call.outcome, call.error, call.reason = "failed", error.code, _summary(error)
        return ProbeResult(False, call.status, [], time.monotonic() - call.started, str(error))

    def _probe_in_background(self, provider: Provider) -> None:
        """Probe on a thread of its own, with a client of its own (no caller's loop is needed)."""
        call = _Call(provider, "models", "", Context(Actor(id="readiness", kind="server")))

        async def run() -> ProbeResult:
            key, scrubber = self._admit(call, allow_lists=False)
            async with self._new_client(read=PROBE_READ_TIMEOUT) as client:
                return await self._probe_with(client, call, key, scrubber)

        try:
            result = asyncio.run(run())
        except Exception as exc:  # a thread has nobody to raise to: the result says why
            call.failed(exc)
            result = ProbeResult(False, None, [], time.monotonic() - call.started, str(exc))
        with self._lock:
            before = self._probed.get(provider.name)
            self._probed[provider.name] = (time.monotonic(), provider.updated_at, result)
            self._probing.pop(provider.name, None)
        changed = before is None or before[2].ok != result.ok
        self._settle(call, audit=False, level=logging.INFO if changed else logging.DEBUG)

    # the record of a call

    async def _settle_async(self, call: _Call) -> None:
        with anyio.CancelScope(shield=True):  # a client that hung up still gets its call recorded
            await anyio.to_thread.run_sync(lambda: self._settle(call))

    def _settle(self, call: _Call, *, audit: bool = True, level: int = logging.INFO) -> None:
        seconds = time.monotonic() - call.started
        detail = call.detail()
        provider = call.provider.name
        if audit:
            note = AuditNote(
                target=provider, outcome="ok" if call.outcome == "ok" else "error", detail=detail
            )
            record(
                self.store, call.context, action="egress.call", note=note, duration_ms=round(seconds * 1000)
            )
        self.metrics.observe_egress(
            provider=provider,
            operation=call.operation,
            outcome=call.outcome,
            seconds=seconds,
            subject=call.context.actor,
            tokens_in=call.tokens_in,
            tokens_out=call.tokens_out,
        )
        fields = " ".join(f"{name}={value}" for name, value in detail.items() if value is not None)
        log.log(
            level,
            "egress.call provider=%s subject=%s %s seconds=%.3f",
            provider,
            call.context.actor,
            fields,
            seconds,
        )


async def _keep(http: httpx.AsyncClient) -> None:
    """Hold the client open until cancelled (``close``, or its loop ending), then close it there."""
    try:
        await asyncio.Event().wait()
    finally:
        await http.aclose()


async def _refusal(call: _Call, response: httpx.Response, scrubber: Scrubber, *, keyed: bool) -> _Failure:
    """A provider's answer other than 200 as the failure it is (its message scrubbed)."""
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > _ERROR_BODY_LIMIT:
            break
    name, status = call.provider.name, response.status_code
    said = scrubber.text(error_message(body)) if body else ""
    message = f"provider {name} answered {status}" + (f": {said}" if said else "")
    if 300 <= status < 400:
        location = scrubber.text(response.headers.get("location", "elsewhere"))
        return _Failure(
            ProviderFailed(
                f"provider {name} answered {status}: a redirect to {location}, which is not followed",
                hint="set the provider's base URL to where it redirects: "
                f"`appliance providers set {name} --base-url URL`",
            ),
            retryable=False,
        )
    if status in (401, 403):
        fix = "set it again" if keyed else "it has none: set one"
        return _Failure(
            ProviderFailed(
                message,
                hint=f"the provider refused its key ({fix}): `appliance providers set {name} --key-stdin`",
            ),
            retryable=False,
        )
    retry_after = _seconds(response.headers.get("retry-after"))
    retryable = status == 429 or status >= 500
    return _Failure(
        ProviderFailed(message, retry_after=round(retry_after) if retry_after is not None else None),
        retryable=retryable,
        retry_after=retry_after,
    )


def _broken(call: _Call, exc: Exception, scrubber: Scrubber) -> _Failure:
    """A failed exchange without a status: not reached, too slow, or an answer that broke off."""
    name = call.provider.name
    detail = scrubber.text(str(exc) or type(exc).__name__)
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        where = scrubber.text(call.provider.base_url)
        return _Failure(ProviderFailed(f"cannot reach provider {name} at {where}: {detail}"), retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        return _Failure(ProviderFailed(f"provider {name} timed out: {detail}"), retryable=False)
    if isinstance(exc, StreamError):
        return _Failure(
            ProviderFailed(f"provider {name} reported an error: {detail}"), retryable=exc.retryable
        )
    return _Failure(ProviderFailed(f"provider {name}'s answer broke off: {detail}"), retryable=True)


def _summary(error: ProviderFailed) -> str:
    """Its message up to what the provider said (which may quote a prompt): for the audit row."""
    return str(error).split(": ", 1)[0]


def _seconds(value: str | None) -> float | None:
    """Retry-After in seconds (an HTTP date is not worth honouring here: backoff applies)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _scrubbed(
    event: TextChunk | ReasoningChunk | ToolCall, scrubber: Scrubber, text: HeldText, reasoning: HeldText
) -> list[ExternalEvent]:
    """The event as it may leave: text through its channel's hold, a tool call scrubbed whole."""
    if isinstance(event, TextChunk):
        out: list[ExternalEvent] = [ReasoningChunk(rest) for rest in [reasoning.flush()] if rest]
        passed = text.feed(event.text)
        return [*out, TextChunk(passed)] if passed else out
    if isinstance(event, ReasoningChunk):
        passed = reasoning.feed(event.text)
        return [ReasoningChunk(passed)] if passed else []
    held = _flushed(text, reasoning)
    name, call_id = scrubber.text(event.name), scrubber.text(event.id)
    return [*held, ToolCall(id=call_id, name=name, arguments=scrubber.value(event.arguments))]


def _flushed(text: HeldText, reasoning: HeldText) -> list[ExternalEvent]:
    out: list[ExternalEvent] = []
    if rest := reasoning.flush():
        out.append(ReasoningChunk(rest))
    if rest := text.flush():
        out.append(TextChunk(rest))
    return out


def _embeddings(provider: Provider, document: str) -> tuple[list[list[float]], int]:
    try:
        parsed = json.loads(document)
        rows = sorted(parsed["data"], key=lambda row: row.get("index", 0))
        vectors = [[float(value) for value in row["embedding"]] for row in rows]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProviderFailed(
            f"provider {provider.name} answered embeddings that are not a list of vectors"
        ) from exc
    usage = parsed.get("usage") or {}
    return vectors, int(usage.get("prompt_tokens") or 0)
