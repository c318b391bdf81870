"""How a model is run when the settings leave it to the machine: requests decoded together
(``engine.parallel``) and threads (``engine.threads``). The pool sizes each model with it; the
system page and ``appliance system`` say the choice. Imports no llama.cpp: the web layer reads it.
"""

from __future__ import annotations

from typing import Any

from appliance import hostinfo
from appliance.settings import EngineSettings

__all__ = ["CPU_PARALLEL", "GPU_PARALLEL", "engine_choices", "machine_parallel", "machine_threads"]

# CPU decoding is bound by memory bandwidth, so a batch of 8 still gains on a 2-core machine (3.5x
# the tokens/s of one request in bench/inference.py); a GPU gains further.
CPU_PARALLEL = 8
GPU_PARALLEL = 16


def machine_parallel(*, gpu_offload: bool) -> int:
    """Requests per model when ``engine.parallel`` is unset, before memory has its say."""
    return GPU_PARALLEL if gpu_offload else max(CPU_PARALLEL, min(hostinfo.physical_cores(), 64))


def machine_threads() -> int:
    return hostinfo.physical_cores()


def engine_choices(settings: EngineSettings, *, gpu_offload: bool) -> dict[str, Any]:
    """Threads and parallel requests per model as a plain ``serve`` picks them, and why: the system
    page's and ``appliance system``'s account of the defaults."""
    if settings.parallel is not None:
        parallel, parallel_from = settings.parallel, "the engine.parallel setting"
    else:
        parallel = machine_parallel(gpu_offload=gpu_offload)
        machine = (
            "GPU offload" if gpu_offload else f"{hostinfo.physical_cores()} physical cores, no GPU offload"
        )
        parallel_from = (
            f"this machine ({machine}); fewer for a model whose KV cache would not fit the memory budget"
            " (see each loaded model)"
        )
    if settings.threads is not None:
        threads, threads_from = settings.threads, "the engine.threads setting"
    else:
        threads, threads_from = machine_threads(), "one per physical core"
    return {
        "parallel": parallel,
        "parallel_from": parallel_from,
        "threads": threads,
        "threads_from": threads_from,
    }
