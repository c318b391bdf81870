"""ModelRef: where a model comes from, parsed and normalised.

| form                                   | parsed as  |
| -------------------------------------- | ---------- |
| ``./x.gguf``, ``/abs/x.gguf``, ``~/x``  | FileRef    |
| ``file:/abs/x.gguf``                   | FileRef    |
| ``hf:org/repo[/path/file][@rev]``      | HfRef      |
| ``https://host/path``, ``http://…``    | UrlRef     |
| ``s3://bucket/key``                    | S3Ref      |
| ``oci://registry/repo[:tag|@sha256:…]`` | OciRef     |
| ``sha256:<hex>``                       | DigestRef  |
| ``llama3.2``, ``qwen3:4b``, ``user/m:t``, ``host/ns/m:t`` | OciRef (Ollama name) |

An Ollama name (``[host/][namespace/]model[:tag]``, as ``ollama pull`` takes it) is an OciRef
on the Ollama-style registry the caller passes (``models.download.ollama_registry``), namespace
``library`` by default; without a registry it is refused like any unknown form.

``str(ref)`` is the canonical form: the same model always prints the same way. Plain
local paths are made absolute (``..`` in them is resolved like a shell would); every other
form rejects ``..`` segments, NUL and control characters, and anything over 2048 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from appliance.errors import InvalidModelRef

__all__ = [
    "OLLAMA_NAMESPACE",
    "DigestRef",
    "FileRef",
    "HfRef",
    "ModelRef",
    "OciRef",
    "S3Ref",
    "UrlRef",
    "parse_digest",
    "parse_ollama_name",
    "parse_ref",
]

MAX_REF_LENGTH = 2048
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_PATH_SEGMENT = re.compile(r"^[A-Za-z0-9._+=,@ ()\[\]-]+$")
_REVISION = re.compile(r"^[A-Za-z0-9._/-]{1,255}$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_OCI_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_OLLAMA_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,79}$")
OLLAMA_NAMESPACE = "library"


@dataclass(frozen=True)
class FileRef:
    path: Path

    def __str__(self) -> str:
        return f"file:{self.path}"


@dataclass(frozen=True)
class HfRef:
    repo: str  # "org/repo"
    filename: str | None = None  # a file inside the repo; None means the whole repo
    revision: str | None = None

    def __str__(self) -> str:
        text = f"hf:{self.repo}"
        if self.filename:
            text += f"/{self.filename}"
        if self.revision:
            text += f"@{self.revision}"
        return text


@dataclass(frozen=True)
class UrlRef:
    url: str

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class S3Ref:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class OciRef:
    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    def __str__(self) -> str:
        text = f"oci://{self.registry}/{self.repository}"
        if self.digest:
            return f"{text}@{self.digest}"
        return f"{text}:{self.tag or 'latest'}"


@dataclass(frozen=True)
class DigestRef:
    digest: str  # "sha256:<hex>"

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def __str__(self) -> str:
        return self.digest


ModelRef = FileRef | HfRef | UrlRef | S3Ref | OciRef | DigestRef


def _fail(text: str, reason: str) -> InvalidModelRef:
    shown = text if len(text) <= 120 else text[:117] + "..."
    return InvalidModelRef(f"invalid model ref {shown!r}: {reason}")


def _check_segments(text: str, path: str, *, what: str) -> list[str]:
    segments = path.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise _fail(text, f"{what} has an empty, '.' or '..' segment")
        if not _PATH_SEGMENT.match(segment):
            raise _fail(text, f"{what} segment {segment!r} has characters that are not allowed")
    return segments


def parse_digest(text: str) -> str:
    """Normalise ``sha256:HEX`` (any case) to ``sha256:<lowercase hex>``."""
    algorithm, _, hex_part = text.partition(":")
    hex_part = hex_part.lower()
    if algorithm.lower() != "sha256" or not _HEX64.match(hex_part):
        raise InvalidModelRef(
            f"invalid digest {text[:80]!r}: expected sha256: followed by 64 hex digits",
            hint="copy the digest from `appliance models show NAME`",
        )
    return f"sha256:{hex_part}"


def _parse_hf(text: str, body: str) -> HfRef:
    revision: str | None = None
    if "@" in body:
        body, revision = body.rsplit("@", 1)
        if not _REVISION.match(revision) or ".." in revision.split("/"):
            raise _fail(text, f"revision {revision!r} is not a branch, tag or commit")
    parts = body.split("/")
    if len(parts) < 2:
        raise _fail(text, "expected hf:org/repo or hf:org/repo/path/to/file")
    org, repo = parts[0], parts[1]
    for name in (org, repo):
        if not _HF_NAME.match(name) or ".." in name:
            raise _fail(text, f"{name!r} is not a valid organisation or repository name")
    filename = None
    if len(parts) > 2:
        filename = "/".join(_check_segments(text, "/".join(parts[2:]), what="file path"))
    return HfRef(repo=f"{org}/{repo}", filename=filename, revision=revision)


def _parse_url(text: str) -> UrlRef:
    split = urlsplit(text)
    if split.username is not None or split.password is not None:
        redacted = urlunsplit((split.scheme, split.netloc.rsplit("@", 1)[-1], split.path, "", ""))
        raise InvalidModelRef(
            f"invalid model ref {redacted!r}: it carries credentials, which would end up in logs",
            hint="put the credentials in the appliance's settings, not in the URL",
        )
    if not split.hostname or not _HOST.match(split.netloc):
        raise _fail(text, "the URL has no valid host")
    path = split.path or "/"
    if any(segment in (".", "..") for segment in path.split("/")):
        raise _fail(text, "the URL path has a '.' or '..' segment")
    canonical = urlunsplit((split.scheme.lower(), split.netloc.lower(), path, split.query, ""))
    return UrlRef(url=canonical)


def _parse_s3(text: str, body: str) -> S3Ref:
    bucket, _, key = body.partition("/")
    if not _S3_BUCKET.match(bucket) or ".." in bucket:
        raise _fail(text, f"{bucket!r} is not a valid bucket name")
    if not key:
        raise _fail(text, "expected s3://bucket/key")
    _check_segments(text, key, what="key")
    return S3Ref(bucket=bucket, key=key)


def _parse_oci(text: str, body: str) -> OciRef:
    registry, _, rest = body.partition("/")
    if not registry or not _HOST.match(registry) or not rest:
        raise _fail(text, "expected oci://registry/repository[:tag|@sha256:HEX]")
    digest: str | None = None
    tag: str | None = None
    if "@" in rest:
        rest, digest_text = rest.split("@", 1)
        digest = parse_digest(digest_text)
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _OCI_TAG.match(tag):
            raise _fail(text, f"{tag!r} is not a valid tag")
    for component in rest.split("/"):
        if not _OCI_COMPONENT.match(component):
            raise _fail(text, f"repository component {component!r} must be lowercase letters and digits")
    if digest is None and tag is None:
        tag = "latest"
    return OciRef(registry=registry.lower(), repository=rest, tag=tag, digest=digest)


def parse_ollama_name(text: str, *, registry: str) -> OciRef:
    """An Ollama name as an OciRef: ``model`` is ``registry/library/model:latest``, ``ns/model``
    names a namespace, and three parts name the registry too (``mirror.lan:5000/ns/model``)."""
    name, tag = text.strip(), ""
    colon = name.rfind(":")
    if colon > name.rfind("/"):  # a colon before the last slash is a registry's port
        name, tag = name[:colon], name[colon + 1 :]
    parts = name.split("/")
    if len(parts) > 3:
        raise _fail(text, "an Ollama name has at most three parts: host/namespace/model:tag")
    host = parts[0].lower() if len(parts) == 3 else registry
    path = parts[-2:] if len(parts) > 1 else [OLLAMA_NAMESPACE, parts[0]]
    if not _HOST.match(host):
        raise _fail(text, f"{host!r} is not a registry host")
    if not all(_OLLAMA_PART.match(part) for part in path):
        raise _fail(text, "expected an Ollama name: [host/][namespace/]model[:tag]")
    if tag and not _OCI_TAG.match(tag):
        raise _fail(text, f"{tag!r} is not a valid tag")
    return _parse_oci(text, f"{host}/{'/'.join(path).lower()}:{tag or 'latest'}")


def parse_ref(text: str, *, cwd: Path | None = None, ollama_registry: str | None = None) -> ModelRef:
    """Parse and normalise a ModelRef; raise InvalidModelRef saying what is wrong.

    With ``ollama_registry``, a text that is no other form is read as an Ollama name on it."""
    if not text or not text.strip():
        raise _fail(text, "it is empty")
    if len(text) > MAX_REF_LENGTH:
        raise _fail(text, f"it is longer than {MAX_REF_LENGTH} characters")
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise _fail(text, "it contains NUL or control characters")
    text = text.strip()
    lowered = text.lower()

    if text.startswith(("/", "./", "../", "~/")) or text in (".", ".."):
        base = cwd if cwd is not None else Path.cwd()
        return FileRef(path=Path(base, Path(text).expanduser()).resolve(strict=False))
    if lowered.startswith("file:"):
        path = text[len("file:") :].removeprefix("//")
        if not path.startswith("/"):
            raise _fail(text, "file: refs need an absolute path (file:/abs/x.gguf)")
        if any(segment == ".." for segment in path.split("/")):
            raise _fail(text, "file: refs may not contain '..'")
        return FileRef(path=Path(path))
    if lowered.startswith("hf:"):
        return _parse_hf(text, text[3:].removeprefix("//"))
    if lowered.startswith(("https://", "http://")):
        return _parse_url(text)
    if lowered.startswith("s3://"):
        return _parse_s3(text, text[5:])
    if lowered.startswith("oci://"):
        return _parse_oci(text, text[6:])
    if lowered.startswith("sha256:"):
        return DigestRef(digest=parse_digest(text))
    scheme, sep, rest = text.partition(":")
    if ollama_registry is not None and not rest.startswith("//"):
        return parse_ollama_name(text, registry=ollama_registry)
    if sep and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*$", scheme):
        raise _fail(text, f"unknown scheme {scheme!r}")
    raise _fail(text, "not a known form; for a local file write ./name.gguf or an absolute path")
