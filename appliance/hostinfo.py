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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.engine.llama import BackendDevice

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
    "physical_cores",
    "report",
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


# ggml backends that run on the CPU or forward elsewhere: not a GPU build's
NOT_GPU_BACKENDS = ("CPU", "BLAS", "RPC")


@dataclass(frozen=True)
class EngineBuild:
    gpu_offload: bool  # llama.cpp can offload here: a GPU backend with a device
    llama_cpp_version: str
    gpu_backends: list[str] = field(default_factory=list)  # GPU backends compiled in ("CUDA"), device or not
    system_info: str = ""  # llama.cpp's summary: backends and the CPU features compiled in
    devices: list[BackendDevice] = field(default_factory=list)  # what it can run on here

    @property
    def gpu_devices(self) -> list[BackendDevice]:
        return [device for device in self.devices if device.kind != "cpu"]


def _allowed_cpus() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cpu_count() -> int:
    """CPUs this process may run on (a container's or taskset's share, not the whole machine's)."""
    return len(_allowed_cpus()) or 1


def physical_cores() -> int:
    """Cores among this process's CPUs, hyper-threaded siblings counted once: llama.cpp's matrix
    work gains nothing from a sibling thread and loses when two threads share a core's units."""
    allowed = _allowed_cpus()
    cores: set[tuple[str, str]] = set()
    cpu: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in [*cpuinfo, "\n"]:  # a blank line ends each CPU's block
                name, _, value = line.partition(":")
                if name.strip():
                    cpu[name.strip()] = value.strip()
                    continue
                if cpu.get("processor", "").isdigit() and int(cpu["processor"]) in allowed:
                    cores.add((cpu.get("physical id", ""), cpu.get("core id", cpu["processor"])))
                cpu = {}
    except OSError:
        pass
    return len(cores) or cpu_count()


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
    for cell in rest.split(","):
        try:
            values.append(int(cell.strip()) << 20)
        except ValueError:
            values.append(None)
    total, used = [*values, None, None][:2]
    return Gpu(name=name.strip(), vram_total_bytes=total, vram_used_bytes=used)


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def engine_build() -> EngineBuild:
    """What the installed llama.cpp can do. Imported here: it loads llama.cpp's shared library,
    which only the serving process needs."""
    from appliance.engine.llama import (
        backend_devices,
        backend_registries,
        gpu_offload_supported,
        llama_cpp_version,
        system_info,
    )

    return EngineBuild(
        gpu_offload=gpu_offload_supported(),
        llama_cpp_version=llama_cpp_version(),
        gpu_backends=[name for name in backend_registries() if name not in NOT_GPU_BACKENDS],
        system_info=system_info(),
        devices=backend_devices(),
    )


def report(data_dir: Path) -> dict[str, Any]:
    """All of the above as one JSON-ready dict: the system page's and ``appliance system``'s."""
    build = engine_build()
    return {
        "cpu_count": cpu_count(),
        "load_average": list(load_average()),
        "memory": asdict(memory()),
        "gpus": [asdict(gpu) for gpu in gpus()],
        "gpu_offload": build.gpu_offload,
        "gpu_backends": build.gpu_backends,
        "llama_cpp_version": build.llama_cpp_version,
        "llama_cpp_system_info": build.system_info,
        "devices": [asdict(device) for device in build.devices],
        "disk_free_bytes": disk_free(data_dir),
    }
