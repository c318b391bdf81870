"""Ollama's model-making routes under ``/api``: create, copy, push, and the embeddings routes.

``/api/create`` makes a model from a GGUF already uploaded through ``/api/blobs`` (``files``)
or from another model (``from``), with Ollama's ``template`` (Jinja here), ``system``,
``parameters``, ``messages`` and ``license``; ``quantize`` and ``adapters`` are refused (this
appliance neither quantizes nor applies adapters). ``/api/copy`` registers a second name for the
same blobs. ``/api/push`` sends a model to an OCI registry in Ollama's layout. Create and push
stream NDJSON status lines unless ``"stream": false``, as Ollama does. ``/api/embed`` (normalized
vectors, ``truncate``, ``dimensions``) and the older ``/api/embeddings`` run on the same engine
path as ``/v1/embeddings``. Errors use Ollama's shape, from the one mapping in ``web/errors.py``.

Imports: the services (models' creator, provision, engine service), the bridge and the web
helpers, Ollama's body types from ``web/ollama.py``; never the store or the cache.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio.to_thread
from litestar import Request, Response, Router, post
from litestar.response import Stream
from pydantic import Field

from appliance.audit import Context
from appliance.bridge import ThreadCall
from appliance.engine.service import InferenceService
from appliance.models.create import ModelCreator, NewLayers
from appliance.models.service import Model
from appliance.provision.push import PushProgress
from appliance.provision.service import Provisioner
from appliance.refs import OciRef
from appliance.settings import Duration
from appliance.web.bodies import parse_body, refuse_unsupported
from appliance.web.errors import OLLAMA_HANDLERS, error_tail
from appliance.web.generation import named_provider
from appliance.web.ollama import NDJSON, ModelBody, Options, _Body, _error_line, _line

__all__ = ["CopyBody", "CreateBody", "EmbedBody", "EmbeddingsBody", "PushBody", "ollama_models_router"]

P = TypeVar("P")
_UNSUPPORTED_CREATE: dict[str, tuple[Any, ...]] = {
    "quantize": ("",),
    "quantization": ("",),
    "adapters": ({},),
    "modelfile": ("",),
}


class CreateBody(ModelBody):
    from_: str | None = Field(default=None, alias="from")
    files: dict[str, str] | None = None
    template: str | None = None
    system: str | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    license: str | list[str] | None = None
    stream: bool = True

    def layers(self) -> NewLayers:
        """The layers asked for; what no create can honour is refused by name first."""
        refuse_unsupported(self, _UNSUPPORTED_CREATE)
        return NewLayers(
            template=self.template,
            system=self.system,
            messages=self.messages,
            parameters=self.parameters,
            license=self.license,
        )


class CopyBody(_Body):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1)


class PushBody(ModelBody):
    insecure: bool = False
    stream: bool = True


class EmbedBody(_Body):
    model: str = Field(min_length=1)
    input: str | list[str] = Field(default_factory=list)
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    keep_alive: Duration | None = None
    options: Options | None = None  # of these, num_ctx is what an embedding uses

    def inputs(self) -> list[str]:
        """Ollama's empty input only loads the model."""
        if isinstance(self.input, str):
            return [self.input] if self.input else []
        return self.input


class EmbeddingsBody(_Body):
    model: str = Field(min_length=1)
    prompt: str = ""
    keep_alive: Duration | None = None
    options: Options | None = None


async def _progress(
    call: ThreadCall[P, Any], line: Callable[[P], dict[str, Any]], *, stream: bool, where: str
) -> Response[Any]:
    """Ollama's status lines, then success; only the outcome unless streamed."""
    if not stream:
        await call.result()
        return Response({"status": "success"})
    await call.ready()  # a refused request fails before any stream starts

    async def lines() -> AsyncIterator[bytes]:
        async for update in call:
            yield _line(line(update))
        await call.result()
        yield _line({"status": "success"})

    return Stream(error_tail(lines(), _error_line, where=where), media_type=NDJSON)


@post("/create", status_code=200)
async def create(request: Request[Any, Any, Any], creator: ModelCreator, context: Context) -> Response[Any]:
    """Make a model from uploaded blobs or another model; NDJSON status unless stream is false."""
    body = parse_body(CreateBody, await request.body())
    layers = body.layers()
    name = body.target
    call: ThreadCall[str, Model] = ThreadCall(
        lambda report, _: creator.create(
            name, context, files=body.files, base=body.from_, layers=layers, on_status=report
        )
    )
    return await _progress(
        call, lambda status: {"status": status}, stream=body.stream, where=f"a create of {name}"
    )


@post("/copy", status_code=200)
async def copy(request: Request[Any, Any, Any], creator: ModelCreator, context: Context) -> Response[bytes]:
    """A second name for a model; its blobs are shared."""
    body = parse_body(CopyBody, await request.body())
    await anyio.to_thread.run_sync(lambda: creator.copy(body.source, body.destination, context))
    return Response(b"", status_code=200)


def _push_line(update: PushProgress) -> dict[str, Any]:
    fields = {"digest": update.digest, "total": update.total, "completed": update.completed}
    return {"status": update.status, **{key: value for key, value in fields.items() if value is not None}}


@post("/push", status_code=200)
async def push(request: Request[Any, Any, Any], provisioner: Provisioner, context: Context) -> Response[Any]:
    """Push a model to an OCI registry in Ollama's layout; NDJSON progress unless stream is false."""
    body = parse_body(PushBody, await request.body())
    name = body.target
    call: ThreadCall[PushProgress, OciRef] = ThreadCall(
        lambda report, _: provisioner.pusher.push(name, context, insecure=body.insecure, on_progress=report)
    )
    return await _progress(call, _push_line, stream=body.stream, where=f"a push of {name}")


@post("/embed", status_code=200)
async def embed(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> dict[str, Any]:
    """Unit-length embeddings of a text or a list of texts."""
    body = parse_body(EmbedBody, await request.body())
    started = time.monotonic_ns()
    vectors, tokens, _, _ = await inference.embed(
        body.model,
        body.inputs(),
        keep_alive=body.keep_alive,
        endpoint="/api/embed",
        context=context,
        provider=named_provider(request),
        truncate=body.truncate,
        normalize=True,
        dimensions=body.dimensions,
        context_length=body.options.num_ctx if body.options is not None else None,
    )
    return {
        "model": body.model,
        "embeddings": vectors,
        "total_duration": time.monotonic_ns() - started,
        "prompt_eval_count": tokens,
    }


@post("/embeddings", status_code=200)
async def embeddings(
    request: Request[Any, Any, Any], inference: InferenceService, context: Context
) -> dict[str, Any]:
    """Ollama's older route: one prompt, its embedding as the model makes it (not normalized)."""
    body = parse_body(EmbeddingsBody, await request.body())
    vectors, _, _, _ = await inference.embed(
        body.model,
        [body.prompt] if body.prompt else [],
        keep_alive=body.keep_alive,
        endpoint="/api/embeddings",
        context=context,
        provider=named_provider(request),
        context_length=body.options.num_ctx if body.options is not None else None,
    )
    return {"embedding": vectors[0] if vectors else []}


ollama_models_router = Router(
    path="/api",
    route_handlers=[create, copy, push, embed, embeddings],
    exception_handlers=OLLAMA_HANDLERS,
    tags=["ollama"],
)
