"""The sources a pull fetches from: one entry per network scheme of the ModelRef grammar.

Every entry has the same two functions, so nothing else picks a source with an ``isinstance`` chain:

    resolve(ref, options, new_client) -> Plan    the files the ref stands for (a hub's metadata, an
                                                 S3 HEAD, a registry's manifest; a URL is one file)
    origin(ref) -> (scheme, host)                what the allow and deny lists match (policy.py)

``source_for(ref)`` finds the entry of a ref; a file or a digest ref has none (it needs no network).
May import: errors, names, refs, settings, and the resolvers (hub, s3, oci) with what they return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

import httpx

from appliance.errors import SchemeNotSupported
from appliance.names import name_from_filename
from appliance.provision.hub import resolve_hf
from appliance.provision.oci import resolve_oci
from appliance.provision.plan import Plan
from appliance.provision.s3 import resolve_s3
from appliance.provision.transfer import RemoteFile
from appliance.refs import HfRef, ModelRef, OciRef, S3Ref, UrlRef
from appliance.settings import DownloadSettings

__all__ = ["SOURCES", "ClientFactory", "Source", "source_for"]

R = TypeVar("R")
ClientFactory = Callable[[], httpx.Client]  # a client that holds every redirect to the policy


@dataclass(frozen=True)
class Source(Generic[R]):
    scheme: str
    ref_type: type[R]
    resolve: Callable[[R, DownloadSettings, ClientFactory], Plan]
    origin: Callable[[R], tuple[str, str]]


def _resolve_url(ref: UrlRef, options: DownloadSettings, new_client: ClientFactory) -> Plan:
    filename = unquote(urlsplit(ref.url).path.rsplit("/", 1)[-1]) or "download"
    return Plan([RemoteFile(url=ref.url, filename=filename)], name_from_filename(filename))


def _url_origin(ref: UrlRef) -> tuple[str, str]:
    split = urlsplit(ref.url)
    return split.scheme, split.netloc


SOURCES: tuple[Source[Any], ...] = (
    Source("http(s)", UrlRef, _resolve_url, _url_origin),
    # the hub and S3 clients make their own connections: they need no client of ours
    Source("hf", HfRef, lambda ref, options, _: resolve_hf(ref, options), lambda ref: ("hf", "")),
    Source("s3", S3Ref, lambda ref, options, _: resolve_s3(ref, options), lambda ref: ("s3", ref.bucket)),
    Source("oci", OciRef, resolve_oci, lambda ref: ("oci", ref.registry)),
)
_BY_TYPE: dict[type[Any], Source[Any]] = {source.ref_type: source for source in SOURCES}


def source_for(ref: ModelRef) -> Source[Any]:
    source = _BY_TYPE.get(type(ref))
    if source is None:
        raise SchemeNotSupported(f"{ref} is not a network ref")
    return source
