"""A worker's blob fetch: from the server's blob route only, resumable, verified before it is placed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.cluster.fetch import BlobFetcher
from appliance.errors import DigestMismatch, InvalidInput, RemoteNotFound, SourceNotAllowed
from appliance.settings import DownloadSettings
from appliance.store.cache import BlobCache
from tests.fileserver import Faults, FileServer, serve_files

CREDENTIAL = "apnode_" + "x" * 43
CONTENT = bytes(range(256)) * 12_000  # ~3 MiB: several Range parts of 1 MiB
DIGEST = "sha256:" + hashlib.sha256(CONTENT).hexdigest()
ROUTE = f"/api/v1/blobs/{DIGEST}"


@pytest.fixture
def files() -> Iterator[FileServer]:
    with serve_files() as server:
        server.require_authorization = (f"Bearer {CREDENTIAL}", "Bearer", set())
        yield server


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    return BlobCache(tmp_path / "worker")


def fetcher(files: FileServer, cache: BlobCache) -> BlobFetcher:
    options = DownloadSettings(connections=2, part_bytes=1024 * 1024, retries=3)
    return BlobFetcher(files.url, CREDENTIAL, cache, options)


def leftovers(cache: BlobCache) -> list[str]:
    return sorted(path.name for path in cache.downloads_dir.iterdir()) if cache.downloads_dir.exists() else []


def test_a_blob_comes_from_the_servers_route_with_the_credential(files: FileServer, cache: BlobCache) -> None:
    files.add(ROUTE, CONTENT, Faults(etag=f'"{DIGEST}"'))
    path = fetcher(files, cache).fetch(DIGEST)
    assert path == cache.path(DIGEST)
    assert path.read_bytes() == CONTENT
    assert {hit.authorization for hit in files.hits_for(ROUTE)} == {f"Bearer {CREDENTIAL}"}
    assert len(files.body_requests(ROUTE)) >= 2  # Range parts
    assert leftovers(cache) == []
    before = len(files.hits)
    fetcher(files, cache).fetch(DIGEST)  # cached: no request at all
    assert len(files.hits) == before


def test_a_dropped_connection_resumes_where_it_stopped(files: FileServer, cache: BlobCache) -> None:
    files.add(ROUTE, CONTENT, Faults(drop_after=300_000, faulty_responses=1))
    assert fetcher(files, cache).fetch(DIGEST).read_bytes() == CONTENT
    assert leftovers(cache) == []


def test_bytes_that_do_not_hash_to_the_digest_are_discarded(files: FileServer, cache: BlobCache) -> None:
    files.add(ROUTE, CONTENT, Faults(corrupt=True))
    with pytest.raises(DigestMismatch, match="they were discarded"):
        fetcher(files, cache).fetch(DIGEST)
    assert not cache.has(DIGEST)
    assert cache.blob_files() == {}
    assert leftovers(cache) == []


def test_a_redirect_is_refused_not_followed(files: FileServer, cache: BlobCache) -> None:
    elsewhere = files.add("/elsewhere", CONTENT)
    files.redirects[ROUTE] = elsewhere
    with pytest.raises(SourceNotAllowed, match="fetches blobs from its server's cache only"):
        fetcher(files, cache).fetch(DIGEST)
    assert files.hits_for("/elsewhere") == []
    assert not cache.has(DIGEST)


def test_a_blob_the_server_lacks_is_not_found(files: FileServer, cache: BlobCache) -> None:
    with pytest.raises(RemoteNotFound):
        fetcher(files, cache).fetch(DIGEST)


@pytest.mark.parametrize(
    "digest", ["sha256:abc", "../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "a" * 32]
)
def test_only_a_digest_names_a_blob(files: FileServer, cache: BlobCache, digest: str) -> None:
    with pytest.raises(InvalidInput, match="not a blob digest"):
        fetcher(files, cache).fetch(digest)
    assert files.hits == []
