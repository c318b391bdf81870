"""Importing in place the models another tool already keeps on disk.

Two layouts are read, both content-addressed and immutable (a blob is named by its digest and
never written again), which is what makes linking safe here where ``models import`` copies:

    Ollama models dir  PATH/manifests/<registry>/<namespace>/<model>/<tag>  JSON image manifest; its
                                                                           application/vnd.ollama.image.model
                                                                           layer is the GGUF
                       PATH/blobs/sha256-<hex>
    Hugging Face cache PATH/models--<org>--<repo>/refs/main                the commit main points at
                       .../snapshots/<commit>/<file>  → ../../blobs/<id>   id: the sha256 of an LFS
                                                                           file, the git blob id (sha1)
                                                                           of a small one
                       (PATH is the hub dir holding them, or one models--org--repo dir)

Each model is staged whole (every file linked or copied and its digest checked) before any of it
is registered, so a file that fails its digest registers nothing of that model; the others go on.
Ollama names keep their tags (``registry.ollama.ai/library/llama3/8b`` is ``llama3:8b``); hub
models are named and grouped the way an ``hf:`` pull names them, with the pull's source URIs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from appliance.audit import Context, audited
from appliance.errors import (
    ApplianceError,
    DigestMismatch,
    InvalidModelName,
    ModelExists,
    SourceNotFound,
    SourceUnreadable,
    UnsupportedFormat,
)
from appliance.models.formats import detect_format, guess_format
from appliance.models.gguf import GGUF_MAGIC
from appliance.models.service import HEADER_BYTES, ModelService
from appliance.names import ModelName
from appliance.provision.hub import SKIPPED, default_name
from appliance.provision.verify import git_blob_id
from appliance.refs import HfRef, OciRef
from appliance.store.base import Artifact
from appliance.store.cache import StagedBlob

__all__ = ["DirImportOut", "DirImporter", "ImportedFileOut", "ImportedModelOut"]

Layout = Literal["ollama", "huggingface"]
Status = Literal["added", "present", "would_add", "failed"]

OLLAMA_REGISTRY = "registry.ollama.ai"
OLLAMA_MODEL = "application/vnd.ollama.image.model"
_OLLAMA_KINDS = {  # the layers besides the GGUF, and why each stays behind
    "template": "the engine uses the GGUF's own chat template",
    "params": "Ollama's default options; the appliance's settings and each request's options apply",
    "system": "Ollama's default system prompt; send it as the first message instead",
    "messages": "Ollama's preset conversation; not a part of the model",
    "license": "the license text; read it in Ollama's blob",
    "projector": "a vision projector; the engine serves text only",
    "adapter": "a LoRA adapter; the engine does not load adapters",
}
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SHA1_HEX = re.compile(r"^[0-9a-f]{40}$")
_NO_OVERWRITE_HINT = (
    "nothing was overwritten: remove the existing model first (`appliance models rm NAME`),"
    " or import this file under another name with `appliance models import FILE --name OTHER`"
)


# -- the report: shared by the API and the CLI's --json ---------------------------------------------


class ImportedFileOut(BaseModel):
    filename: str = Field(description="the file's name in the model")
    source: str = Field(description="the blob it was read from")
    digest: str | None = Field(description="sha256:HEX; null when it was not read (a dry run)")
    size_bytes: int
    method: str | None = Field(description="hardlink, reflink or copy; null when nothing was staged")
    source_uri: str


class ImportedModelOut(BaseModel):
    name: str | None = Field(description="name:tag; null when none could be made from the source")
    origin: str = Field(description="the manifest or repo dir it was found at")
    status: Status = Field(
        description="added, present (already registered with the same digests), would_add (a dry run)"
        " or failed"
    )
    files: list[ImportedFileOut]
    not_imported: list[str] = Field(description="what the source holds that was left out, and why")
    notes: list[str]
    error: str | None = None
    hint: str | None = None


class DirImportOut(BaseModel):
    path: str
    layout: Layout
    dry_run: bool
    models: list[ImportedModelOut]

    @property
    def failed(self) -> list[ImportedModelOut]:
        return [model for model in self.models if model.status == "failed"]


# -- what a layout holds ------------------------------------------------------------------------


@dataclass(frozen=True)
class _SourceFile:
    filename: str
    path: Path
    source_uri: str
    sha256: str | None = None  # "sha256:HEX" when the store names the blob by it
    git_blob: str | None = None  # else the git blob id it is named by


@dataclass
class _Candidate:
    origin: Path
    name: ModelName | None = None
    files: list[_SourceFile] = field(default_factory=list)
    format: str | None = None  # required of a single file (an Ollama model layer is a GGUF)
    not_imported: list[str] = field(default_factory=list)
    problem: ApplianceError | None = None  # found while reading the layout: the model fails with it


def _detect_layout(path: Path) -> tuple[Layout, Path]:
    """Which layout ``path`` holds (and the dir to read it from), or a clear error."""
    if not path.exists():
        raise SourceNotFound(f"{path} does not exist")
    # Not found (404), as a path with nothing there: the layout looked for is not at that path.
    if not path.is_dir():
        raise SourceNotFound(f"{path} is not a directory", hint=_LAYOUT_HINT)
    if (path / "manifests").is_dir() and (path / "blobs").is_dir():
        return "ollama", path
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        return "huggingface", path
    if any(child.name.startswith("models--") and child.is_dir() for child in path.iterdir()):
        return "huggingface", path
    raise SourceNotFound(
        f"{path} is neither an Ollama models directory (with manifests/ and blobs/) nor a Hugging Face"
        " cache (a hub dir holding models--ORG--REPO dirs, or one such dir with snapshots/)",
        hint=_LAYOUT_HINT,
    )


_LAYOUT_HINT = (
    "pass Ollama's models dir (~/.ollama/models, or /usr/share/ollama/.ollama/models for the system"
    " service) or the hub cache (~/.cache/huggingface/hub, or one models--ORG--REPO dir in it)"
)


def _ollama_candidates(root: Path) -> Iterator[_Candidate]:
    manifests = root / "manifests"
    for manifest in sorted(manifests.glob("*/*/*/*")):
        if manifest.is_file():
            yield _ollama_candidate(root, manifest)


def _ollama_candidate(root: Path, manifest: Path) -> _Candidate:
    registry, namespace, model, tag = manifest.relative_to(root / "manifests").parts
    candidate = _Candidate(origin=manifest, format="gguf")
    if registry != OLLAMA_REGISTRY:
        text = f"{registry}/{namespace}/{model}:{tag}"
    else:
        text = f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    try:
        candidate.name = ModelName.parse(text)
    except InvalidModelName as exc:
        candidate.problem = InvalidModelName(
            f"Ollama's {registry}/{namespace}/{model}:{tag} has no appliance name: {exc.message}",
            hint="pull it from its registry with `appliance models pull oci://…` and --name",
        )
        return candidate
    try:
        layers = json.loads(manifest.read_bytes())["layers"]
        models = [layer for layer in layers if layer["mediaType"] == OLLAMA_MODEL]
        others = [layer for layer in layers if layer["mediaType"] != OLLAMA_MODEL]
        digests = [str(layer["digest"]) for layer in models]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        candidate.problem = SourceUnreadable(
            f"{manifest} is not an Ollama image manifest: {exc}", hint="check it with `ollama show`"
        )
        return candidate
    for layer in others:
        kind = str(layer.get("mediaType", "")).rsplit(".", 1)[-1]
        why = _OLLAMA_KINDS.get(kind, "a kind of layer the appliance does not know")
        candidate.not_imported.append(f"{kind} layer {layer.get('digest')}: {why}")
    if len(digests) != 1:
        candidate.problem = UnsupportedFormat(
            f"{manifest} has {len(digests)} model layers; a model holds one GGUF",
            hint="import the GGUF you want with `appliance models import FILE --name NAME`",
        )
        return candidate
    digest = digests[0]
    hex_digest = digest.removeprefix("sha256:")
    if not digest.startswith("sha256:") or not _SHA256_HEX.match(hex_digest):
        candidate.problem = SourceUnreadable(
            f"{manifest} names its model layer {digest[:80]!r}, not a sha256"
        )
        return candidate
    blob = root / "blobs" / f"sha256-{hex_digest}"
    source_uri = str(OciRef(registry=registry, repository=f"{namespace}/{model}", tag=tag))
    candidate.files.append(_SourceFile(f"{model}.gguf", blob, source_uri=source_uri, sha256=digest))
    return candidate


def _hub_candidates(root: Path) -> Iterator[_Candidate]:
    repos = [root] if root.name.startswith("models--") else sorted(root.glob("models--*"))
    for repo_dir in repos:
        if repo_dir.is_dir():
            yield from _hub_repo(repo_dir)


def _hub_repo(repo_dir: Path) -> Iterator[_Candidate]:
    repo = "/".join(repo_dir.name.split("--")[1:])
    commit, problem = _hub_commit(repo_dir)
    if problem is not None:
        yield _Candidate(origin=repo_dir, name=default_name(repo, None), problem=problem)
        return
    snapshot = repo_dir / "snapshots" / commit
    files: list[tuple[_SourceFile, ApplianceError | None]] = []
    for entry in sorted(_walk(snapshot)):
        filename = entry.relative_to(snapshot).as_posix()
        if filename not in SKIPPED:
            files.append(_hub_file(repo_dir, entry, f"{repo}/{filename}", filename))
    ggufs = [(file, problem) for file, problem in files if _is_gguf(file)]
    if ggufs:  # as `hf:ORG/REPO/FILE` pulls: each GGUF one model, and the rest of the repo left out
        left = [
            f"{file.filename}: not a GGUF (each GGUF of the repo is a model by itself)"
            for file, _ in files
            if not _is_gguf(file)
        ]
        for file, problem in ggufs:
            ref = str(HfRef(repo=repo, filename=file.filename, revision=commit))
            candidate = _Candidate(
                origin=repo_dir, name=default_name(repo, file.filename), format="gguf", problem=problem
            )
            candidate.files.append(_SourceFile(file.filename, file.path, ref, file.sha256, file.git_blob))
            candidate.not_imported = list(left)
            yield candidate
        return
    # as `hf:ORG/REPO` pulls: the whole repo one model, one artifact per file
    candidate = _Candidate(origin=repo_dir, name=default_name(repo, None))
    ref = str(HfRef(repo=repo, revision=commit))
    for file, problem in files:
        source_uri = ref if len(files) == 1 else f"{ref}#{file.filename}"
        candidate.files.append(_SourceFile(file.filename, file.path, source_uri, file.sha256, file.git_blob))
        candidate.problem = candidate.problem or problem
    if not any(_format_of(file.path) == "safetensors" for file in candidate.files) and not candidate.problem:
        candidate.problem = UnsupportedFormat(
            f"{repo_dir} holds no GGUF and no safetensors file at commit {commit}",
            hint="download the model's files first (`hf download ORG/REPO`)",
        )
    yield candidate


def _is_gguf(file: _SourceFile) -> bool:
    return file.filename.lower().endswith(".gguf") or _header(file.path).startswith(GGUF_MAGIC)


def _format_of(path: Path) -> str:
    try:
        return guess_format(_header(path), size=path.stat().st_size)
    except OSError:
        return "file"


def _hub_commit(repo_dir: Path) -> tuple[str, ApplianceError | None]:
    """The snapshot to read: the one ``refs/main`` names, else the only one there is."""
    main = repo_dir / "refs" / "main"
    if main.is_file():
        commit = main.read_text().strip()
        if (repo_dir / "snapshots" / commit).is_dir() and "/" not in commit and commit not in ("", ".", ".."):
            return commit, None
        return "", SourceNotFound(f"{main} names commit {commit[:80]!r}, which has no snapshot in {repo_dir}")
    if not (repo_dir / "snapshots").is_dir():
        return "", SourceNotFound(f"{repo_dir} has no snapshots/: nothing of it was downloaded")
    snapshots = sorted(p.name for p in (repo_dir / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) == 1:
        return snapshots[0], None
    return "", SourceNotFound(
        f"{repo_dir} has no refs/main and {len(snapshots)} snapshots: cannot tell which to import",
        hint="download the revision you want with `hf download` (it writes refs/main)",
    )


def _walk(directory: Path) -> Iterator[Path]:
    for parent, _, names in os.walk(directory):
        for name in names:
            yield Path(parent) / name


def _hub_file(
    repo_dir: Path, entry: Path, label: str, filename: str
) -> tuple[_SourceFile, ApplianceError | None]:
    """A snapshot file: where its content lives, and the digest its blob's name gives it (the
    source URI is the model's, set once the repo is grouped)."""
    source_uri = ""
    if not entry.is_symlink():
        return _SourceFile(filename, entry, source_uri), DigestMismatch(
            f"{label} is a plain file, not a link into the cache's blobs/: nothing names its digest",
            hint="download it again with huggingface_hub (it links snapshot files to their blobs)",
        )
    blob = Path(os.path.normpath(entry.parent / os.readlink(entry)))
    file = _SourceFile(filename, blob, source_uri)
    if blob.parent != repo_dir / "blobs":
        return file, SourceUnreadable(f"{label} links outside the repo's blobs/: {blob}")
    if not blob.is_file():
        return file, SourceNotFound(
            f"{label} links to {blob}, which is missing (an interrupted download?)",
            hint="download it again with huggingface_hub",
        )
    if _SHA256_HEX.match(blob.name):
        return _SourceFile(filename, blob, source_uri, sha256=f"sha256:{blob.name}"), None
    if _SHA1_HEX.match(blob.name):
        return _SourceFile(filename, blob, source_uri, git_blob=blob.name), None
    return file, DigestMismatch(f"{label} links to {blob}, whose name is neither a sha256 nor a git blob id")


def _header(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(HEADER_BYTES)
    except OSError:
        return b""  # staging says why it cannot be read


# -- importing ------------------------------------------------------------------------------------


class DirImporter:
    """Reads a layout and imports each model it holds through ModelService, one model at a time."""

    def __init__(self, models: ModelService) -> None:
        self.models = models

    def import_dir(
        self,
        path: Path,
        context: Context,
        *,
        copy: bool = False,
        dry_run: bool = False,
        on_model: Callable[[ImportedModelOut], None] | None = None,
    ) -> DirImportOut:
        """Import every model found under ``path``; a model that fails is reported and the rest go on
        (``on_model`` hears each one's outcome as it is known: a big dir takes a while).

        Blobs are hard-linked (or reflinked) when on the cache's filesystem, unless ``copy``; a blob
        owned by another user is copied (through a hard link its owner could change the model).
        ``dry_run`` reads the layout and reports what it would do, hashing nothing."""
        if "\0" in str(path):
            raise SourceUnreadable(
                f"{str(path)!r} contains a NUL byte", hint="pass the directory's real path"
            )
        root = Path(os.path.abspath(path))
        try:
            layout, root = _detect_layout(root)
            found = _ollama_candidates(root) if layout == "ollama" else _hub_candidates(root)
            candidates = list(found)
        except ApplianceError:
            raise
        except OSError as exc:
            raise SourceUnreadable(f"{exc.filename or root} cannot be read: {exc.strerror or exc}") from exc
        results: list[ImportedModelOut] = []
        for candidate in candidates:
            results.append(self._one(candidate, context, layout=layout, copy=copy, dry_run=dry_run))
            if on_model is not None:
                on_model(results[-1])
        return DirImportOut(path=str(root), layout=layout, dry_run=dry_run, models=results)

    def _one(
        self, candidate: _Candidate, context: Context, *, layout: Layout, copy: bool, dry_run: bool
    ) -> ImportedModelOut:
        report = ImportedModelOut(
            name=str(candidate.name) if candidate.name else None,
            origin=str(candidate.origin),
            status="would_add" if dry_run else "added",
            files=[],
            not_imported=candidate.not_imported,
            notes=[],
        )
        try:
            if dry_run:
                self._plan(candidate, report)
            else:
                target = str(candidate.name) if candidate.name else str(candidate.origin)
                with audited(self.models.store, context, action="models.import", target=target) as note:
                    note.detail.update(source=str(candidate.origin), layout=layout)
                    self._import(candidate, report, context, copy=copy)
                    note.detail.update(
                        status=report.status,
                        digests=[file.digest for file in report.files],
                        methods=[file.method for file in report.files],
                    )
                    note.bytes = sum(file.size_bytes for file in report.files if file.method)
        except ApplianceError as exc:
            report.status = "failed"
            report.error = exc.message
            report.hint = _NO_OVERWRITE_HINT if isinstance(exc, ModelExists) else exc.hint
        return report

    def _plan(self, candidate: _Candidate, report: ImportedModelOut) -> None:
        if candidate.problem is not None:
            raise candidate.problem
        assert candidate.name is not None
        existing = {(a.filename, a.digest) for a in self._artifacts(candidate.name)}
        present = True
        for file in candidate.files:
            report.files.append(_file_out(file, file.sha256, _size(file), None))
            if file.sha256 is not None:
                self.models.check_conflict(candidate.name, file.filename, file.sha256)
            present = present and (file.filename, file.sha256) in existing
        if present:
            report.status = "present"

    def _import(
        self, candidate: _Candidate, report: ImportedModelOut, context: Context, *, copy: bool
    ) -> None:
        if candidate.problem is not None:
            raise candidate.problem
        name = candidate.name
        assert name is not None
        # A file the model already holds under the digest its blob is named by is not read again.
        held = {(a.filename, a.digest) for a in self._artifacts(name) if self.models.has_blob(a.digest)}
        todo = [file for file in candidate.files if (file.filename, file.sha256) not in held]
        for file in candidate.files:
            if file not in todo:
                report.files.append(_file_out(file, file.sha256, _size(file), None))
        if not todo:
            report.status = "present"
            return
        for file in todo:  # a name taken with other content is refused before any byte is read
            if file.sha256 is not None:
                self.models.check_conflict(name, file.filename, file.sha256)
        self.models.check_budget(sum(_size(file) for file in todo), keep=name)
        staged: list[tuple[_SourceFile, StagedBlob]] = []
        try:
            for file in todo:
                staged.append((file, self._stage(file, report, copy=copy)))
            single = len(candidate.files) == 1  # a model of one file must be a model format
            formats = [self._format(candidate, blob, file, single=single) for file, blob in staged]
            for file, blob in staged:  # a conflict on any file registers none of them
                self.models.check_conflict(name, file.filename, blob.digest)
            added = False
            for (file, blob), fmt in zip(staged, formats, strict=True):
                report.files.append(_file_out(file, blob.digest, blob.size, blob.method))
                _, new, _ = self.models.register_staged(
                    blob, name, filename=file.filename, fmt=fmt, source_uri=file.source_uri, context=context
                )
                added = added or new
            report.status = "added" if added else "present"
        finally:
            for _, blob in staged:
                blob.close()

    def _stage(self, file: _SourceFile, report: ImportedModelOut, *, copy: bool) -> StagedBlob:
        """Link or copy one blob into staging and check it against the digest its name gives it."""
        owner = _stat(file).st_uid
        hard_link = not copy and owner == os.geteuid()
        if not copy and not hard_link:
            report.notes.append(
                f"{file.filename}: not hard-linked: {file.path} belongs to uid {owner}, and through a"
                " hard link its owner could change the model"
            )
        try:
            blob = self.models.cache.stage(
                file.path, allow_link=not copy, hard_link=hard_link, expected_digest=file.sha256
            )
        except DigestMismatch as exc:
            raise DigestMismatch(f"{file.filename}: {exc.message}", hint=_MISMATCH_HINT) from exc
        if file.git_blob is not None:
            actual = git_blob_id(blob.path, blob.size)
            if actual != file.git_blob:
                blob.close()
                raise DigestMismatch(
                    f"{file.filename}: {file.path} has git blob id {actual}, but is named {file.git_blob}",
                    hint=_MISMATCH_HINT,
                )
        return blob

    @staticmethod
    def _format(candidate: _Candidate, blob: StagedBlob, file: _SourceFile, *, single: bool) -> str:
        header = _header(blob.path)
        if single or candidate.format is not None:
            return detect_format(header, size=blob.size, filename=file.filename, requested=candidate.format)
        return guess_format(header, size=blob.size)

    def _artifacts(self, name: ModelName) -> tuple[Artifact, ...]:
        model = self.models.store.get_model(name)
        return tuple(model.artifacts) if model is not None else ()


_MISMATCH_HINT = (
    "the file's content is not what its store names it: nothing of this model was registered;"
    " download it again with the tool that made it"
)


def _stat(file: _SourceFile) -> os.stat_result:
    try:
        return file.path.stat()
    except FileNotFoundError as exc:
        raise SourceNotFound(f"{file.path} ({file.filename}) does not exist") from exc
    except OSError as exc:
        raise SourceUnreadable(f"{file.path} ({file.filename}) cannot be read: {exc.strerror}") from exc


def _size(file: _SourceFile) -> int:
    return _stat(file).st_size


def _file_out(file: _SourceFile, digest: str | None, size: int, method: str | None) -> ImportedFileOut:
    return ImportedFileOut(
        filename=file.filename,
        source=str(file.path),
        digest=digest,
        size_bytes=size,
        method=method,
        source_uri=file.source_uri,
    )
