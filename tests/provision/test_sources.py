"""One source per network scheme: what resolves a ref and what the source policy matches."""

from __future__ import annotations

import pytest

from appliance.errors import SchemeNotSupported
from appliance.provision.sources import SOURCES, source_for
from appliance.refs import parse_ref


@pytest.mark.parametrize(
    ("ref", "scheme", "origin"),
    [
        ("https://Example.com:8443/m/x.gguf", "http(s)", ("https", "example.com:8443")),
        ("http://mirror.lan/x.gguf", "http(s)", ("http", "mirror.lan")),
        ("hf:org/repo/x.gguf", "hf", ("hf", "")),
        ("s3://bucket/key/x.gguf", "s3", ("s3", "bucket")),
        ("oci://registry.lan:5000/library/tiny:1", "oci", ("oci", "registry.lan:5000")),
    ],
)
def test_each_network_ref_has_one_source(ref: str, scheme: str, origin: tuple[str, str]) -> None:
    parsed = parse_ref(ref)
    assert [source.scheme for source in SOURCES if isinstance(parsed, source.ref_type)] == [scheme]
    assert source_for(parsed).origin(parsed) == origin


@pytest.mark.parametrize("ref", ["/abs/x.gguf", "sha256:" + "a" * 64])
def test_refs_that_need_no_network_have_no_source(ref: str) -> None:
    with pytest.raises(SchemeNotSupported, match="not a network ref"):
        source_for(parse_ref(ref))
