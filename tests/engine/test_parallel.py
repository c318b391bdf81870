"""How many requests a model decodes together, and with how many threads, when the settings leave
it to the machine: `engine.parallel` and `engine.threads` unset, as a plain `serve` runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import hostinfo
from appliance.audit import Context
from appliance.engine.pool import estimate_memory
from appliance.engine.sizing import CPU_PARALLEL, engine_choices, machine_parallel
from appliance.runtime import Runtime
from appliance.settings import EngineSettings
from tests.engine.routers import make_router


@pytest.fixture
def tiny(runtime: Runtime, tiny_gguf: Path, context: Context) -> str:
    runtime.models.import_file(tiny_gguf, context, name="tiny")
    return "tiny"


def test_unset_a_model_decodes_as_many_requests_as_the_machine_suits(runtime: Runtime, tiny: str) -> None:
    router = make_router(runtime)
    try:
        loaded, _ = router.load(tiny)
    finally:
        router.close()
    assert loaded.info.parallel == machine_parallel(gpu_offload=False)
    assert loaded.info.parallel >= CPU_PARALLEL  # more than the 4 a plain serve used to batch


def test_unset_fewer_requests_where_their_kv_cache_would_not_fit_the_budget(
    runtime: Runtime, tiny: str
) -> None:
    model = runtime.models.get(tiny)
    context_length = min(4096, int(model.capabilities["context_length"]))
    weights_only = estimate_memory(model.capabilities, weights=model.size_bytes, n_ctx=0)
    per_sequence = estimate_memory(model.capabilities, weights=0, n_ctx=context_length) - estimate_memory(
        model.capabilities, weights=0, n_ctx=0
    )
    # Half of what is left beside the weights holds the KV cache of two sequences and a bit.
    router = make_router(runtime, memory_budget=weights_only + 2 * (2 * per_sequence + per_sequence // 2))
    try:
        loaded, _ = router.load(tiny)
    finally:
        router.close()
    assert loaded.info.parallel == 2


def test_the_setting_wins_over_the_machine(runtime: Runtime, tiny: str) -> None:
    router = make_router(runtime, parallel=3, threads=1)
    try:
        loaded, _ = router.load(tiny)
    finally:
        router.close()
    assert loaded.info.parallel == 3


def test_the_choices_say_what_they_are_and_why() -> None:
    chosen = engine_choices(EngineSettings(), gpu_offload=False)
    assert chosen["parallel"] == machine_parallel(gpu_offload=False)
    assert chosen["threads"] == hostinfo.physical_cores()
    assert "physical cores" in chosen["parallel_from"]
    assert chosen["threads_from"] == "one per physical core"
    assert engine_choices(EngineSettings(), gpu_offload=True)["parallel"] == 16
    set_by_hand = engine_choices(EngineSettings(parallel=5, threads=3), gpu_offload=False)
    assert (set_by_hand["parallel"], set_by_hand["threads"]) == (5, 3)
    assert set_by_hand["parallel_from"] == "the engine.parallel setting"


def test_physical_cores_count_each_core_once_within_this_process_cpus() -> None:
    assert 1 <= hostinfo.physical_cores() <= hostinfo.cpu_count()
