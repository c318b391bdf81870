"""ModelRef parsing: every form of ARCHITECTURE.md's grammar, normalised; bad refs rejected clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.errors import InvalidModelRef
from appliance.refs import (
    DigestRef,
    FileRef,
    HfRef,
    OciRef,
    S3Ref,
    UrlRef,
    parse_digest,
    parse_ollama_name,
    parse_ref,
)

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("./x.gguf", FileRef(Path("/work/x.gguf")), "file:/work/x.gguf"),
        ("../models/x.gguf", FileRef(Path("/models/x.gguf")), "file:/models/x.gguf"),
        ("/abs/x.gguf", FileRef(Path("/abs/x.gguf")), "file:/abs/x.gguf"),
        ("file:/abs/x.gguf", FileRef(Path("/abs/x.gguf")), "file:/abs/x.gguf"),
        ("file:///abs/x.gguf", FileRef(Path("/abs/x.gguf")), "file:/abs/x.gguf"),
        (
            "hf:TheBloke/TinyLlama-GGUF/tinyllama.Q4_K_M.gguf",
            HfRef("TheBloke/TinyLlama-GGUF", "tinyllama.Q4_K_M.gguf"),
            "hf:TheBloke/TinyLlama-GGUF/tinyllama.Q4_K_M.gguf",
        ),
        (
            "hf:org/repo/sub/dir/model.gguf@v1.0",
            HfRef("org/repo", "sub/dir/model.gguf", "v1.0"),
            "hf:org/repo/sub/dir/model.gguf@v1.0",
        ),
        ("hf:org/repo", HfRef("org/repo"), "hf:org/repo"),
        ("hf:org/repo@refs/pr/1", HfRef("org/repo", None, "refs/pr/1"), "hf:org/repo@refs/pr/1"),
        (
            "HTTPS://Example.COM/m/x.gguf",
            UrlRef("https://example.com/m/x.gguf"),
            "https://example.com/m/x.gguf",
        ),
        ("http://10.0.0.5:8000/x.gguf?x=1", UrlRef("http://10.0.0.5:8000/x.gguf?x=1"), None),
        ("s3://my-bucket/models/x.gguf", S3Ref("my-bucket", "models/x.gguf"), "s3://my-bucket/models/x.gguf"),
        (
            "oci://registry.ollama.ai/library/llama3:8b",
            OciRef("registry.ollama.ai", "library/llama3", "8b"),
            "oci://registry.ollama.ai/library/llama3:8b",
        ),
        (
            "oci://localhost:5000/models/tiny",
            OciRef("localhost:5000", "models/tiny", "latest"),
            "oci://localhost:5000/models/tiny:latest",
        ),
        (
            f"oci://localhost:5000/models/tiny@sha256:{HEX}",
            OciRef("localhost:5000", "models/tiny", None, f"sha256:{HEX}"),
            f"oci://localhost:5000/models/tiny@sha256:{HEX}",
        ),
        (f"sha256:{HEX.upper()}", DigestRef(f"sha256:{HEX}"), f"sha256:{HEX}"),
    ],
)
def test_every_form_parses_to_its_canonical_ref(text: str, expected: object, canonical: str | None) -> None:
    ref = parse_ref(text, cwd=Path("/work"))
    assert ref == expected
    assert str(ref) == (canonical or text)
    assert parse_ref(str(ref), cwd=Path("/work")) == ref  # the canonical form parses to itself


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ftp://host/x.gguf", "unknown scheme 'ftp'"),
        ("gopher:x", "unknown scheme"),
        ("x.gguf", "for a local file write ./name.gguf"),
        ("llama3", "not a known form"),
        ("hf:org", "expected hf:org/repo"),
        ("hf:org/repo/../../etc/passwd", "'..'"),
        ("hf:org/..", "not a valid organisation or repository name"),
        ("hf:org/repo@../main", "is not a branch"),
        ("hf:org/repo/a\x00b", "NUL"),
        ("https://host/a/../b", "'..'"),
        ("https://user:secret@host/x.gguf", "credentials"),
        ("https:///x.gguf", "no valid host"),
        ("s3://Bad_Bucket/key", "not a valid bucket"),
        ("s3://bucket", "expected s3://bucket/key"),
        ("s3://bucket/a/../b", "'..'"),
        ("oci://registry", "expected oci://registry/repository"),
        ("oci://registry/UPPER/case", "lowercase"),
        ("oci://registry/repo:bad tag", "not a valid tag"),
        ("oci://registry/repo@sha256:123", "64 hex digits"),
        ("sha256:xyz", "64 hex digits"),
        ("md5:" + "a" * 32, "unknown scheme 'md5'"),
        ("file:relative/x.gguf", "absolute path"),
        ("file:/a/../etc/passwd", "'..'"),
        ("/abs/x\x00.gguf", "NUL"),
        ("/abs/" + "a" * 3000, "longer than 2048"),
    ],
)
def test_bad_refs_are_rejected_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidModelRef) as caught:
        parse_ref(text)
    assert reason in str(caught.value) or reason in caught.value.hint
    assert caught.value.code == "invalid_model_ref"
    assert caught.value.status == 400


def test_credentials_never_echoed_in_the_error() -> None:
    with pytest.raises(InvalidModelRef) as caught:
        parse_ref("https://user:hunter2@host/x.gguf")
    assert "hunter2" not in str(caught.value)


def test_parse_digest_normalises_case() -> None:
    assert parse_digest(f"SHA256:{HEX.upper()}") == f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("llama3.2", "oci://registry.ollama.ai/library/llama3.2:latest"),
        ("qwen3:4b", "oci://registry.ollama.ai/library/qwen3:4b"),
        ("User/Model:Tag", "oci://registry.ollama.ai/user/model:Tag"),
        ("mirror.lan:5000/team/tiny", "oci://mirror.lan:5000/team/tiny:latest"),
        ("127.0.0.1:5000/library/tiny:q8_0", "oci://127.0.0.1:5000/library/tiny:q8_0"),
        ("hf.co/Org/Repo-GGUF:Q4_K_M", "oci://hf.co/org/repo-gguf:Q4_K_M"),
    ],
)
def test_an_ollama_name_is_an_oci_ref_on_the_ollama_registry(text: str, canonical: str) -> None:
    assert str(parse_ref(text, ollama_registry="registry.ollama.ai")) == canonical
    assert str(parse_ollama_name(text, registry="registry.ollama.ai")) == canonical


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a/b/c/d", "at most three parts"),
        ("bad name!", "expected an Ollama name"),
        ("model:bad tag", "is not a valid tag"),
        ("ftp://host/x", "unknown scheme 'ftp'"),
    ],
)
def test_what_is_no_ollama_name_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidModelRef, match=reason):
        parse_ref(text, ollama_registry="registry.ollama.ai")


def test_without_a_registry_an_ollama_name_is_no_ref() -> None:
    with pytest.raises(InvalidModelRef, match="not a known form"):
        parse_ref("llama3.2")
