"""A bundle altered or cut short is refused, naming the entry, and nothing from it is registered."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.bundles.conftest import Appliance, member_offsets
from tests.conftest import APPLIANCE


def _first_large_blob(offsets: dict[str, tuple[int, int]]) -> tuple[str, int, int]:
    """The first blob in the tar too large to be held in memory (a GGUF): it streams into the cache."""
    name = next(
        name for name, (_, size) in offsets.items() if name.startswith("blobs/") and size > 1024 * 1024
    )
    return name, *offsets[name]


def test_one_flipped_byte_is_refused_naming_the_entry(
    bundle_tar: Path, target: Appliance, tmp_path: Path
) -> None:
    name, offset, size = _first_large_blob(member_offsets(bundle_tar))
    damaged = tmp_path / "damaged.tar"
    shutil.copyfile(bundle_tar, damaged)
    with damaged.open("r+b") as handle:
        handle.seek(offset + size // 2)
        byte = handle.read(1)
        handle.seek(offset + size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    refused = target("bundle", "import", str(damaged))
    assert refused.returncode == 1
    assert f"error: {name} does not match its digest: the bundle was altered" in refused.stderr
    assert "hint: copy the bundle again" in refused.stderr
    assert target.models() == {}


def test_a_flipped_byte_in_a_directory_bundle_is_refused(
    source_dir: Path, target: Appliance, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    assert Appliance(source_dir)("bundle", "export", "-o", str(layout)).returncode == 0
    blob = max((layout / "blobs" / "sha256").iterdir(), key=lambda path: path.stat().st_size)
    content = bytearray(blob.read_bytes())
    content[100] ^= 0x80
    blob.write_bytes(bytes(content))
    refused = target("bundle", "import", str(layout))
    assert refused.returncode == 1
    assert f"blobs/sha256/{blob.name} does not match its digest" in refused.stderr
    assert target.models() == {}


def test_a_truncated_bundle_is_refused_naming_the_entry(
    bundle_tar: Path, target: Appliance, tmp_path: Path
) -> None:
    name, offset, size = _first_large_blob(member_offsets(bundle_tar))
    cut = tmp_path / "cut.tar"
    with bundle_tar.open("rb") as source, cut.open("wb") as handle:
        handle.write(source.read(offset + size // 2))  # ends inside the first large blob
    refused = target("bundle", "import", str(cut))
    assert refused.returncode == 1
    assert f"error: {name} is cut short: the bundle is truncated" in refused.stderr
    assert target.models() == {}

    before_index = tmp_path / "no-index.tar"
    index_offset = member_offsets(bundle_tar)["index.json"][0]
    with bundle_tar.open("rb") as source, before_index.open("wb") as handle:
        handle.write(source.read(index_offset - 512))  # every blob, but no index: an export that died
    refused = target("bundle", "import", str(before_index))
    assert refused.returncode == 1
    assert "error: index.json is missing: the bundle is truncated or incomplete" in refused.stderr
    assert target.models() == {}


def test_an_import_killed_halfway_resumes_and_skips_what_it_verified(
    bundle_tar: Path, source_models: dict[str, list[str]], target: Appliance
) -> None:
    offsets = member_offsets(bundle_tar)
    name, offset, size = _first_large_blob(offsets)
    importing = subprocess.Popen(
        [*APPLIANCE, "--data-dir", str(target.data_dir), "bundle", "import", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert importing.stdin is not None
    try:
        with bundle_tar.open("rb") as source:
            # past the first large blob, with room for the reader's read-ahead, well before the next one
            importing.stdin.write(source.read(offset + size + 64 * 1024))
            importing.stdin.flush()
        placed = target.data_dir / name
        deadline = time.monotonic() + 60
        while not placed.exists():  # verified and in the cache; the rest has not come yet
            assert time.monotonic() < deadline, "the first blob never reached the cache"
            time.sleep(0.05)
    finally:
        os.kill(importing.pid, signal.SIGKILL)
        importing.wait()
        importing.stdin.close()
    assert target.models() == {}  # killed before phase two: nothing registered

    resumed = target("bundle", "import", str(bundle_tar))
    assert resumed.returncode == 0, resumed.stderr
    assert "1 skipped: already in the cache" in resumed.stdout
    assert target.models() == source_models
