"""Device, dtype, attention-backend and memory answers, pinned with torch's CUDA/MPS probes patched so the
results do not depend on the machine the tests run on."""
from __future__ import annotations

import sys

import pytest
import torch

from modules.core import devices


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, no_accelerators):
    assert devices.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)


def test_explicit_devices(monkeypatch, no_accelerators):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        devices.resolve_device("cuda:2")


def test_unavailable_or_unknown_devices_are_clear_errors(no_accelerators):
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(ValueError, match="no MPS support"):
        devices.resolve_device("mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        devices.resolve_device("tpu")


@pytest.mark.parametrize(
    ("precision", "device", "expected"),
    [
        ("auto", "cuda", torch.float16),
        ("autocast", "cuda", torch.float16),
        ("auto", "mps", torch.float16),
        ("auto", "cpu", torch.float32),
        ("full", "cuda", torch.float32),
        ("half", "cuda", torch.float16),
        ("half", "cpu", torch.float16),
        ("bf16", "cuda", torch.bfloat16),
        ("BF16", "cpu", torch.bfloat16),
    ],
)
def test_resolve_dtype(precision, device, expected):
    assert devices.resolve_dtype(precision, device) == expected


def test_unknown_precision_is_an_error():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        devices.resolve_dtype("fp8", "cuda")


def test_vae_dtype():
    assert devices.vae_dtype("auto", "cuda") == torch.float16
    assert devices.vae_dtype("auto", "cuda", no_half_vae=True) == torch.float32
    assert devices.vae_dtype("auto", "mps") == torch.float32
    assert devices.vae_dtype("half", "mps") == torch.float16
    assert devices.vae_dtype("bf16", "cuda") == torch.bfloat16
    assert devices.vae_dtype("auto", "cpu") == torch.float32


def test_attention_defaults_to_sdpa():
    name, message = devices.attention_backend(False, "cuda")
    assert name == "sdpa" and "scaled_dot_product_attention" in message


def test_xformers_off_cuda_says_why():
    name, message = devices.attention_backend(True, "cpu")
    assert name == "sdpa" and "only runs on CUDA" in message


def test_xformers_not_importable_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    name, message = devices.attention_backend(True, "cuda:0")
    assert name == "sdpa" and "cannot be imported" in message


def test_memory_stats_without_cuda(no_accelerators):
    stats = devices.memory_stats("cpu")
    assert set(stats) == {"ram", "cuda"}
    ram = stats["ram"]
    assert set(ram) == {"free", "used", "total"}
    assert ram["total"] > 0 and 0 < ram["used"] <= ram["total"] and 0 <= ram["free"] <= ram["total"]
    assert set(stats["cuda"]) == {"error"} and "cpu" in stats["cuda"]["error"]
    assert "not available" in devices.memory_stats("cuda")["cuda"]["error"]


def test_memory_stats_cuda_shape(monkeypatch):
    gib = 1024**3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (6 * gib, 8 * gib))
    allocator = {
        "active_bytes.all.current": 1, "active_bytes.all.peak": 2,
        "allocated_bytes.all.current": 3, "allocated_bytes.all.peak": 4,
        "reserved_bytes.all.current": 5, "reserved_bytes.all.peak": 6,
        "inactive_split_bytes.all.current": 7, "inactive_split_bytes.all.peak": 8,
        "num_alloc_retries": 9, "num_ooms": 10,
    }
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda index: allocator)
    cuda = devices.memory_stats("cuda:0")["cuda"]
    assert cuda == {
        "system": {"free": 6 * gib, "used": 2 * gib, "total": 8 * gib},
        "active": {"current": 1, "peak": 2},
        "allocated": {"current": 3, "peak": 4},
        "reserved": {"current": 5, "peak": 6},
        "inactive": {"current": 7, "peak": 8},
        "events": {"retries": 9, "oom": 10},
    }


def test_ram_figures_without_psutil_come_from_proc(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    total, available = devices.system_ram()
    assert total > 0 and 0 < available <= total
    assert devices.memory_stats("cpu")["ram"]["used"] > 0


def test_budgets():
    gib = 1024**3
    assert devices.vram_budget_for(8 * gib) == 8 * gib - int(1.5 * gib)  # 15% of 8 GiB < 1.5 GiB
    assert devices.vram_budget_for(80 * gib) == 80 * gib - 12 * gib  # 15% of 80 GiB
    assert devices.vram_budget_for(1 * gib) == 0
    vram, ram = devices.default_budgets("cpu")
    total, _ = devices.system_ram()
    assert vram == 0 and ram == total // 2


def test_oom_recognition():
    assert devices.is_oom_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert devices.is_oom_error(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert devices.is_oom_error(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert devices.is_oom_error(MemoryError())
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise OSError("could not load unet") from inner
    except OSError as wrapped:
        assert devices.is_oom_error(wrapped)
    assert not devices.is_oom_error(RuntimeError("expected scalar type Half but found Float"))
    assert not devices.is_oom_error(ValueError("out of memory"))  # not an allocation failure type


def test_host_oom_is_told_apart_from_device_oom():
    assert devices.is_host_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"))
    assert devices.is_host_oom_error(MemoryError())
    assert not devices.is_host_oom_error(torch.OutOfMemoryError("CUDA out of memory"))


def test_empty_cache_without_cuda_is_harmless():
    devices.empty_cache("cuda")  # no CUDA here (or not initialised): must neither raise nor init it
    devices.empty_cache("cpu")
    devices.collect_garbage(torch.device("cuda", 0))
    assert not torch.cuda.is_initialized() or torch.cuda.is_available()
