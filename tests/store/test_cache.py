"""The blob cache: hash while writing, verify, fsync, atomic rename; nothing partial is ever visible."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import (
    DigestMismatch,
    DiskFull,
    InvalidInput,
    LayoutTooNew,
    SourceUnreadable,
    StorageFailure,
)
from appliance.store import cache as cache_module
from appliance.store.cache import LAYOUT_VERSION, BlobCache
from tests.locks import wait_for_flock_waiter


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def visible(cache: BlobCache) -> list[str]:
    return sorted(os.listdir(cache.blobs_dir))


def staging(cache: BlobCache) -> list[str]:
    return sorted(os.listdir(cache.tmp_dir))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.bin"
    path.write_bytes(os.urandom(3 * cache_module.CHUNK_BYTES + 12345))  # several chunks and a ragged tail
    return path


@pytest.fixture
def cache(data_dir: Path) -> BlobCache:
    return BlobCache(data_dir)


@pytest.fixture(params=["in-kernel", "kernel-refuses", "kernel-copies-nothing"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way a copy can go: copy_file_range, or read and write where the kernel refuses it
    or (as on some FUSE filesystems) answers that it copied nothing."""

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "refused by the test")

    def copy_nothing(*args: object) -> int:
        return 0

    if request.param == "kernel-refuses":
        monkeypatch.setattr(os, "copy_file_range", refuse)
    if request.param == "kernel-copies-nothing":
        monkeypatch.setattr(os, "copy_file_range", copy_nothing)
    return str(request.param)


def test_copy_hashes_in_the_same_pass_and_places_a_read_only_blob(
    cache: BlobCache, source: Path, copy_path: str
) -> None:
    """REQ-MODELS-0101/0102: content-addressed by sha256, size recorded."""
    seen: list[int] = []
    staged = cache.stage(source, allow_link=False, on_progress=seen.append)
    assert staged.method == "copy"
    assert staged.digest == sha256_of(source)
    assert staged.size == source.stat().st_size
    assert seen[-1] == staged.size
    assert visible(cache) == []  # staged content is not visible yet
    path = cache.place(staged)
    assert path == cache.path(staged.digest)
    assert sha256_of(path) == staged.digest
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert path.stat().st_ino != source.stat().st_ino
    assert staging(cache) == []


def test_by_default_the_blob_never_shares_an_inode_with_the_source(cache: BlobCache, data_dir: Path) -> None:
    """A reflink (copy-on-write) or a copy: writes to the user's file, even root's, never reach the blob."""
    source = data_dir.parent / "same-fs.bin"
    source.write_bytes(os.urandom(100_000))
    mode = stat.S_IMODE(source.stat().st_mode)
    staged = cache.stage(source)
    assert staged.method in ("reflink", "copy")
    path = cache.place(staged)
    digest = staged.digest
    assert path.stat().st_ino != source.stat().st_ino
    assert stat.S_IMODE(source.stat().st_mode) == mode  # the user's file is left as it was
    with source.open("ab") as handle:
        handle.write(b"appended later")
    assert sha256_of(path) == digest


def test_an_asked_for_hard_link_protects_and_records_the_shared_inode(
    cache: BlobCache, data_dir: Path
) -> None:
    source = data_dir.parent / "same-fs.bin"
    source.write_bytes(os.urandom(100_000))
    staged = cache.stage(source, hard_link=True)
    assert staged.method in ("reflink", "hardlink")
    path = cache.place(staged)
    assert sha256_of(path) == sha256_of(source)
    if staged.method == "hardlink":
        assert path.stat().st_ino == source.stat().st_ino
        assert stat.S_IMODE(source.stat().st_mode) == 0o444  # the shared inode is protected from edits
        assert staged.link_stat == cache.link_stat(staged.digest)
        with source.open("ab") as handle:  # root can still write: the recorded identity shows it
            handle.write(b"appended later")
        assert staged.link_stat != cache.link_stat(staged.digest)


def test_a_hard_linked_source_written_to_while_it_is_hashed_is_not_placed(
    cache: BlobCache, data_dir: Path
) -> None:
    source = data_dir.parent / "same-fs.bin"
    source.write_bytes(os.urandom(3 * cache_module.CHUNK_BYTES))

    def write_once(done: int) -> None:
        if done == cache_module.CHUNK_BYTES:
            with source.open("r+b") as handle:
                handle.write(b"changed")

    staged = cache.stage(source, hard_link=True, on_progress=write_once)
    if staged.method != "hardlink":
        pytest.skip("this filesystem reflinks, so nothing is hard-linked")
    with pytest.raises(SourceUnreadable, match="written to while it was imported"):
        cache.place(staged)
    assert visible(cache) == []
    assert staging(cache) == []
    assert stat.S_IMODE(source.stat().st_mode) == 0o644  # a failed import leaves the file as it was


def test_a_hard_link_to_another_users_file_is_refused(cache: BlobCache, data_dir: Path) -> None:
    source = data_dir.parent / "theirs.bin"
    source.write_bytes(os.urandom(1000))
    probe = cache.stage(source)
    probe.close()
    if probe.method == "reflink":
        pytest.skip("this filesystem reflinks, so nothing is hard-linked")
    os.chown(source, os.geteuid() + 12345, -1)
    with pytest.raises(InvalidInput, match="not to the user the appliance runs as") as caught:
        cache.stage(source, hard_link=True)
    assert "without --link" in caught.value.hint
    assert stat.S_IMODE(source.stat().st_mode) == 0o644
    assert staging(cache) == []
    assert cache.stage(source).method in ("reflink", "copy")  # without --link it imports


def test_same_content_twice_is_one_blob(cache: BlobCache, source: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin.bin"
    twin.write_bytes(source.read_bytes())
    first = cache.place(cache.stage(source, allow_link=False))
    second = cache.place(cache.stage(twin, allow_link=False))
    assert first == second
    assert len(visible(cache)) == 1
    assert staging(cache) == []


def test_digest_mismatch_leaves_nothing(cache: BlobCache, source: Path) -> None:
    with pytest.raises(DigestMismatch, match="expected sha256:0000"):
        cache.stage(source, allow_link=False, expected_digest="sha256:" + "0" * 64)
    assert visible(cache) == []
    assert staging(cache) == []


def test_disk_full_mid_write_leaves_nothing(
    cache: BlobCache, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk fills after the first chunk, whichever way the copy writes (in the kernel or through a buffer).
    written: list[int] = []
    real_write_all = cache_module._write_all
    real_copy_range = os.copy_file_range

    def fill_up(fd: int, data: memoryview) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        real_write_all(fd, data)

    def fill_up_in_kernel(src: int, dst: int, count: int, *args: object) -> int:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(count)
        return real_copy_range(src, dst, count)

    monkeypatch.setattr(cache_module, "_write_all", fill_up)
    monkeypatch.setattr(os, "copy_file_range", fill_up_in_kernel)
    with pytest.raises(DiskFull, match="no space left"):
        cache.stage(source, allow_link=False)
    assert staging(cache) == []
    assert visible(cache) == []


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs (the tests run as root in CI)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_file_larger_than_the_free_space_is_refused_up_front(
    small_filesystem: Path, tmp_path: Path
) -> None:
    cache = BlobCache(small_filesystem / "data")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    with pytest.raises(DiskFull, match="needs 3145728 bytes"):
        cache.stage(big, allow_link=False)
    assert staging(cache) == []
    assert visible(cache) == []


def test_stale_staging_files_are_collected_but_live_ones_kept(cache: BlobCache) -> None:
    live_path, live_fd = cache._new_staging_file(".partial")  # held by an import in flight
    dead = cache.tmp_dir / "dead.partial"
    dead.write_bytes(b"x" * 100)  # left by a killed process: nobody holds its lock
    allocated = dead.stat().st_blocks * 512
    unrelated = cache.tmp_dir / "VERSION.tmp"
    unrelated.write_text("1")
    assert cache.remove_stale_staging() == (1, allocated)
    assert live_path.exists()
    assert not dead.exists()
    os.close(live_fd)
    assert cache.remove_stale_staging() == (1, 0)


def test_gc_reports_the_bytes_a_partial_really_held_and_takes_its_state_and_lock(cache: BlobCache) -> None:
    cache.downloads_dir.mkdir()
    sparse = cache.downloads_dir / "k1.partial"
    with sparse.open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)  # a resumable download's nominal size, barely written
        handle.write(b"x" * 10_000)
    state = cache.downloads_dir / "k1.state.json"
    state.write_text("{}")
    orphan_state = cache.downloads_dir / "k2.state.json"  # its partial is already gone
    orphan_state.write_text("{}")
    dead_lock = cache.downloads_dir / "k1.lock"
    dead_lock.touch()
    expected = sum(path.stat().st_blocks * 512 for path in (sparse, state, orphan_state))
    assert expected < 1024 * 1024
    assert cache.remove_stale_staging() == (1, expected)
    assert os.listdir(cache.downloads_dir) == []


def test_gc_keeps_a_pull_lock_that_is_held(cache: BlobCache) -> None:
    cache.downloads_dir.mkdir()
    held = cache.downloads_dir / "k3.lock"
    fd = os.open(held, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert cache.remove_stale_staging() == (0, 0)
        assert held.exists()
    finally:
        os.close(fd)
    cache.remove_stale_staging()
    assert not held.exists()


def test_deleting_waits_for_placing(cache: BlobCache) -> None:
    order: list[str] = []

    def delete() -> None:
        with cache.deleting():
            order.append("deleted")

    with cache.placing():
        deleter = threading.Thread(target=delete)
        deleter.start()
        wait_for_flock_waiter(cache.data_dir / "cache.lock")
        order.append("placed")
    deleter.join(timeout=5)
    assert order == ["placed", "deleted"]


def test_layout_version_is_written_and_a_newer_one_refused(data_dir: Path) -> None:
    BlobCache(data_dir)
    assert (data_dir / "VERSION").read_text().strip() == str(LAYOUT_VERSION)
    (data_dir / "VERSION").write_text(str(LAYOUT_VERSION + 1))
    with pytest.raises(LayoutTooNew, match="knows layouts up to"):
        BlobCache(data_dir)
    (data_dir / "VERSION").write_text("garbage")
    with pytest.raises(StorageFailure, match="damaged"):
        BlobCache(data_dir)


def test_quarantine_moves_the_blob_out_of_sight(cache: BlobCache, source: Path) -> None:
    path = cache.place(cache.stage(source, allow_link=False))
    digest = "sha256:" + path.name
    moved = cache.quarantine(digest)
    assert not cache.has(digest)
    assert moved.exists()


def test_a_download_partial_moved_away_while_waiting_for_its_lock_is_not_reused(
    cache: BlobCache, tmp_path: Path
) -> None:
    path, fd = cache.open_download("same-url")
    os.write(fd, b"finished content")
    opened: list[tuple[Path, int]] = []
    waiter = threading.Thread(target=lambda: opened.append(cache.open_download("same-url")))
    waiter.start()
    wait_for_flock_waiter(path)
    placed = tmp_path / "placed-blob"
    os.rename(path, placed)  # what placing a finished download does
    os.close(fd)
    waiter.join(timeout=10)
    ((again, again_fd),) = opened
    try:
        assert again == path
        assert os.fstat(again_fd).st_size == 0  # a new partial, not the placed blob
        assert os.fstat(again_fd).st_ino != placed.stat().st_ino
        assert placed.read_bytes() == b"finished content"
    finally:
        os.close(again_fd)


def test_received_pieces_are_placed_only_once_they_match_their_digest(cache: BlobCache) -> None:
    content = b"GGUF" + os.urandom(3000)
    digest = "sha256:" + hashlib.sha256(content).hexdigest()
    with cache.receive() as incoming:
        for start in range(0, len(content), 1000):
            incoming.write(content[start : start + 1000])
            assert visible(cache) == []  # nothing partial is ever visible
        placed = incoming.finish(digest)
    assert placed.read_bytes() == content
    assert visible(cache) == [digest.removeprefix("sha256:")]
    assert stat.S_IMODE(placed.stat().st_mode) == 0o444
    assert staging(cache) == []


def test_received_content_that_hashes_otherwise_leaves_nothing(cache: BlobCache) -> None:
    claimed = "sha256:" + hashlib.sha256(b"what the sender said").hexdigest()
    with cache.receive() as incoming:
        incoming.write(b"what the sender sent")
        with pytest.raises(InvalidInput, match="digest mismatch") as refused:
            incoming.finish(claimed)
    assert "sha256 is in the path" in refused.value.hint
    assert visible(cache) == []
    assert staging(cache) == []


def test_a_receive_in_flight_is_not_a_stale_partial(cache: BlobCache) -> None:
    with cache.receive() as incoming:
        incoming.write(b"half")
        assert cache.remove_stale_staging() == (0, 0)
        assert len(staging(cache)) == 1
    assert staging(cache) == []
