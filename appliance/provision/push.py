"""Push: a model into an OCI registry in Ollama's manifest layout, so ``ollama pull`` (and this
appliance's ``pull``) can fetch it back by name.

    name ─► registry, repository, tag (an Ollama name: [host/][namespace/]model[:tag], the host
            defaulting to models.download.ollama_registry) ─► policy (offline, allow/deny, as a pull)
         ─► each blob: HEAD, else POST an upload and PUT the bytes (monolithic, streamed from the cache)
         ─► the config blob ─► the manifest (Docker schema 2, as Ollama writes it)

The GGUF is the ``application/vnd.ollama.image.model`` layer; the model's Ollama layers
(``models/layers.py``) follow with their media types, each titled with its name so an appliance
pulling it takes them too. Plain HTTP only to registries in ``models.download.oci_plain_http``,
or with ``insecure`` to a registry on loopback. Every push is audited.

May import: audit, errors, names, refs, settings, models (registry service and layers), and the
provision package's OCI client pieces and policy.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.audit import Context, audited
from appliance.errors import InvalidInput, ModelNotFound, PushFailed
from appliance.models.layers import LAYERS, MEDIA_TYPE
from appliance.models.service import Model, ModelService
from appliance.names import ModelName
from appliance.provision.oci import OLLAMA_MODEL_LAYER, TITLE, RegistryAuth, registry_base
from appliance.provision.policy import SourcePolicy
from appliance.refs import OLLAMA_NAMESPACE, OciRef, parse_ollama_name
from appliance.settings import Settings, is_loopback_host

__all__ = ["PushProgress", "Pusher"]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class PushProgress:
    """Ollama's push status line: a step, or a blob's bytes sent so far."""

    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None


@dataclass(frozen=True)
class _Blob:
    media_type: str
    digest: str
    size: int
    title: str | None
    path: Path | None = None  # in the cache; None for content held in memory (the config)
    content: bytes | None = None


class Pusher:
    def __init__(
        self,
        settings: Settings,
        models: ModelService,
        *,
        policy: Callable[[], SourcePolicy],
        new_client: Callable[[], httpx.Client],
    ) -> None:
        self.settings = settings
        self.models = models
        self.policy = policy
        self.new_client = new_client

    def target(self, name: str) -> OciRef:
        """Where an Ollama name pushes to."""
        return parse_ollama_name(name, registry=self.settings.models.download.ollama_registry)

    def push(
        self,
        name: str,
        context: Context,
        *,
        insecure: bool = False,
        on_progress: Callable[[PushProgress], None] = lambda _: None,
    ) -> OciRef:
        """Push the local model ``name`` stands for to the registry it names; returns where it went."""
        ref = self.target(name)
        model = self._local_model(name, ref)
        plain_http = self._plain_http(ref, insecure)
        blobs = _blobs(model, self.models)
        self.policy().check(ref)
        options = self.settings.models.download
        base = registry_base(ref, options, plain_http=plain_http)
        auth = RegistryAuth(options, ref.repository, self.new_client, actions="pull,push", failure=PushFailed)
        with audited(self.models.store, context, action="models.push", target=str(model.name)) as note:
            note.detail["destination"] = str(ref)
            on_progress(PushProgress("retrieving manifest"))
            with self.new_client() as client:
                for blob in blobs:
                    _upload(client, auth, base, blob, on_progress)
                on_progress(PushProgress("pushing manifest"))
                manifest = _manifest(blobs)
                answer = auth.send(
                    client,
                    "PUT",
                    f"{base}/manifests/{ref.tag}",
                    headers={"Content-Type": DOCKER_MANIFEST},
                    content=manifest,
                )
                _expect(answer, 201, f"the manifest of {ref}")
            note.bytes = sum(blob.size for blob in blobs)
            note.detail["manifest"] = answer.headers.get("docker-content-digest")
        return ref

    def _local_model(self, name: str, ref: OciRef) -> Model:
        """The model a push name stands for: the name itself when it is a local model's, else its
        repository and tag without the registry (and without Ollama's ``library/`` namespace)."""
        namespace, _, model = ref.repository.rpartition("/")
        candidates = [name, f"{ref.repository}:{ref.tag}"]
        if namespace == OLLAMA_NAMESPACE:
            candidates.append(f"{model}:{ref.tag}")
        for candidate in candidates:
            try:
                return self.models.get(ModelName.parse(candidate))
            except (ModelNotFound, InvalidInput):
                continue
        raise ModelNotFound(
            f"no local model for {name!r} (looked for {', '.join(candidates[1:])})",
            hint="copy the model to that name first (ollama cp, /api/copy), then push it",
        )

    def _plain_http(self, ref: OciRef, insecure: bool) -> bool:
        if ref.registry in self.settings.models.download.oci_plain_http:
            return True
        if not insecure:
            return False
        host = ref.registry.rsplit(":", 1)[0] if not ref.registry.endswith("]") else ref.registry
        if not is_loopback_host(host.strip("[]")):
            raise InvalidInput(
                f"insecure (plain HTTP) pushes go only to registries on loopback; {ref.registry} is not",
                hint="serve the registry over HTTPS, or list it in models.download.oci_plain_http",
            )
        return True


def _blobs(model: Model, models: ModelService) -> list[_Blob]:
    """The model's GGUF, then its Ollama layers, then the config that lists them."""
    ggufs = [artifact for artifact in model.artifacts if artifact.format == "gguf"]
    others = [a.filename for a in model.artifacts if a.format != "gguf" and a.filename not in LAYERS]
    if len(ggufs) != 1 or others:
        raise InvalidInput(
            f"model {model.name} cannot be pushed in Ollama's layout: it needs one GGUF file and"
            f" nothing but Ollama layers ({', '.join(LAYERS)}); it has {', '.join(model.formats)}"
            + (f" and {', '.join(others)}" if others else ""),
            hint="export models of other formats with `appliance bundle export`",
        )
    gguf = ggufs[0]
    blobs = [
        _Blob(OLLAMA_MODEL_LAYER, gguf.digest, gguf.size_bytes, gguf.filename, models.blob_path(gguf.digest))
    ]
    order = {layer: index for index, layer in enumerate(LAYERS)}
    for artifact in sorted(model.artifacts, key=lambda a: order.get(a.filename, -1)):
        if artifact.format == "file" and artifact.filename in LAYERS:
            blobs.append(
                _Blob(
                    MEDIA_TYPE.format(layer=artifact.filename),
                    artifact.digest,
                    artifact.size_bytes,
                    artifact.filename,
                    models.blob_path(artifact.digest),
                )
            )
    capabilities = model.capabilities
    family = str(capabilities.get("architecture", "unknown"))
    config = json.dumps(
        {
            "model_format": "gguf",
            "model_family": family,
            "model_families": [family],
            "file_type": str(capabilities.get("quantization", "unknown")).removeprefix("ALL_"),
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [blob.digest for blob in blobs]},
        },
        separators=(",", ":"),
    ).encode()
    digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
    return [*blobs, _Blob(CONFIG_TYPE, digest, len(config), None, content=config)]


def _manifest(blobs: list[_Blob]) -> bytes:
    config, layers = blobs[-1], blobs[:-1]
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": config.media_type, "digest": config.digest, "size": config.size},
            "layers": [
                {
                    "mediaType": blob.media_type,
                    "digest": blob.digest,
                    "size": blob.size,
                    **({"annotations": {TITLE: blob.title}} if blob.title else {}),
                }
                for blob in layers
            ],
        },
        separators=(",", ":"),
    ).encode()


def _upload(
    client: httpx.Client,
    auth: RegistryAuth,
    base: str,
    blob: _Blob,
    on_progress: Callable[[PushProgress], None],
) -> None:
    """Send one blob unless the registry has it: an upload session, then one PUT of the bytes."""
    status = f"pushing {blob.digest.removeprefix('sha256:')[:12]}"

    def report(done: int) -> None:
        on_progress(PushProgress(status, digest=blob.digest, total=blob.size, completed=done))

    if auth.send(client, "HEAD", f"{base}/blobs/{blob.digest}").status_code == 200:
        report(blob.size)
        return
    started = auth.send(client, "POST", f"{base}/blobs/uploads/")
    _expect(started, 202, f"an upload of {blob.digest}")
    location = started.headers.get("location")
    if not location:
        raise PushFailed(f"{httpx.URL(base).host} started an upload without saying where to send it")
    target = started.url.join(location).copy_merge_params({"digest": blob.digest})

    def content() -> Iterator[bytes]:
        if blob.content is not None:
            yield blob.content
            return
        assert blob.path is not None
        done = 0
        with blob.path.open("rb") as source:
            while chunk := source.read(CHUNK_BYTES):
                yield chunk
                done += len(chunk)
                report(done)

    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
    _expect(
        auth.send(client, "PUT", target, headers=headers, content=content), 201, f"the blob {blob.digest}"
    )
    report(blob.size)


def _expect(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        detail = response.text[:200].strip()
        raise PushFailed(
            f"{response.url.host} answered {response.status_code} to {what}"
            + (f": {detail}" if detail else "")
        )
