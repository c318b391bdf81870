"""The bundle format: one OCI image manifest per model, our metadata in its annotations.

A manifest's layers are the model's artifacts, each titled with its filename
(``org.opencontainers.image.title``, which the ``oci://`` resolver reads); its config is the OCI
empty descriptor (``{}``), as OCI 1.1 asks of an artifact; its ``artifactType`` is ours. The
exact model name, formats, size, capabilities (GGUF facts) and creation time are manifest
annotations; each layer also says its format and where it came from (``source_uri``). Skopeo
copies such a manifest to a registry and back unchanged (tests/bundles/test_registry.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from appliance.errors import BundleDamaged, InvalidModelName, NotABundle
from appliance.names import ModelName
from appliance.store.base import Model, NewArtifact

__all__ = [
    "ARTIFACT_TYPE",
    "EMPTY_CONFIG",
    "MANIFEST_TYPE",
    "MAX_JSON_BYTES",
    "NAME_ANNOTATION",
    "BundleModel",
    "Descriptor",
    "blob_entry",
    "index_document",
    "layout_document",
    "manifest_for",
    "parse_index",
    "parse_layout",
    "parse_manifest",
    "ref_name",
]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
ARTIFACT_TYPE = "application/vnd.appliance.model.v1"
LAYER_TYPE = "application/vnd.appliance.model.layer.v1.{format}"
EMPTY_CONFIG = b"{}"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"
CREATED = "org.opencontainers.image.created"
PREFIX = "io.appliance.model."
NAME_ANNOTATION = PREFIX + "name"  # the exact name:tag (ref.name cannot hold it)
MAX_JSON_BYTES = 4 * 1024 * 1024  # an index or a manifest: held in memory, so capped
_HEX = re.compile(r"^[0-9a-f]{64}$")
_REF_SEPARATORS = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Descriptor:
    digest: str
    size: int

    @classmethod
    def of(cls, content: bytes) -> Descriptor:
        return cls(f"sha256:{hashlib.sha256(content).hexdigest()}", len(content))


@dataclass(frozen=True)
class BundleModel:
    """One model as a bundle's manifest describes it."""

    name: ModelName
    artifacts: tuple[NewArtifact, ...]
    manifest: Descriptor


def blob_entry(digest: str) -> str:
    """The path of a blob inside the layout (and the tar): what an error names."""
    return f"blobs/sha256/{digest.removeprefix('sha256:')}"


def ref_name(name: ModelName) -> str:
    """The model's name in ``index.json`` (and for ``skopeo copy oci:DIR:REF``): OCI's ref.name
    grammar (alphanumerics joined by one of ``-._:@+`` or ``/``) without ``:``, which tools split
    the layout path on. ``library/tiny:q8_0`` becomes ``library/tiny-q8-0``; the exact name is in
    our own annotation."""
    parts = [_REF_SEPARATORS.sub("-", part).strip("-") or "x" for part in name.name.split("/")]
    return "/".join(parts) + "-" + (_REF_SEPARATORS.sub("-", name.tag).strip("-") or "x")


def layout_document() -> bytes:
    return json.dumps({"imageLayoutVersion": "1.0.0"}).encode()


def manifest_for(model: Model) -> bytes:
    """The manifest of one model, as bytes (its digest is its identity in the index)."""
    layers = [
        {
            "mediaType": LAYER_TYPE.format(format=artifact.format),
            "digest": artifact.digest,
            "size": artifact.size_bytes,
            "annotations": {
                TITLE: artifact.filename,
                PREFIX + "format": artifact.format,
                **({PREFIX + "source_uri": artifact.source_uri} if artifact.source_uri else {}),
            },
        }
        for artifact in model.artifacts
    ]
    empty = Descriptor.of(EMPTY_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_TYPE, "digest": empty.digest, "size": empty.size},
        "layers": layers,
        "annotations": {
            NAME_ANNOTATION: str(model.name),
            PREFIX + "formats": ",".join(model.formats),
            PREFIX + "size": str(model.size_bytes),
            PREFIX + "capabilities": json.dumps(model.capabilities, sort_keys=True, default=str),
            CREATED: model.created_at,
        },
    }
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def index_document(manifests: list[tuple[Model, Descriptor]]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [
                {
                    "mediaType": MANIFEST_TYPE,
                    "artifactType": ARTIFACT_TYPE,
                    "digest": descriptor.digest,
                    "size": descriptor.size,
                    "annotations": {REF_NAME: ref_name(model.name), NAME_ANNOTATION: str(model.name)},
                }
                for model, descriptor in manifests
            ],
        },
        indent=2,
        sort_keys=True,
    ).encode()


def _json(content: bytes, entry: str) -> dict[str, Any]:
    try:
        document = json.loads(content)
    except ValueError as exc:
        raise BundleDamaged(f"{entry} is not valid JSON: the bundle is damaged") from exc
    if not isinstance(document, dict):
        raise BundleDamaged(f"{entry} is not a JSON object: the bundle is damaged")
    return document


def parse_layout(content: bytes) -> None:
    try:
        version = json.loads(content).get("imageLayoutVersion")
    except (ValueError, AttributeError) as exc:
        raise NotABundle("oci-layout is not the JSON of an OCI image layout") from exc
    if version != "1.0.0":
        raise NotABundle(f"oci-layout names image layout version {version!r}; this appliance reads 1.0.0")


def parse_index(content: bytes) -> list[Descriptor]:
    """The manifests ``index.json`` lists."""
    document = _json(content, "index.json")
    try:
        found = [
            Descriptor(_digest(str(entry["digest"]), "index.json"), int(entry["size"]))
            for entry in document["manifests"]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleDamaged("index.json does not list manifests with digests and sizes") from exc
    if not found:
        raise NotABundle("index.json lists no models", hint="export at least one model")
    return found


def parse_manifest(content: bytes, descriptor: Descriptor) -> BundleModel:
    """One model's name and artifacts from its manifest (already checked against its digest)."""
    entry = blob_entry(descriptor.digest)
    document = _json(content, entry)
    if document.get("artifactType") != ARTIFACT_TYPE:
        raise NotABundle(
            f"{entry} is not an appliance model (its artifactType is {document.get('artifactType')!r},"
            f" not {ARTIFACT_TYPE})",
            hint="a bundle holds the models `appliance bundle export` wrote; import other images with"
            " `appliance models pull oci://…`",
        )
    notes = document.get("annotations") or {}
    try:
        name = ModelName.parse(str(notes[NAME_ANNOTATION]))
    except (KeyError, InvalidModelName) as exc:
        raise BundleDamaged(f"{entry} has no valid {NAME_ANNOTATION} annotation") from exc
    artifacts: list[NewArtifact] = []
    try:
        for layer in document["layers"]:
            layer_notes = layer.get("annotations") or {}
            filename = str(layer_notes[TITLE])
            if not filename or "\0" in filename:
                raise ValueError("an empty filename")
            artifacts.append(
                NewArtifact(
                    filename=filename,
                    format=str(layer_notes.get(PREFIX + "format", "file")),
                    digest=_digest(str(layer["digest"]), entry),
                    size_bytes=int(layer["size"]),
                    source_uri=layer_notes.get(PREFIX + "source_uri"),
                )
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleDamaged(f"{entry} does not list layers with titles, digests and sizes") from exc
    if not artifacts:
        raise BundleDamaged(f"{entry} lists no files for {name}")
    return BundleModel(name=name, artifacts=tuple(artifacts), manifest=descriptor)


def _digest(text: str, entry: str) -> str:
    if not text.startswith("sha256:") or not _HEX.match(text.removeprefix("sha256:")):
        raise BundleDamaged(f"{entry} names a digest that is not sha256:<64 hex>: {text[:80]!r}")
    return text
