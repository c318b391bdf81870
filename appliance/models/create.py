"""Making a model from parts already here: Ollama's create (from uploaded blobs, or from another
model) and copy.

A created model is one GGUF plus its Ollama layers (``models/layers.py``). From another model it
takes that model's artifacts (the GGUF blob is shared, never copied) with the layers given here in
place of the base's; from ``files`` it takes one GGUF already uploaded to ``/api/blobs``. The new
name must be free: nothing is overwritten. Registration is one transaction (``register_artifacts``),
audited as an import.

May import: audit, errors, names, store types, and the registry service and layers beside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from appliance.audit import Context
from appliance.errors import InvalidInput, ModelExists, SourceNotFound, UnsupportedFormat
from appliance.models.gguf import GGUF_MAGIC
from appliance.models.layers import (
    LAYERS,
    ModelLayers,
    check_messages,
    check_parameters,
    check_template,
    layer_bytes,
    read_layers,
)
from appliance.models.service import Model, ModelService
from appliance.names import ModelName
from appliance.refs import parse_digest
from appliance.store.base import Artifact, NewArtifact

__all__ = ["ModelCreator", "NewLayers"]

StatusCallback = Callable[[str], None]


class NewLayers:
    """The layers a create request sets; ``None`` keeps the base model's (or has none)."""

    def __init__(
        self,
        *,
        template: str | None = None,
        system: str | None = None,
        messages: list[dict[str, Any]] | None = None,
        parameters: dict[str, Any] | None = None,
        license: str | list[str] | None = None,
    ) -> None:
        self.template = None if template is None else check_template(template)
        self.system = system
        self.messages = None if messages is None else check_messages(messages)
        self.parameters = None if parameters is None else check_parameters(parameters)
        self.license = "\n".join(license) if isinstance(license, list) else license

    def over(self, base: ModelLayers) -> ModelLayers:
        return ModelLayers(
            template=base.template if self.template is None else self.template,
            system=base.system if self.system is None else self.system,
            messages=base.messages if self.messages is None else self.messages,
            parameters=base.parameters if self.parameters is None else self.parameters,
            license=base.license if self.license is None else self.license,
        )


class ModelCreator:
    def __init__(self, models: ModelService) -> None:
        self.models = models

    def create(
        self,
        name: str,
        context: Context,
        *,
        files: dict[str, str] | None = None,
        base: str | None = None,
        layers: NewLayers,
        on_status: StatusCallback = lambda _: None,
    ) -> Model:
        """Register ``name`` from uploaded ``files`` ({filename: digest}) or from the model ``base``.

        Every check comes before the first status, so a refused request fails before a stream starts."""
        model_name = self._free_name(name)
        if (files is None) == (base is None):
            raise InvalidInput("send either files (uploaded blobs) or from (an existing model)")
        if files is not None:
            artifacts, inherited, source = self._from_files(files), ModelLayers(), "uploaded blobs"
            on_status("parsing GGUF")
        else:
            parent = self.models.get(base or "")
            artifacts = [_new(artifact) for artifact in parent.artifacts if artifact.filename not in LAYERS]
            inherited, source = read_layers(parent, self.models.cache), f"model {parent.name}"
            on_status(f"using existing model {parent.name}")
        for filename, content in layer_bytes(layers.over(inherited)).items():
            on_status(f"writing {filename} layer")
            artifacts.append(self._layer(filename, content))
        on_status("writing manifest")
        model, _ = self.models.register_artifacts(
            model_name, artifacts, context=context, source=f"create from {source}"
        )
        return model

    def copy(self, source: str, destination: str, context: Context) -> Model:
        """Register ``destination`` with the same files as ``source``: its blobs are shared."""
        model_name = self._free_name(destination)
        parent = self.models.get(source)
        artifacts = [_new(artifact) for artifact in parent.artifacts]
        model, _ = self.models.register_artifacts(
            model_name, artifacts, context=context, source=f"copy of model {parent.name}"
        )
        return model

    def _free_name(self, name: str) -> ModelName:
        model_name = ModelName.parse(name)
        if any(model.name == model_name for model in self.models.list_models()):
            raise ModelExists(
                f"model {model_name} already exists; nothing was changed",
                hint="delete it first (ollama rm, `appliance models rm`), or use another name",
            )
        return model_name

    def _from_files(self, files: dict[str, str]) -> list[NewArtifact]:
        ggufs = [filename for filename in files if filename.lower().endswith(".gguf")]
        others = sorted(set(files) - set(ggufs))
        if others or len(ggufs) != 1:
            raise InvalidInput(
                f"files must hold exactly one .gguf file (got {', '.join(sorted(files)) or 'none'});"
                " this appliance does not convert safetensors or other files",
                hint="upload the model as one GGUF file",
            )
        filename = ggufs[0]
        digest = parse_digest(files[filename])
        if not self.models.has_blob(digest):
            raise SourceNotFound(
                f"files.{filename}: blob {digest} has not been uploaded",
                hint=f"upload it first: POST /api/blobs/{digest}",
            )
        path = self.models.blob_path(digest)
        with path.open("rb") as blob:
            if not blob.read(len(GGUF_MAGIC)) == GGUF_MAGIC:
                raise UnsupportedFormat(
                    f"files.{filename}: blob {digest} is not a GGUF file (it lacks the GGUF magic)"
                )
        size = path.stat().st_size
        return [NewArtifact(filename.rsplit("/", 1)[-1], "gguf", digest, size, source_uri=None)]

    def _layer(self, filename: str, content: bytes) -> NewArtifact:
        digest = _digest_of(content)
        if not self.models.has_blob(digest):
            with self.models.receive_blob() as incoming:
                incoming.write(content)
                incoming.finish(digest)
        return NewArtifact(filename, "file", digest, len(content), source_uri=None)


def _new(artifact: Artifact) -> NewArtifact:
    return NewArtifact(
        artifact.filename, artifact.format, artifact.digest, artifact.size_bytes, artifact.source_uri
    )


def _digest_of(content: bytes) -> str:
    return f"sha256:{hashlib.sha256(content).hexdigest()}"
