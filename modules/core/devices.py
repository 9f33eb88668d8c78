"""Device facts: which torch device and dtypes to compute with, the attention backend, and memory figures.

Everything here is a plain function of its arguments and of what torch reports, so the model manager,
services and the API can ask the same questions without sharing global state. Nothing here creates a
CUDA context unless the caller already runs on CUDA: `empty_cache` and `memory_stats` only touch CUDA
when the device asked about is a CUDA device that torch can see.
"""
from __future__ import annotations

import gc
import importlib
import os

import torch

GIB = 1024**3

# VRAM kept free of model weights for activations, the VAE decode and the CUDA context: 15% of the
# card, but never less than 1.5 GiB, because small cards run out in the VAE decode first.
VRAM_RESERVE_MIN_BYTES = int(1.5 * GIB)
VRAM_RESERVE_SHARE = 0.15
# Share of system RAM the model manager may fill with parked or CPU-resident models; the rest stays for
# the OS, the web server, images and the other processes on the machine.
RAM_BUDGET_SHARE = 0.5

_PRECISION_ALIASES = {
    "auto": "auto",
    "autocast": "auto",  # A1111's --precision autocast: half weights where the device does them well
    "full": "full",
    "fp32": "full",
    "float32": "full",
    "no-half": "full",
    "half": "half",
    "fp16": "half",
    "float16": "half",
    "bf16": "bf16",
    "bfloat16": "bf16",
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a user's device choice ("auto", "cpu", "cuda", "cuda:1", "mps") into a torch.device.

    "auto" picks CUDA when torch sees a GPU, else Apple's MPS, else the CPU. Asking for a device torch
    cannot use is a ValueError that says why, instead of a failure deep inside the first model load.
    A bare "cuda" becomes "cuda:0" so reports always name the card.
    """
    choice = (name or "auto").strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "mps":
        if not _mps_available():
            raise ValueError("device 'mps' was requested but this torch build or machine has no MPS support")
        return torch.device("mps")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {name!r} was requested but CUDA is not available "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); "
                "install a CUDA build of torch or use --use-cpu all"
            )
        index_text = choice.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise ValueError(f"device {name!r}: the CUDA index must be a number, e.g. cuda:0")
        index = int(index_text)
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"device {name!r} was requested but only {count} CUDA device(s) are visible")
        return torch.device("cuda", index)
    raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")


def _normalize_precision(precision: str) -> str:
    key = (precision or "auto").strip().lower()
    if key not in _PRECISION_ALIASES:
        raise ValueError(f"unknown precision {precision!r}: use auto, full, half or bf16")
    return _PRECISION_ALIASES[key]


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype for model weights given `--precision` and the compute device.

    - "auto" (also A1111's "autocast"): float16 on CUDA and MPS, where half weights halve memory and
      run on tensor/matrix units; float32 on the CPU, where float16 kernels are slow or missing.
    - "full" (what `--no-half` means): float32 everywhere.
    - "half": float16, "bf16": bfloat16, honoured as asked on any device (the user chose them).
    """
    mode = _normalize_precision(precision)
    if mode == "full":
        return torch.float32
    if mode == "half":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    device_type = torch.device(device).type
    return torch.float16 if device_type in ("cuda", "mps") else torch.float32


def vae_dtype(precision: str, device: torch.device | str, no_half_vae: bool = False) -> torch.dtype:
    """The dtype for the VAE: the model dtype, except float32 with `--no-half-vae`, and float32 on MPS
    under "auto", because the SD VAE overflows to NaN (black images) in float16 there (A1111's macOS
    defaults pass --no-half-vae for the same reason). bfloat16 keeps float32's range, so it is kept."""
    if no_half_vae:
        return torch.float32
    dtype = resolve_dtype(precision, device)
    if _normalize_precision(precision) == "auto" and torch.device(device).type == "mps":
        return torch.float32
    return dtype


def attention_backend(xformers_requested: bool, device: torch.device | str) -> tuple[str, str]:
    """Pick the attention implementation: ("sdpa" | "xformers", a sentence for the log and the UI).

    PyTorch's scaled_dot_product_attention is the default everywhere: it is built in, picks flash or
    memory-efficient kernels itself and matches plain diffusers. xformers is used only when asked for,
    importable and running on CUDA; otherwise the message says why the request was not honoured.
    """
    device = torch.device(device)
    sdpa = "PyTorch scaled_dot_product_attention (SDPA)"
    if not xformers_requested:
        return "sdpa", f"attention: {sdpa}"
    if device.type != "cuda":
        return "sdpa", f"--xformers ignored: xformers only runs on CUDA and the device is {device}; using {sdpa}"
    try:
        module = importlib.import_module("xformers")
        importlib.import_module("xformers.ops")
    except Exception as exc:  # an ImportError, or a binary built for another torch failing at import
        return "sdpa", f"--xformers ignored: xformers cannot be imported ({exc}); using {sdpa}"
    version = getattr(module, "__version__", "unknown version")
    return "xformers", f"attention: xformers {version} memory-efficient attention"


def _read_proc_kib(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(path, encoding="ascii") as handle:
        for line in handle:
            label, _, rest = line.partition(":")
            if label in fields:
                values[label] = int(rest.split()[0]) * 1024
    return values


def system_ram() -> tuple[int, int]:
    """(total, available) bytes of system RAM, from psutil when installed, else /proc/meminfo."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        memory = psutil.virtual_memory()
        return int(memory.total), int(memory.available)
    try:
        info = _read_proc_kib("/proc/meminfo", ("MemTotal", "MemAvailable", "MemFree"))
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        # No /proc (macOS, Windows) and no psutil: the page counts are all the standard library offers.
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(total), int(total)


def _process_rss() -> int:
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    try:
        return _read_proc_kib("/proc/self/status", ("VmRSS",)).get("VmRSS", 0)
    except OSError:
        import resource

        # ru_maxrss is the peak, in KiB on Linux and bytes on macOS; the best figure left without /proc.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if os.uname().sysname == "Darwin" else peak * 1024)


def _cuda_figures(device: torch.device) -> dict:
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    stats = torch.cuda.memory_stats(index)

    def pair(prefix: str) -> dict[str, int]:
        return {
            "current": int(stats.get(f"{prefix}.all.current", 0)),
            "peak": int(stats.get(f"{prefix}.all.peak", 0)),
        }

    return {
        "system": {"free": int(free), "used": int(total - free), "total": int(total)},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": int(stats.get("num_alloc_retries", 0)), "oom": int(stats.get("num_ooms", 0))},
    }


def memory_stats(device: torch.device | str | None = None) -> dict:
    """Memory figures in the shape of A1111's /sdapi/v1/memory.

    ram: {"free": system RAM available for new allocations, "used": this process's resident memory,
    "total": system RAM}; cuda: the device's figures from torch's caching allocator, or
    {"error": why there are none} when the device is not a CUDA device torch can see.
    """
    total, available = system_ram()
    result: dict = {"ram": {"free": available, "used": _process_rss(), "total": total}}
    target = torch.device(device) if device is not None else None
    if target is None and torch.cuda.is_available():
        target = torch.device("cuda", 0)
    if target is None or target.type != "cuda":
        where = "no device given" if target is None else f"the compute device is {target}"
        result["cuda"] = {"error": f"CUDA is not in use: {where}"}
    elif not torch.cuda.is_available():
        result["cuda"] = {"error": "CUDA is not available in this torch build or on this machine"}
    else:
        try:
            result["cuda"] = _cuda_figures(target)
        except Exception as exc:  # a driver error must not break the memory endpoint
            result["cuda"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def vram_budget_for(total_bytes: int) -> int:
    """Bytes of a card's memory that model weights may fill: the total minus the activation reserve."""
    reserve = max(VRAM_RESERVE_MIN_BYTES, int(total_bytes * VRAM_RESERVE_SHARE))
    return max(0, int(total_bytes) - reserve)


def ram_budget_for(total_bytes: int) -> int:
    """Bytes of system RAM that models kept in RAM may fill."""
    return int(total_bytes * RAM_BUDGET_SHARE)


def default_budgets(device: torch.device | str) -> tuple[int, int]:
    """(vram_budget_bytes, ram_budget_bytes) for a compute device; the VRAM budget is 0 on the CPU.

    On MPS the GPU shares system memory, so its budget comes from Metal's recommended working set.
    """
    device = torch.device(device)
    ram_total, _ = system_ram()
    ram_budget = ram_budget_for(ram_total)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return vram_budget_for(torch.cuda.get_device_properties(index).total_memory), ram_budget
    if device.type == "mps":
        recommended = getattr(torch.mps, "recommended_max_memory", None)
        total = int(recommended()) if recommended is not None else ram_total
        return vram_budget_for(total), ram_budget
    return 0, ram_budget


_HOST_OOM_PHRASES = ("can't allocate memory", "cannot allocate memory")
_OOM_PHRASES = ("out of memory", *_HOST_OOM_PHRASES)


def is_oom_error(exc: BaseException) -> bool:
    """True for an allocation failure: torch.OutOfMemoryError, MemoryError, or a RuntimeError whose
    message says so (MPS, the CPU allocator and older CUDA builds raise plain RuntimeErrors). An error
    raised `from` an out-of-memory error counts too, since loaders often wrap the original."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(current, RuntimeError):
            message = str(current).lower()
            if any(phrase in message for phrase in _OOM_PHRASES):
                return True
        current = current.__cause__
        seen += 1
    return False


def is_host_oom_error(exc: BaseException) -> bool:
    """True when the allocation that failed was in CPU RAM (MemoryError, torch's CPU allocator), not on
    an accelerator: freeing device memory would not help there, freeing RAM would."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            break
        if isinstance(current, MemoryError):
            return True
        if isinstance(current, RuntimeError) and not isinstance(current, torch.OutOfMemoryError):
            message = str(current).lower()
            if any(phrase in message for phrase in _HOST_OOM_PHRASES):
                return True
        current = current.__cause__
    return False


def empty_cache(device: torch.device | str) -> None:
    """Return cached, unused allocator blocks of `device` to the driver (after models were dropped).

    CUDA is touched only when it is already initialised in this process, so a test that names a
    fake "cuda" device on a machine without one, or a CPU-only run, never creates a CUDA context.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    elif device.type == "mps":
        if _mps_available():
            torch.mps.empty_cache()


def collect_garbage(device: torch.device | str) -> None:
    """Drop unreachable Python objects (and with them tensors) and then the allocator's cached blocks."""
    gc.collect()
    empty_cache(device)


class PeakMemory:
    """The peak memory of a with-block: the CUDA allocator's peak on a CUDA device (reset at entry), else the
    process RSS sampled every 20 ms by a helper thread. `peak` (bytes) and `what` (which of the two)."""

    def __init__(self, device=None):
        self.device = device
        self.peak = 0
        self.what = "process RSS"
        self._stop = None

    def __enter__(self):
        import threading
        if getattr(self.device, "type", None) == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.what = "CUDA allocated"
            return self
        self._stop = threading.Event()
        self.peak = _process_rss()

        def sample():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, _process_rss())

        self._thread = threading.Thread(target=sample, daemon=True, name="peak-memory")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._stop is None:
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return False
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _process_rss())
        return False
