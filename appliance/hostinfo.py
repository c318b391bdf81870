"""Facts about the host: CPUs, load, RAM, GPUs and VRAM, free disk, and what the engine build can do.

One place for them, outside ``web/``: the system page shows them and the engine sizes its memory
budget with them. Reads ``/proc`` and runs ``nvidia-smi`` (where there is one); every probe that
fails answers "unknown" (None, or no GPUs) rather than raising, since a dashboard must still load.
May import the standard library only, plus the llama.cpp layer (``appliance.engine.llama``),
lazily, for the engine build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "EngineBuild",
    "Gpu",
    "Memory",
    "cpu_count",
    "disk_free",
    "engine_build",
    "gpus",
    "load_average",
    "memory",
    "parse_gpu_line",
]


@dataclass(frozen=True)
class Memory:
    total_bytes: int | None
    available_bytes: int | None


@dataclass(frozen=True)
class Gpu:
    name: str
    vram_total_bytes: int | None
    vram_used_bytes: int | None


@dataclass(frozen=True)
class EngineBuild:
    gpu_offload: bool  # llama.cpp was built with a GPU backend
    llama_cpp_version: str


def cpu_count() -> int:
    return os.cpu_count() or 1


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def memory() -> Memory:
    """RAM from /proc/meminfo; the total from sysconf where /proc is missing."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    total = fields.get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (OSError, ValueError):
            total = None
    return Memory(total_bytes=total, available_bytes=fields.get("MemAvailable"))


def gpus() -> list[Gpu]:
    """NVIDIA GPUs as nvidia-smi reports them; none where it is missing."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        output = subprocess.run(
            [binary, "--query-gpu=name,memory.total,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [parse_gpu_line(line) for line in output.strip().splitlines() if line.strip()]


def parse_gpu_line(line: str) -> Gpu:
    """One line of nvidia-smi's CSV: MiB, or [N/A] on GPUs with unified memory."""
    name, _, rest = line.partition(",")
    values: list[int | None] = []
    for field in rest.split(","):
        try:
            values.append(int(field.strip()) << 20)
        except ValueError:
            values.append(None)
    total, used = [*values, None, None][:2]
    return Gpu(name=name.strip(), vram_total_bytes=total, vram_used_bytes=used)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def engine_build() -> EngineBuild:
    """What the installed llama.cpp can do. Imported here: it loads llama.cpp's shared library,
    which only the serving process needs."""
    from appliance.engine.llama import gpu_offload_supported, llama_cpp_version

    return EngineBuild(gpu_offload=gpu_offload_supported(), llama_cpp_version=llama_cpp_version())
