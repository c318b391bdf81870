"""Model import speed against reference tools, measured in the same run.

Run from the repo root:

    .venv/bin/python bench/ingest.py [--size-gib 2] [--repeat 3] [--workdir DIR] [--breakdown]
    make bench

It writes a GGUF file of about ``--size-gib`` GiB, then times, ``--repeat`` times each and
interleaved: ``openssl dgst -sha256`` (the hashing limit), ``cp`` and ``cp`` plus an fsync of the
copy (the copying limits), and ``ModelService.import_file`` with ``allow_link=False`` (copy) and
``hard_link=True`` (reflink or hard link, hashed once). Before every timed run, dirty pages are
flushed (``sync``) and the source is read once, so every tool reads it from the page cache.
``--breakdown`` also times the pieces of the copy path (staging alone, ``_copy_and_hash``
without the fsync, a copy through a buffer and one inside the kernel, hashing alone). Each
copy import's line also says where its time went: the copier's ``copy_file_range`` calls, the
hash thread's reading back and hashing and its handing chunks to writeback, and what follows
the copy (fsync, registration). Medians
are printed with the ratios and PASS/MISS against the targets; the exit status is 0 whatever
the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from appliance.audit import Context
from appliance.runtime import Runtime
from appliance.settings import Settings
from appliance.store import cache as cache_module
from appliance.store.cache import CHUNK_BYTES, BlobCache, _copy_and_hash, _hash_fd, _write_all

GIB = 1 << 30
# A case gets the source and an empty scratch dir and returns (seconds, note); only the work
# being measured is inside its timer.
Case = Callable[[Path, Path], tuple[float, str]]


def make_source(path: Path, size: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny_model import write_llama_gguf  # needs the repo root on sys.path

    write_llama_gguf(path, padding_bytes=max(size - (1 << 20), 0))


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def warm(path: Path) -> None:
    with path.open("rb", buffering=0) as handle:
        while handle.read(CHUNK_BYTES):
            pass


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def command(*argv: str | Path, fsync: Path | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    subprocess.run([str(arg) for arg in argv], check=True, stdout=subprocess.DEVNULL)
    if fsync is not None:
        fsync_file(fsync)
    return time.perf_counter() - start, ""


class CopySplit:
    """Where a copy import's time goes, timed around the cache's own functions: the copier's
    ``copy_file_range`` calls (the kernel throttles them when writeback falls behind); on the
    hash thread, reading each written chunk back and hashing it, and handing it to writeback
    (``FADV_DONTNEED``, which waits when the disk's queue is full); and what follows the copy
    (the fsync, the registration)."""

    def __init__(self) -> None:
        self.copy_seconds = 0.0
        self.hash_seconds = 0.0
        self.thread_seconds = 0.0
        self.phase_seconds = 0.0

    def __enter__(self) -> CopySplit:
        hash_range, hash_written = cache_module._hash_range, cache_module._hash_written
        copy_and_hash, copy_file_range = cache_module._copy_and_hash, os.copy_file_range

        def timed_copy_and_hash(*args: Any) -> tuple[str, int]:
            start = time.perf_counter()
            try:
                return copy_and_hash(*args)
            finally:
                self.phase_seconds += time.perf_counter() - start

        def timed_copy_file_range(*args: Any) -> int:
            start = time.perf_counter()
            try:
                return copy_file_range(*args)
            finally:
                self.copy_seconds += time.perf_counter() - start

        def timed_hash_range(*args: Any) -> None:
            start = time.perf_counter()
            hash_range(*args)
            self.hash_seconds += time.perf_counter() - start

        def timed_hash_written(*args: Any) -> None:
            start = time.perf_counter()
            hash_written(*args)
            self.thread_seconds += time.perf_counter() - start

        self._saved = hash_range, hash_written, copy_and_hash, copy_file_range
        cache_module._hash_range, cache_module._hash_written = timed_hash_range, timed_hash_written
        cache_module._copy_and_hash, os.copy_file_range = timed_copy_and_hash, timed_copy_file_range
        return self

    def __exit__(self, *exc: object) -> None:
        (
            cache_module._hash_range,
            cache_module._hash_written,
            cache_module._copy_and_hash,
            os.copy_file_range,
        ) = self._saved

    def note(self, total: float) -> str:
        writeback = self.thread_seconds - self.hash_seconds
        return (
            f"copier {self.copy_seconds:.2f}s; hash thread: read-back hash {self.hash_seconds:.2f}s,"
            f" writeback hand-off {writeback:.2f}s; after the copy {total - self.phase_seconds:.2f}s"
        )


def importing(allow_link: bool) -> Case:
    def run(source: Path, scratch: Path) -> tuple[float, str]:
        runtime = Runtime.open(Settings(data_dir=scratch / "data"))
        try:
            name = "bench:link" if allow_link else "bench:copy"
            with CopySplit() as split:
                start = time.perf_counter()
                result = runtime.models.import_file(
                    source, Context(actor="bench"), name=name, allow_link=allow_link, hard_link=allow_link
                )
                elapsed = time.perf_counter() - start
        finally:
            runtime.close()
        return elapsed, result.method if allow_link else f"{result.method}; {split.note(elapsed)}"

    return run


def stage_only(source: Path, scratch: Path) -> tuple[float, str]:
    cache = BlobCache(scratch / "data")
    start = time.perf_counter()
    staged = cache.stage(source, allow_link=False)
    elapsed = time.perf_counter() - start
    staged.close()
    return elapsed, staged.method


def fd_case(work: Callable[[int, int], object], *, then_fsync: bool = False) -> Case:
    """Time ``work(src_fd, dst_fd)`` on raw descriptors; notes the fsync that would follow."""

    def run(source: Path, scratch: Path) -> tuple[float, str]:
        src = os.open(source, os.O_RDONLY)
        dst = os.open(scratch / "out", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            start = time.perf_counter()
            work(src, dst)
            elapsed = time.perf_counter() - start
            note = ""
            if then_fsync:
                start = time.perf_counter()
                os.fsync(dst)
                note = f"then fsync {time.perf_counter() - start:.2f}s"
        finally:
            os.close(src)
            os.close(dst)
        return elapsed, note

    return run


def plain_copy(src: int, dst: int) -> None:
    buffer = bytearray(CHUNK_BYTES)
    while count := os.readv(src, [buffer]):
        _write_all(dst, memoryview(buffer)[:count])


def kernel_copy(src: int, dst: int) -> None:
    while os.copy_file_range(src, dst, CHUNK_BYTES):
        pass


def cases(breakdown: bool) -> dict[str, Case]:
    found: dict[str, Case] = {
        "openssl dgst -sha256": lambda src, scratch: command("openssl", "dgst", "-sha256", src),
        "cp": lambda src, scratch: command("cp", src, scratch / "copy"),
        "cp + fsync": lambda src, scratch: command("cp", src, scratch / "copy", fsync=scratch / "copy"),
        "import, copy": importing(allow_link=False),
        "import, link": importing(allow_link=True),
    }
    if breakdown:
        found |= {
            "BlobCache.stage (copy)": stage_only,
            "_copy_and_hash (no fsync)": fd_case(lambda s, d: _copy_and_hash(s, d, None), then_fsync=True),
            "readv/write copy (no hash)": fd_case(plain_copy),
            "copy_file_range (no hash)": fd_case(kernel_copy),
            "hashlib sha256 (_hash_fd)": fd_case(lambda s, d: _hash_fd(s, None)),
            "sha256 of 1 GiB, 2 threads": fd_case(lambda s, d: two_hashes()),
        }
    return found


def two_hashes() -> None:
    """Can two sha256 run at once at full speed? (the copy path needs a hash thread and a copier)"""
    data = memoryview(bytes(CHUNK_BYTES))

    def hash_512mib() -> None:
        digest = hashlib.sha256()
        for _ in range(GIB // 2 // CHUNK_BYTES):
            digest.update(data)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: hash_512mib(), range(2)))


def ratio_line(label: str, value: float, target: float | None) -> str:
    verdict = "" if target is None else ("PASS" if value <= target else "MISS") + f" (target <= {target})"
    return f"  {label:<46} {value:6.2f}  {verdict}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=2.0, help="size of the GGUF file (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each tool (default 3)")
    parser.add_argument("--workdir", type=Path, help="where the temp dir goes (default: the system's)")
    parser.add_argument("--breakdown", action="store_true", help="also time the pieces of the copy path")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ingest-bench-", dir=args.workdir))
    try:
        source = root / "model.gguf"
        start = time.perf_counter()
        make_source(source, int(args.size_gib * GIB))
        size = source.stat().st_size
        print(f"source {source}: {size / GIB:.2f} GiB, written in {time.perf_counter() - start:.1f}s")
        print(f"same filesystem for source and data dirs: {source.stat().st_dev == root.stat().st_dev}")
        print("page cache: sync, then the source is read once, before every timed run (all runs read memory)")
        print(f"load average before: {load()} (other work on the machine skews every figure)")
        timings: dict[str, list[float]] = {}
        notes: dict[str, list[str]] = {}
        for rep in range(args.repeat):
            for label, case in cases(args.breakdown).items():
                scratch = root / "scratch"
                scratch.mkdir()
                os.sync()
                warm(source)
                try:
                    seconds, note = case(source, scratch)
                finally:
                    shutil.rmtree(scratch)
                    source.chmod(0o644)  # a hard-link import leaves the source read-only
                timings.setdefault(label, []).append(seconds)
                notes.setdefault(label, []).append(note)
                print(f"  run {rep + 1}/{args.repeat} {label:<30} {seconds:7.2f}s {note}", flush=True)

        median = {label: statistics.median(values) for label, values in timings.items()}
        print(f"\n{'tool':<32} {'median s':>9} {'GiB/s':>7}  runs (s)")
        for label, value in median.items():
            runs = " ".join(f"{seconds:.2f}" for seconds in timings[label])
            methods = sorted({note.split(";")[0] for note in notes[label] if note and "fsync" not in note})
            extra = f"  [{', '.join(methods)}]" if methods else ""
            print(f"{label:<32} {value:9.2f} {size / GIB / value:7.2f}  {runs}{extra}")
        openssl, cp, cp_fsync = median["openssl dgst -sha256"], median["cp"], median["cp + fsync"]
        copy, link = median["import, copy"], median["import, link"]
        print(f"load average after: {load()}")
        print("\nratios")
        print(ratio_line("link import / openssl", link / openssl, 1.1))
        print(ratio_line("copy import / max(cp, openssl)", copy / max(cp, openssl), 1.1))
        rounds = zip(timings["import, copy"], timings["cp"], timings["openssl dgst -sha256"], strict=True)
        per_round = [mine / max(cp_run, openssl_run) for mine, cp_run, openssl_run in rounds]
        passed = sum(value <= 1.1 for value in per_round)
        listed = " ".join(f"{value:.2f}" for value in per_round)
        print(f"    per round: {listed} ({passed} of {len(per_round)} <= 1.1)")
        print(ratio_line("copy import / max(cp + fsync, openssl)", copy / max(cp_fsync, openssl), 1.1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
