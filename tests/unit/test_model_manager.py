"""Eviction, leasing and out-of-memory rules of the model manager, one rule per test, with fake models
that only have a byte count and record their moves (no tensors are allocated, no CUDA is touched)."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from modules.model_store.model_manager import (
    ModelManager,
    ModelOutOfMemoryError,
    model_bytes,
)

GPU = "cuda:0"


class FakeModel:
    def __init__(self, nbytes: int, name: str = "fake"):
        self.nbytes = nbytes
        self.name = name
        self.device = "cpu"
        self.moves: list[str] = []

    def to(self, device):
        self.device = str(device)
        self.moves.append(self.device)
        return self


class CountingLoader:
    """A loader that makes a fresh FakeModel per call and remembers each one."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.made: list[FakeModel] = []

    def __call__(self) -> FakeModel:
        model = FakeModel(self.nbytes)
        self.made.append(model)
        return model

    @property
    def calls(self) -> int:
        return len(self.made)


class TickClock:
    """A clock that advances one unit per reading, so use order alone decides LRU order."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def gpu_manager(vram: int, ram: int) -> ModelManager:
    return ModelManager("cuda", vram, ram, clock=TickClock())


def where(manager: ModelManager) -> dict[str, str]:
    return {row["key"]: row["device"] for row in manager.report()}


def touch(manager: ModelManager, key: str, loader) -> None:
    with manager.use(key, loader):
        pass


def test_least_recently_used_model_leaves_the_gpu_first():
    manager = gpu_manager(vram=200, ram=1000)
    loaders = {key: CountingLoader(100) for key in "ABC"}
    touch(manager, "A", loaders["A"])
    touch(manager, "B", loaders["B"])
    touch(manager, "A", loaders["A"])  # A is now more recent than B
    touch(manager, "C", loaders["C"])
    assert where(manager) == {"A": GPU, "B": "cpu", "C": GPU}


def test_pinned_model_is_never_evicted_even_over_budget(caplog):
    manager = gpu_manager(vram=100, ram=1000)
    with manager.use("A", CountingLoader(100)) as a:
        with caplog.at_level(logging.WARNING, logger="webui.models"):
            with manager.use("B", CountingLoader(100)) as b:
                assert a.device == GPU and b.device == GPU
                assert a.moves == [GPU]
        assert "loading it anyway" in caplog.text
    # Once both leases end the budget holds again: the least recently released one leaves.
    assert manager.usage()["device"] <= 100


def test_evicted_model_moves_to_ram_before_it_is_dropped():
    manager = gpu_manager(vram=100, ram=1000)
    loader_a = CountingLoader(100)
    touch(manager, "A", loader_a)
    touch(manager, "B", CountingLoader(100))
    assert manager.contains("A")
    assert loader_a.made[0].moves == [GPU, "cpu"]
    assert where(manager)["A"] == "cpu"


def test_ram_overflow_drops_the_least_recently_used():
    manager = gpu_manager(vram=100, ram=150)
    for key in "ABC":
        touch(manager, key, CountingLoader(100))
    # C took the GPU; B was parked after A, so A (older) is the one that no longer fits in RAM.
    assert where(manager) == {"C": GPU, "B": "cpu"}
    assert not manager.contains("A")


def test_switching_back_with_room_for_both_loads_once():
    manager = gpu_manager(vram=200, ram=1000)
    loader_a = CountingLoader(100)
    touch(manager, "A", loader_a)
    touch(manager, "B", CountingLoader(100))
    touch(manager, "A", loader_a)
    assert loader_a.calls == 1 and manager.loads("A") == 1
    assert loader_a.made[0].moves == [GPU]


def test_switching_back_without_gpu_room_comes_from_ram_not_disk():
    manager = gpu_manager(vram=100, ram=1000)
    loader_a = CountingLoader(100)
    touch(manager, "A", loader_a)
    touch(manager, "B", CountingLoader(100))
    touch(manager, "A", loader_a)
    assert loader_a.calls == 1 and manager.loads("A") == 1
    assert loader_a.made[0].moves == [GPU, "cpu", GPU]
    assert where(manager) == {"A": GPU, "B": "cpu"}


def test_switching_back_without_any_room_reloads_from_disk():
    manager = gpu_manager(vram=100, ram=50)
    loader_a = CountingLoader(100)
    touch(manager, "A", loader_a)
    touch(manager, "B", CountingLoader(100))
    touch(manager, "A", loader_a)
    assert loader_a.calls == 2 and manager.loads("A") == 2
    assert [row["loads"] for row in manager.report() if row["key"] == "A"] == [2]


def test_concurrent_use_of_one_key_loads_it_once():
    manager = gpu_manager(vram=1000, ram=1000)
    release = threading.Event()
    made: list[FakeModel] = []

    def slow_loader() -> FakeModel:
        release.wait(5)
        model = FakeModel(100)
        made.append(model)
        return model

    seen: list[FakeModel] = []
    lock = threading.Lock()

    def worker():
        with manager.use("A", slow_loader) as model:
            with lock:
                seen.append(model)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)  # let every thread reach the manager before the single load finishes
    release.set()
    for thread in threads:
        thread.join(5)
    assert len(made) == 1 and manager.loads("A") == 1
    assert len(seen) == 4 and all(model is made[0] for model in seen)


def test_nested_leases_of_different_keys_hold_both():
    manager = gpu_manager(vram=300, ram=1000)
    with manager.use("ckpt", CountingLoader(200), kind="checkpoint") as ckpt:
        with manager.use("lora", CountingLoader(50), kind="lora") as lora:
            assert ckpt.device == GPU and lora.device == GPU
            assert {row["key"]: row["pinned"] for row in manager.report()} == {"ckpt": True, "lora": True}
    assert {row["key"]: row["pinned"] for row in manager.report()} == {"ckpt": False, "lora": False}


def test_oom_while_loading_frees_the_gpu_and_retries_once():
    manager = gpu_manager(vram=1000, ram=1000)
    loader_a = CountingLoader(100)
    touch(manager, "A", loader_a)
    attempts = []

    def flaky_loader() -> FakeModel:
        attempts.append(1)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return FakeModel(100)

    with manager.use("B", flaky_loader) as b:
        assert b.device == GPU
    assert len(attempts) == 2 and manager.loads("B") == 1
    assert where(manager) == {"A": "cpu", "B": GPU}  # A was parked to make room for the retry


def test_oom_while_moving_to_the_gpu_retries_once():
    manager = gpu_manager(vram=1000, ram=1000)
    touch(manager, "A", CountingLoader(100))

    class FailsFirstMove(FakeModel):
        def to(self, device):
            if str(device) == GPU and GPU not in self.moves and "failed" not in self.__dict__:
                self.failed = True
                raise RuntimeError("CUDA error: out of memory")
            return super().to(device)

    with manager.use("B", lambda: FailsFirstMove(100)) as b:
        assert b.device == GPU
    assert where(manager) == {"A": "cpu", "B": GPU}


def test_second_oom_raises_a_clear_error_and_leaves_the_manager_consistent():
    manager = gpu_manager(vram=1000, ram=1000)
    touch(manager, "A", CountingLoader(100))

    def always_oom() -> FakeModel:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(ModelOutOfMemoryError, match="even after freeing every model") as caught:
        with manager.use("huge", always_oom):
            pytest.fail("the with-block must not run when the load failed")
    assert caught.value.key == "huge"
    assert not manager.contains("huge") and manager.loads("huge") == 0
    assert where(manager) == {"A": "cpu"}
    # The key is not stuck "loading": a later use with a working loader succeeds.
    with manager.use("huge", CountingLoader(100)) as model:
        assert model.device == GPU
    assert manager.usage() == {"device": 100, "ram": 100, "vram_budget": 1000, "ram_budget": 1000}


def test_second_oom_while_moving_from_ram_keeps_the_model_in_ram():
    manager = gpu_manager(vram=100, ram=1000)

    class GpuShy(FakeModel):
        refuse = False

        def to(self, device):
            if self.refuse and str(device) == GPU:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().to(device)

    shy = GpuShy(100)
    touch(manager, "A", lambda: shy)
    touch(manager, "B", CountingLoader(100))
    shy.refuse = True
    with pytest.raises(ModelOutOfMemoryError):
        with manager.use("A", lambda: pytest.fail("A is in RAM; it must not be loaded from disk")):
            pass
    assert shy.device == "cpu"
    rows = {row["key"]: row for row in manager.report()}
    assert rows["A"]["device"] == "cpu" and rows["A"]["pinned"] is False
    assert manager.loads("A") == 1


def test_a_failing_loader_does_not_leave_the_key_loading():
    manager = gpu_manager(vram=1000, ram=1000)

    def broken() -> FakeModel:
        raise FileNotFoundError("model.safetensors")

    with pytest.raises(FileNotFoundError):
        with manager.use("A", broken):
            pass
    with manager.use("A", CountingLoader(10)) as model:
        assert model.nbytes == 10


def test_lowering_budgets_evicts_at_once():
    manager = gpu_manager(vram=300, ram=300)
    for key in "ABC":
        touch(manager, key, CountingLoader(100))
    manager.set_budgets(100, 100)
    assert where(manager) == {"C": GPU, "B": "cpu"}
    assert not manager.contains("A")
    assert (manager.vram_budget, manager.ram_budget) == (100, 100)


def test_park_all_moves_every_unpinned_model_to_ram():
    manager = gpu_manager(vram=1000, ram=1000)
    touch(manager, "A", CountingLoader(100))
    with manager.use("B", CountingLoader(100)):
        assert manager.park_all() == 1
        assert where(manager) == {"A": "cpu", "B": GPU}


def test_unload_drops_now_or_when_the_lease_ends():
    manager = gpu_manager(vram=1000, ram=1000)
    touch(manager, "A", CountingLoader(100))
    assert manager.unload("A") is True and not manager.contains("A")
    assert manager.unload("A") is False
    with manager.use("B", CountingLoader(100)):
        assert manager.unload("B") is True
        assert manager.contains("B")  # still in use
    assert not manager.contains("B")


def test_unload_all_by_kind():
    manager = gpu_manager(vram=1000, ram=1000)
    touch(manager, "ckpt", CountingLoader(100))
    with manager.use("cap", CountingLoader(100), kind="captioner"):
        pass
    assert manager.unload_all(kind="captioner") == 1
    assert where(manager) == {"ckpt": GPU}
    assert manager.unload_all() == 1 and manager.report() == []


def test_report_shape():
    manager = gpu_manager(vram=100, ram=1000)
    before = time.time()
    touch(manager, "ckpt-key", CountingLoader(100))
    with manager.use("vae-key", CountingLoader(40), kind="vae", name="vae-ft-mse"):
        report = manager.report()
    assert [row["key"] for row in report] == ["vae-key", "ckpt-key"]  # most recent first
    vae, ckpt = report
    assert set(vae) == {"key", "name", "kind", "device", "bytes", "host_bytes", "loads", "last_used", "pinned",
                        "components"}
    assert vae["components"] == {}  # a model that is not a checkpoint of parts
    assert vae["name"] == "vae-ft-mse" and vae["kind"] == "vae" and vae["bytes"] == 40
    assert ckpt["name"] == "ckpt-key" and ckpt["kind"] == "model"
    assert vae["device"] == GPU and ckpt["device"] == "cpu"
    assert vae["loads"] == 1 and vae["pinned"] is True
    assert before <= ckpt["last_used"] <= vae["last_used"] <= time.time()


def test_cpu_manager_has_one_tier_and_drops_on_overflow():
    manager = ModelManager("cpu", 0, 200, clock=TickClock())
    loaders = {key: CountingLoader(100) for key in "ABC"}
    for key in "ABC":
        touch(manager, key, loaders[key])
    assert where(manager) == {"B": "cpu", "C": "cpu"}
    assert not manager.contains("A")
    assert loaders["A"].made[0].moves == ["cpu"]  # dropped, never parked anywhere
    assert manager.usage() == {"device": 200, "ram": 0, "vram_budget": 0, "ram_budget": 200}
    assert manager.park_all() == 0


def test_get_loaded_peeks_without_pinning():
    manager = gpu_manager(vram=1000, ram=1000)
    loader = CountingLoader(100)
    assert manager.get_loaded("A") is None
    touch(manager, "A", loader)
    assert manager.get_loaded("A") is loader.made[0]
    assert [row["pinned"] for row in manager.report()] == [False]


def test_model_bytes_counts_weights_and_shared_modules_once():
    linear = torch.nn.Linear(4, 3)  # 12 weights + 3 biases, float32
    assert model_bytes(linear) == 15 * 4
    half = torch.nn.Linear(4, 3).to(torch.float16)
    assert model_bytes(half) == 15 * 2
    norm = torch.nn.BatchNorm1d(3)  # weight, bias, running mean/var (fp32) + num_batches_tracked (int64)
    assert model_bytes(norm) == 4 * 3 * 4 + 8

    class Pipeline:
        def __init__(self, **components):
            self.components = components

    shared = Pipeline(unet=linear, text_encoder=half, tokenizer=object(), scheduler=None)
    assert model_bytes(shared) == 15 * 4 + 15 * 2
    assert model_bytes(Pipeline(unet=linear, also_unet=linear)) == 15 * 4
    assert model_bytes(FakeModel(123)) == 123
    assert model_bytes({"model": linear, "processor": object()}) == 15 * 4


class FakeCheckpoint(FakeModel):
    """A model that keeps bytes in CPU RAM beside its weights (as a checkpoint keeps LoRA originals)."""

    def __init__(self, nbytes: int, host: int = 0):
        super().__init__(nbytes)
        self.host_nbytes = host


def test_host_side_bytes_count_against_the_ram_budget_and_show_in_the_report():
    """The originals of LoRA-touched weights live in RAM whichever tier their checkpoint is on: they count
    against the RAM budget (so an overflow evicts) and the report shows them apart from the weights."""
    manager = gpu_manager(vram=1000, ram=500)
    with manager.use("parked", lambda: FakeModel(300)):
        pass
    checkpoint = FakeCheckpoint(600)
    with manager.use("ckpt", lambda: checkpoint):
        checkpoint.host_nbytes = 250  # a LoRA was merged during the lease: its originals are kept
    entry = next(e for e in manager.report() if e["key"] == "ckpt")
    assert entry["host_bytes"] == 250 and entry["bytes"] == 600 and entry["device"] == GPU
    assert manager.usage()["ram"] == 250
    with manager.use("other", lambda: FakeModel(400)):
        pass
    # "parked" had to leave the GPU; 300 more in RAM beside the 250 host bytes is over 500: it was dropped
    # (without counting the host bytes it would have stayed, and RAM would hold 550)
    assert not manager.contains("parked")
    assert manager.usage()["ram"] == 250


def test_host_side_bytes_on_a_cpu_manager_count_in_its_one_tier():
    manager = ModelManager("cpu", 0, 1000, clock=TickClock())
    with manager.use("a", lambda: FakeModel(500)):
        pass
    with manager.use("b", lambda: FakeCheckpoint(300, host=300)):
        pass
    assert not manager.contains("a") and manager.usage()["device"] == 600
