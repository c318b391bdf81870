"""The Ollama-compatible API under ``/api``: version, tags, show, generate, chat, ps, delete, pull, blobs
(create, copy, push and the embeddings routes are in ``web/ollama_models.py``).

Field names follow Ollama's API docs (``docs/api.md`` in ollama/ollama) exactly, so Ollama
clients and front ends work unchanged; errors use Ollama's ``{"error": "message"}`` shape.
Only concrete paths are registered: ``/api/v1/...`` belongs to the management API.

Generation streams NDJSON (one JSON object per line) unless ``"stream": false``; the last
object has ``"done": true`` and the counters, durations in nanoseconds. An empty prompt (or
no messages) only loads the model, or unloads it with ``keep_alive`` 0. Chat takes ``tools``
and answers with ``message.tool_calls`` (arguments as an object), a line of its own when
streamed; ``tool`` messages and assistant ``tool_calls`` come back in later turns. A model that
thinks answers with its reasoning apart (``thinking``, ``message.thinking``), and ``think`` turns it
on or off; generate takes ``suffix`` (fill in the middle, for models with FIM tokens) and returns
``context``, the prompt's and answer's token ids, which a later request sends back to continue.
``logprobs`` (and ``top_logprobs``) add each token's logprob to the line that carries its text.
Pull takes a ModelRef or an Ollama name (a local file is imported, the rest downloaded) and goes
through the provisioner's ``ensure_present``, the one pull flow the CLI and ``/api/v1`` use too, on
the thread bridge.
Errors, streamed or not, come from the one mapping in ``web/errors.py``.

Imports: the services (models, provision, engine service), the bridge and the web helpers;
never the store or the cache (blobs arrive through ``ModelService.receive_blob``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
from litestar import MediaType, Request, Response, Router, delete, get, head, post
from litestar.response import Stream
from litestar.serialization import encode_json
from pydantic import BaseModel, ConfigDict, Field

from appliance.audit import Context
from appliance.bridge import ThreadCall
from appliance.engine.base import Finished, ReasoningChunk, TextChunk, ToolCall
from appliance.engine.features import model_capabilities
from appliance.engine.router import Loaded
from appliance.engine.router import Router as EngineRouter
from appliance.engine.service import GenerationOptions, InferenceService
from appliance.engine.tools import offer_tools
from appliance.errors import InvalidInput
from appliance.models.service import Model, ModelService, ModelSummary
from appliance.provision.service import Provisioner, PullProgress, ResolvedModel
from appliance.refs import DigestRef, FileRef, ModelRef, parse_digest
from appliance.settings import Duration, Settings
from appliance.web.bodies import parse_body, refuse_unsupported
from appliance.web.errors import OLLAMA_HANDLERS, ErrorInfo, error_tail, ollama_body
from appliance.web.generation import Events, Generation, named_provider
from appliance.web.lists import CACHED_LIST
from appliance.web.logprobs import ollama_logprobs

__all__ = ["ChatBody", "GenerateBody", "ModelBody", "Options", "PullBody", "ollama_router"]

logger = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
UPLOAD_CHUNK_BYTES = 8 * 1024 * 1024
# Ollama keeps a model "for good" as now + Go's largest time.Duration; its expires_at says so.
_FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)


# -- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    # Ollama clients send fields this appliance ignores; the ones that would change the answer are
    # refused by refuse_unsupported unless they hold a value that asks for nothing.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


# Sampling options llama.cpp has no sampler for, with the values that ask for nothing (tail-free
# sampling left llama.cpp in 2024). Hardware options (num_gpu, num_thread, use_mmap, ...) are the
# appliance's own settings, so those are ignored, as are num_keep (the context never shifts here)
# and penalize_newline (Ollama itself ignores it now).
_UNSUPPORTED_OPTIONS: dict[str, tuple[Any, ...]] = {"tfs_z": (1,)}
_IGNORED_OPTIONS = frozenset(
    {
        "num_gpu",
        "main_gpu",
        "num_thread",
        "num_batch",
        "numa",
        "use_mmap",
        "use_mlock",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "num_keep",
        "penalize_newline",
    }
)
_UNSUPPORTED_GENERATE: dict[str, tuple[Any, ...]] = {"images": ([],), "template": ("",)}
_ROLES = ("system", "user", "assistant", "tool")


class Options(_Body):
    """Ollama's runtime options. The ones the engine honours are checked; sampling options it
    does not implement are refused unless neutral; hardware ones are ignored.

    ``num_ctx`` reloads an idle model with that context (capped at the model's own), as Ollama does.
    """

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    typical_p: float | None = Field(default=None, gt=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=2**31 - 1)  # -1: the whole context
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(default=None, ge=0)
    mirostat_eta: float | None = Field(default=None, ge=0)
    seed: int | None = None  # negative: random, as in Ollama
    num_predict: int | None = Field(default=None, ge=-2)  # -1 and -2: until the context is full
    stop: str | list[str] | None = None
    num_ctx: int | None = Field(default=None, ge=1)


# Options passed to the samplers as they are; unset ones keep the engine's defaults (Ollama's).
_SAMPLING_OPTIONS = (
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
)


class _GenerationBody(_Body):
    model: str = Field(min_length=1)
    stream: bool = True
    # "json" or a JSON schema; checked in generation_options, to say which forms it takes
    format: Annotated[str, Field(json_schema_extra={"enum": ["", "json"]})] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: Duration | None = None
    think: bool | None = None  # the template's reasoning switch; refused for a model that cannot think
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def _refuse_unsupported(self) -> None:
        """Each body refuses the fields of its own that the engine would otherwise ignore."""

    def generation_options(self) -> GenerationOptions:
        self._refuse_unsupported()
        if self.options is not None:
            refuse_unsupported(self.options, _UNSUPPORTED_OPTIONS, where="options.")
            ignored = sorted(_IGNORED_OPTIONS & set(self.options.model_extra or {}))
            if ignored:  # said once per request, in the server's log: the client asked for them
                logger.warning(
                    "ignored Ollama options %s: the appliance's own settings decide these", ", ".join(ignored)
                )
        if isinstance(self.format, str) and self.format not in ("", "json"):
            raise InvalidInput(f'format {self.format!r} is not supported; use "json" or a JSON schema object')
        if self.top_logprobs and not self.logprobs:
            raise InvalidInput("top_logprobs needs logprobs to be true", hint='send "logprobs": true')
        options = self.options or Options()
        stop = (options.stop,) if isinstance(options.stop, str) else tuple(options.stop or ())
        sampling = {
            name: value for name in _SAMPLING_OPTIONS if (value := getattr(options, name)) is not None
        }
        return GenerationOptions(
            max_tokens=options.num_predict if options.num_predict and options.num_predict > 0 else None,
            temperature=options.temperature,  # None: the model's parameter, else the default
            top_p=options.top_p,
            top_k=options.top_k,
            **sampling,
            seed=options.seed if options.seed is not None and options.seed >= 0 else None,
            stop=stop,
            json_mode=self.format == "json",
            json_schema=self.format if isinstance(self.format, dict) else None,
            keep_alive=self.keep_alive,
            context_length=options.num_ctx,
            think=self.think,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


class GenerateBody(_GenerationBody):
    prompt: str = ""
    suffix: str = ""  # fill in the middle: the model writes what goes between prompt and suffix
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None  # an earlier answer's context, to continue from

    def _refuse_unsupported(self) -> None:
        refuse_unsupported(self, _UNSUPPORTED_GENERATE)
        if self.suffix and self.system:
            raise InvalidInput(
                "system cannot be combined with suffix: fill in the middle has no place for a system prompt",
                hint="put what the system prompt says into the prompt, or leave suffix out",
            )

    def generation_options(self) -> GenerationOptions:
        return replace(super().generation_options(), context=tuple(self.context or ()), return_context=True)

    def messages(self) -> list[dict[str, Any]]:
        """The prompt as a chat turn for the model's template (what Ollama does unless raw)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt}]


class ChatMessage(_Body):
    role: str = Field(min_length=1, json_schema_extra={"enum": list(_ROLES)})  # checked in turn()
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    thinking: str | None = None  # an assistant's earlier reasoning

    def turn(self, index: int) -> dict[str, Any]:
        where = f"messages.{index}."
        if self.role not in _ROLES:
            raise InvalidInput(f"{where}role {self.role!r} is not supported; use one of {', '.join(_ROLES)}")
        refuse_unsupported(self, {"images": ([],)}, where=where)
        if self.tool_calls and self.role != "assistant":
            raise InvalidInput(f"{where}tool_calls belong to assistant messages")
        turn = {**self.model_dump(exclude_none=True), "content": self.content or ""}
        thinking = turn.pop("thinking", None)
        if thinking:  # an earlier answer's reasoning, under the name chat templates read
            turn["reasoning_content"] = thinking
        if self.tool_calls:
            turn["tool_calls"] = [
                _template_call(call, where=f"{where}tool_calls.{number}")
                for number, call in enumerate(self.tool_calls)
            ]
        return turn


def _template_call(call: dict[str, Any], *, where: str) -> dict[str, Any]:
    """An earlier call as chat templates read it (Hugging Face's shape, as OpenAI's with an object)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidInput(f'{where} must be {{"function": {{"name": ..., "arguments": {{...}}}}}}')
    arguments = function.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise InvalidInput(f"{where}.function.arguments must be an object")
    call_id = str(call.get("id") or "")
    return {"id": call_id, "type": "function", "function": {"name": function["name"], "arguments": arguments}}


class ChatBody(_GenerationBody):
    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None

    def _refuse_unsupported(self) -> None:
        for index, message in enumerate(self.messages):
            message.turn(index)

    def generation_options(self) -> GenerationOptions:
        return replace(super().generation_options(), tools=offer_tools(self.tools))


class ModelBody(_Body):
    """Show and delete name the model as ``model`` (or ``name``, its older spelling)."""

    model: str | None = None
    name: str | None = None

    @property
    def target(self) -> str:
        target = self.model or self.name
        if not target:
            raise InvalidInput("model is required")
        return target


class PullBody(ModelBody):
    stream: bool = True


# -- what models look like to Ollama -------------------------------------------------------------


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


def _parameter_size(count: int) -> str:
    """Ollama's short parameter count: 7.24B, 115.5M, 116K (three significant digits at most)."""
    for limit, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= limit:
            number = count / limit
            decimals = 0 if number >= 100 else 1 if number >= 10 else 2
            return f"{number:.{decimals}f}{suffix}"
    return str(count)


def _details(capabilities: dict[str, Any], fmt: str) -> dict[str, Any]:
    architecture = str(capabilities.get("architecture", "unknown"))
    return {
        "parent_model": "",
        "format": fmt,
        "family": architecture,
        "families": [architecture],
        "parameter_size": _parameter_size(int(capabilities.get("parameter_count") or 0)),
        "quantization_level": str(capabilities.get("quantization", "unknown")).removeprefix("ALL_"),
    }


def _gguf_artifact_digest(model: Model) -> str:
    artifact = next((a for a in model.artifacts if a.format == "gguf"), model.artifacts[0])
    return artifact.digest


def _model_format(model: Model) -> str:
    return "gguf" if "gguf" in model.formats else model.formats[0]


def _tag_entry(model: ModelSummary) -> dict[str, Any]:
    """A GGUF model (the list holds no other), as ``/api/tags`` shows it."""
    return {
        "name": str(model.name),
        "model": str(model.name),
        "modified_at": model.updated_at,
        "size": model.size_bytes,
        "digest": _hex(model.gguf_digest or ""),
        "details": _details(model.capabilities, "gguf"),
    }


def _model_info(capabilities: dict[str, Any]) -> dict[str, Any]:
    architecture = str(capabilities.get("architecture", "unknown"))
    info: dict[str, Any] = {
        "general.architecture": architecture,
        "general.parameter_count": int(capabilities.get("parameter_count") or 0),
    }
    if capabilities.get("model_name"):
        info["general.name"] = capabilities["model_name"]
    keys = {
        "context_length": "context_length",
        "embedding_length": "embedding_length",
        "block_count": "block_count",
        "head_count": "attention.head_count",
        "head_count_kv": "attention.head_count_kv",
        "vocab_size": "vocab_size",
    }
    for capability, key in keys.items():
        if capabilities.get(capability) is not None:
            info[f"{architecture}.{key}"] = capabilities[capability]
    return info


def _go_value(value: Any) -> str:
    """A parameter as Ollama (Go's %v) prints it: 0 not 0.0, true not True."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _parameter_lines(parameters: dict[str, Any], *, chatml: bool) -> list[str]:
    """A model's parameters as Ollama's show writes them: one ``name value`` line each, one per stop."""
    stops = parameters.get("stop", ())
    stops = [stops] if isinstance(stops, str) else list(stops)
    if chatml and not stops:  # without a template of its own the engine uses ChatML, which stops there
        stops = ["<|im_end|>"]
    lines = [f"{name:<30} {_go_value(value)}" for name, value in parameters.items() if name != "stop"]
    return lines + [f"{'stop':<30} {json.dumps(stop)}" for stop in stops]


def _show(model: Model, models: ModelService) -> dict[str, Any]:
    template = models.chat_template(model)
    capabilities = model_capabilities(template, model.capabilities)
    layers = models.layers(model)
    lines = _parameter_lines(layers.parameters, chatml=not template)
    parameters = "\n".join(lines)
    modelfile = [
        "# Modelfile generated by the appliance",
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {model.name}",
        "",
        f"FROM {models.blob_path(_gguf_artifact_digest(model))}",
    ]
    if template:
        modelfile.append(f'TEMPLATE """{template}"""')
    if layers.system is not None:
        modelfile.append(f'SYSTEM """{layers.system}"""')
    modelfile += [f"PARAMETER {line}" for line in lines]
    shown: dict[str, Any] = {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": parameters,
        "template": template,
        "details": _details(model.capabilities, _model_format(model)),
        "model_info": _model_info(model.capabilities),
        "capabilities": capabilities,
        "modified_at": model.updated_at,
    }
    if layers.system is not None:
        shown["system"] = layers.system
    if layers.license is not None:
        shown["license"] = layers.license
    if layers.messages:
        shown["messages"] = list(layers.messages)
    return shown


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ps_entry(loaded: Loaded) -> dict[str, Any]:
    now = datetime.now(UTC)
    info = loaded.info
    # None: kept for good, or serving a request now
    expires = now + (_FOREVER if info.expires_in is None else timedelta(seconds=info.expires_in))
    return {
        "name": str(loaded.name),
        "model": str(loaded.name),
        "size": info.memory_bytes,
        "digest": _hex(info.digest),
        "details": _details(info.capabilities, "gguf"),
        "expires_at": _rfc3339(expires),
        "size_vram": info.memory_bytes if info.gpu_layers != 0 else 0,
        "context_length": info.context_length,
    }


# -- small endpoints ---------------------------------------------------------------------------


@get("/version", sync_to_thread=False)
def version(settings: Settings) -> dict[str, str]:
    """The Ollama API level these routes implement (``server.ollama_version``): clients gate
    features on it, so it is Ollama's version, not the appliance's."""
    return {"version": settings.server.ollama_version}


@head("/version", sync_to_thread=False)
def version_head() -> Response[None]:
    """A client's check that an Ollama server is there."""
    return Response(None, status_code=200)


@get("/tags", sync_to_thread=True, responses={200: CACHED_LIST})
def tags(models: ModelService) -> Response[bytes]:
    """GGUF models, as ``ollama list`` shows them; the answer is kept until the registry changes."""

    def render(summaries: list[ModelSummary]) -> bytes:
        return encode_json({"models": [_tag_entry(model) for model in summaries]})

    return Response(models.cached_list("ollama.tags", render), media_type=MediaType.JSON)


@head("/tags", sync_to_thread=False)
def tags_head() -> Response[None]:
    """A client's check that the model list answers."""
    return Response(None, status_code=200)


@post("/show", status_code=200)
async def show(request: Request[Any, Any, Any], models: ModelService) -> dict[str, Any]:
    """A model's details, model_info and chat template."""
    body = parse_body(ModelBody, await request.body())
    return await anyio.to_thread.run_sync(lambda: _show(models.get(body.target), models))


@get("/ps", sync_to_thread=False)
def ps(router: EngineRouter) -> dict[str, Any]:
    """Models loaded now."""
    return {"models": [_ps_entry(loaded) for loaded in router.loaded()]}


@delete("/delete", status_code=200)
async def delete_model(
    request: Request[Any, Any, Any], router: EngineRouter, context: Context
) -> Response[bytes]:
    """Remove a model; a loaded copy leaves ps at once and unloads when its requests in flight end."""
    body = parse_body(ModelBody, await request.body())
    await anyio.to_thread.run_sync(lambda: router.remove_model(body.target, context))
    return Response(b"", status_code=200)


# -- generate and chat -------------------------------------------------------------------------


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode() + b"\n"


Piece = Callable[[str, list[ToolCall], str], dict[str, Any]]  # one object's text, tool calls, thinking
Final = Callable[[Finished], dict[str, Any]]  # what the last object adds


def _no_final(finished: Finished) -> dict[str, Any]:
    return {}


async def _ndjson(
    generation: Generation, piece: Piece, final: Final, *, logprobs: bool
) -> AsyncIterator[bytes]:
    """One line per text piece (with its tokens' logprobs when asked), reasoning piece or tool
    call, then the final line with the counters; errors become an error line."""

    async def lines() -> AsyncIterator[bytes]:
        try:
            while not isinstance(event := await generation.next(), Finished):
                if isinstance(event, TextChunk):
                    parts = piece(event.text, [], "")
                elif isinstance(event, ReasoningChunk):
                    parts = piece("", [], event.text)
                else:
                    parts = piece("", [event], "")
                if logprobs and isinstance(event, TextChunk):
                    parts["logprobs"] = ollama_logprobs(event.logprobs)
                yield _line({**parts, "done": False})
            yield _line({**piece("", [], ""), "done": True, **final(event), **generation.counters(event)})
        finally:
            await generation.close()

    async for line in error_tail(lines(), _error_line, where=f"a stream of {generation.model}"):
        yield line


def _error_line(info: ErrorInfo) -> bytes:
    return _line(ollama_body(info))


async def _load_or_unload(
    router: EngineRouter, name: str, keep_alive: float | None, context_length: int | None
) -> str:
    """Ollama's empty request: load the model, or with keep_alive 0 unload it once idle."""

    def run() -> str:
        if keep_alive == 0:
            router.unload_when_idle(name)
            return "unload"
        router.load(name, keep_alive=keep_alive, context_length=context_length)
        return "load"

    return await anyio.to_thread.run_sync(run)


async def _respond(
    events: Events, *, stream: bool, piece: Piece, final: Final, logprobs: bool = False
) -> Response[Any]:
    """Stream NDJSON, or collect the whole text into the final object; ``final`` adds to that object."""
    generation = Generation(events)
    await generation.open()
    if stream:
        return Stream(_ndjson(generation, piece, final, logprobs=logprobs), media_type=NDJSON)
    text, calls, finished = await generation.collect()
    whole = {
        **piece(text, calls, generation.reasoning),
        "done": True,
        **final(finished),
        **generation.counters(finished),
    }
    if logprobs:
        whole["logprobs"] = ollama_logprobs(generation.logprobs)
    return Response(whole)


@post("/generate", status_code=200)
async def generate(
    request: Request[Any, Any, Any], inference: InferenceService, router: EngineRouter, context: Context
) -> Response[Any]:
    """Complete a prompt (through the chat template unless raw, or fill in the middle before a
    suffix); NDJSON unless stream is false. The last object's ``context`` continues from here."""
    body = parse_body(GenerateBody, await request.body())
    options = body.generation_options()

    def piece(text: str, calls: list[ToolCall], thinking: str) -> dict[str, Any]:
        payload = {"model": body.model, "created_at": _rfc3339(datetime.now(UTC)), "response": text}
        return {**payload, "thinking": thinking} if thinking else payload

    if not body.prompt and not body.suffix:
        reason = await _load_or_unload(router, body.model, body.keep_alive, options.context_length)
        return Response({**piece("", [], ""), "done": True, "done_reason": reason})
    if body.suffix:
        # Built with the model's FIM tokens, never the chat template; raw text may write control tokens.
        events = inference.complete(
            body.model,
            body.prompt,
            options,
            endpoint="/api/generate",
            context=context,
            provider=named_provider(request),
            suffix=body.suffix,
            parse_special=body.raw,
        )
    elif body.raw:
        events = inference.complete(
            body.model,
            body.prompt,
            options,
            endpoint="/api/generate",
            context=context,
            provider=named_provider(request),
        )
    else:
        events = inference.chat(
            body.model,
            body.messages(),
            options,
            endpoint="/api/generate",
            context=context,
            provider=named_provider(request),
        )
    return await _respond(
        events,
        stream=body.stream,
        piece=piece,
        final=lambda finished: {"context": list(finished.context)},
        logprobs=body.logprobs,
    )


@post("/chat", status_code=200)
async def chat(
    request: Request[Any, Any, Any], inference: InferenceService, router: EngineRouter, context: Context
) -> Response[Any]:
    """Answer a conversation through the model's chat template; NDJSON unless stream is false."""
    body = parse_body(ChatBody, await request.body())
    options = body.generation_options()

    def piece(text: str, calls: list[ToolCall], thinking: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = [_tool_call(call) for call in calls]
        return {"model": body.model, "created_at": _rfc3339(datetime.now(UTC)), "message": message}

    if not body.messages:
        reason = await _load_or_unload(router, body.model, body.keep_alive, options.context_length)
        return Response({**piece("", [], ""), "done": True, "done_reason": reason})
    messages = [message.turn(index) for index, message in enumerate(body.messages)]
    events = inference.chat(
        body.model,
        messages,
        options,
        endpoint="/api/chat",
        context=context,
        provider=named_provider(request),
    )
    return await _respond(events, stream=body.stream, piece=piece, final=_no_final, logprobs=body.logprobs)


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "function": {"name": call.name, "arguments": call.arguments}}


# -- pull --------------------------------------------------------------------------------------


def _pull_ref(provisioner: Provisioner, text: str) -> ModelRef:
    """The ModelRef a pull names: a local file, a network ref, or an Ollama name on the Ollama registry."""
    ref = provisioner.parse_ref(text)
    if isinstance(ref, DigestRef):
        raise InvalidInput(
            f"{text!r} names a blob, not a file; pull takes a file (/abs/x.gguf) or a URL (https://host/x.gguf)"
        )
    return ref


@post("/pull", status_code=200)
async def pull(request: Request[Any, Any, Any], provisioner: Provisioner, context: Context) -> Response[Any]:
    """Pull a ModelRef or an Ollama name: a local file is imported, the rest downloaded; NDJSON
    progress unless stream is false."""
    body = parse_body(PullBody, await request.body())
    # plain HTTP is the setting's to allow (models.download.oci_plain_http), not a request's
    refuse_unsupported(body, {"insecure": (False,)})
    ref = _pull_ref(provisioner, body.target)
    call: ThreadCall[PullProgress, ResolvedModel] = ThreadCall(
        # the text, not the ref: a model pulled by Ollama name keeps that name
        lambda report, _: provisioner.ensure_present(body.target, context, on_progress=report)
    )
    if not body.stream:
        await call.result()
        return Response({"status": "success"})
    await call.ready()  # a refused ref fails the request before any stream starts
    if isinstance(ref, FileRef):
        try:
            total: int | None = ref.path.stat().st_size
        except OSError:
            total = None
        head: dict[str, Any] = {"status": "importing", "total": total, "completed": 0}
        closing: tuple[str, ...] = ()
    else:
        head, closing = {"status": "pulling manifest"}, ("verifying sha256 digest",)

    async def lines() -> AsyncIterator[bytes]:
        yield _line(head)
        async for update in call:
            line = _download_line(update)
            if line is not None:
                yield _line(line)
        await call.result()
        for status in (*closing, "success"):
            yield _line({"status": status})

    return Stream(error_tail(lines(), _error_line, where=f"a pull of {ref}"), media_type=NDJSON)


def _download_line(update: PullProgress) -> dict[str, Any] | None:
    if update.state == "importing":
        return {"status": "importing", "total": update.bytes_total, "completed": update.bytes_done}
    if update.state == "pending":
        return {"status": f"waiting for an admin to approve download {update.download_id}"}
    if update.state == "queued":
        return {"status": f"download {update.download_id} waits for a free download slot"}
    if update.state == "running":
        total, done = update.bytes_total, update.bytes_done
        return {
            "status": f"pulling {update.download_id}",
            "digest": update.download_id,
            "total": total,
            "completed": done,
        }
    return None


# -- blobs -------------------------------------------------------------------------------------


def _blob_digest(text: str) -> str:
    """Ollama writes digests as sha256:HEX in the path (newer clients also sha256-HEX)."""
    return parse_digest(text.replace("-", ":", 1) if text.lower().startswith("sha256-") else text)


@head("/blobs/{digest:str}")
async def blob_exists(digest: str, models: ModelService) -> Response[None]:
    """200 when the blob is in the cache, else 404."""
    present = models.has_blob(_blob_digest(digest))
    return Response(None, status_code=200 if present else 404, media_type=MediaType.TEXT)


@post("/blobs/{digest:str}", request_max_body_size=None)
async def create_blob(digest: str, request: Request[Any, Any, Any], models: ModelService) -> Response[bytes]:
    """Receive a file into the cache under its digest: 201, or 400 when the body hashes otherwise.

    Nothing partial or unverified is ever visible in ``blobs/``. The blob is not a model by
    itself: ``appliance models gc`` removes it unless a model comes to use it.
    """
    expected = _blob_digest(digest)
    if models.has_blob(expected):
        return Response(b"", status_code=200)
    with models.receive_blob() as incoming:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= UPLOAD_CHUNK_BYTES:
                await anyio.to_thread.run_sync(incoming.write, bytes(pending))
                pending.clear()
        await anyio.to_thread.run_sync(incoming.write, bytes(pending))
        await anyio.to_thread.run_sync(incoming.finish, expected)
    return Response(b"", status_code=201)


ollama_router = Router(
    path="/api",
    route_handlers=[
        version,
        version_head,
        tags,
        tags_head,
        show,
        ps,
        delete_model,
        generate,
        chat,
        pull,
        blob_exists,
        create_blob,
    ],
    exception_handlers=OLLAMA_HANDLERS,
    tags=["ollama"],
)
