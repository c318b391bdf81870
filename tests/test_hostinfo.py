"""Host facts: what the system page shows and the engine sizes its budget with."""

from __future__ import annotations

from pathlib import Path

from appliance import hostinfo


def test_gpus_without_memory_figures_do_not_break_the_system_page() -> None:
    assert hostinfo.parse_gpu_line("NVIDIA H100, 81559, 1024") == hostinfo.Gpu(
        name="NVIDIA H100", vram_total_bytes=81559 << 20, vram_used_bytes=1024 << 20
    )
    assert hostinfo.parse_gpu_line("NVIDIA GB10, [N/A], [N/A]") == hostinfo.Gpu(
        name="NVIDIA GB10", vram_total_bytes=None, vram_used_bytes=None
    )


def test_memory_cpus_disk_and_engine_build_are_known_on_linux(tmp_path: Path) -> None:
    memory = hostinfo.memory()
    assert memory.total_bytes is not None
    assert memory.available_bytes is not None
    assert 0 < memory.available_bytes <= memory.total_bytes
    assert hostinfo.cpu_count() >= 1
    assert len(hostinfo.load_average()) == 3
    assert hostinfo.disk_free(tmp_path) > 0
    build = hostinfo.engine_build()
    assert build.llama_cpp_version != "unknown"
    # the CPU backend is always there; its features are what a frozen build is compared by
    assert "CPU" in build.system_info
    cpu = next(device for device in build.devices if device.kind == "cpu")
    assert cpu.memory_total_bytes > 0
