"""Captioner models on disk: discovery in models/BLIP2 and models/BLIP, loading through the model manager, downloads.

A captioner is a transformers folder (config.json + weights + processor files). Its kind comes from the
config's architecture: "blip2" (Blip2ForConditionalGeneration: captions and VQA; OPT or FlanT5 language
model), "blip2-itm" (Blip2ForImageTextRetrieval: search) or "blip" (BlipForConditionalGeneration, BLIP v1).

A fine-tuned captioner (`python -m modules.train captioner`) is either a whole transformers folder like any other,
or -- for a large base -- only what was trained: `captioner.json` (the base's name, sha256 and size, what trained,
the LoRA's rank and alpha) beside `trained.safetensors` and the processor files. Such a folder is listed under
its own name with its base's kind, and loads as the base with the trained tensors put in (LoRA pairs merged into
their layers), through the same model manager.
Nothing here imports torch or transformers at module import time: listing models stays cheap.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("webui.captioning")

KIND_BLIP2 = "blip2"
KIND_BLIP2_ITM = "blip2-itm"
KIND_BLIP = "blip"

_ARCHITECTURES = {
    "Blip2ForConditionalGeneration": KIND_BLIP2,
    "Blip2ForImageTextRetrieval": KIND_BLIP2_ITM,
    "BlipForConditionalGeneration": KIND_BLIP,
}

# Names the download action knows (folder name -> hub repository); the folder keeps the hub's name so
# that `--download-captioner blip2-opt-2.7b` and the API's `model` use one spelling.
KNOWN_CAPTIONERS = {
    "blip-image-captioning-base": "Salesforce/blip-image-captioning-base",
    "blip-image-captioning-large": "Salesforce/blip-image-captioning-large",
    "blip2-opt-2.7b": "Salesforce/blip2-opt-2.7b",
    "blip2-opt-2.7b-coco": "Salesforce/blip2-opt-2.7b-coco",
    "blip2-opt-6.7b": "Salesforce/blip2-opt-6.7b",
    "blip2-opt-6.7b-coco": "Salesforce/blip2-opt-6.7b-coco",
    "blip2-flan-t5-xl": "Salesforce/blip2-flan-t5-xl",
    "blip2-flan-t5-xl-coco": "Salesforce/blip2-flan-t5-xl-coco",
    "blip2-flan-t5-xxl": "Salesforce/blip2-flan-t5-xxl",
    "blip2-itm-vit-g": "Salesforce/blip2-itm-vit-g",
}


class CaptionerError(ValueError):
    """A captioner request that cannot be served as asked (unknown model, wrong kind, bad input)."""


class CaptionerNotFoundError(CaptionerError):
    """No captioner of that name on disk."""


class CaptionerDownloadError(RuntimeError):
    """A download that could not run (offline, unknown name, network failure)."""


MANIFEST_FILE = "captioner.json"  # written by the captioner trainer beside what it saved
TRAINED_WEIGHTS_FILE = "trained.safetensors"


@dataclass(frozen=True)
class CaptionerInfo:
    name: str  # the folder name: what the UI lists and the API's `model` field names
    kind: str  # KIND_BLIP2, KIND_BLIP2_ITM or KIND_BLIP
    path: Path
    language_model: str  # "opt", "t5", "bert" (BLIP v1's decoder) or "" (retrieval)
    base_path: Path | None = None  # saved as trained tensors only: the base folder they are combined with
    trained_from: str = ""  # made by the captioner trainer: the base's name

    @property
    def is_fine_tuned(self) -> bool:
        return bool(self.trained_from)

    @property
    def can_caption(self) -> bool:
        return self.kind in (KIND_BLIP2, KIND_BLIP)

    @property
    def can_answer(self) -> bool:
        return self.kind == KIND_BLIP2  # BLIP v1 captioning checkpoints have no VQA head

    @property
    def vqa_answer_word(self) -> str:
        # BLIP-2's prompts (LAVIS): FlanT5 was tuned on "Short answer:", OPT on "Answer:".
        return "Short answer:" if self.language_model == "t5" else "Answer:"


def read_manifest(folder: Path) -> dict | None:
    """The trainer's captioner.json of a folder, or None."""
    try:
        data = json.loads((Path(folder) / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def weight_files(folder: Path) -> list[Path]:
    """The weights of a transformers folder (one safetensors file or its shards; .bin where there is no other)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if f.name != TRAINED_WEIGHTS_FILE] or sorted(folder.glob("pytorch_model*.bin"))
    return files


def weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(folder))


def read_captioner_info(folder: Path) -> CaptionerInfo | None:
    """The CaptionerInfo of a transformers folder, or None when it is not a captioner we can run. A folder of
    trained tensors only gets its base's kind here; the registry finds the base (`base_path`)."""
    manifest = read_manifest(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        if manifest and manifest.get("format") == "trained" and manifest.get("kind") in (KIND_BLIP2, KIND_BLIP):
            return CaptionerInfo(name=folder.name, kind=manifest["kind"], path=folder.resolve(),
                                 language_model=str(manifest.get("language_model", "")),
                                 trained_from=str(manifest.get("base", "")))
        return None
    kinds = [_ARCHITECTURES[a] for a in config.get("architectures") or [] if a in _ARCHITECTURES]
    if not kinds:
        model_type = config.get("model_type")
        kinds = [KIND_BLIP2] if model_type == "blip-2" else [KIND_BLIP] if model_type == "blip" else []
    if not kinds:
        return None
    kind = kinds[0]
    text = config.get("text_config") or {}
    lm = {KIND_BLIP2: text.get("model_type", "opt"), KIND_BLIP: "bert", KIND_BLIP2_ITM: ""}[kind]
    return CaptionerInfo(name=folder.name, kind=kind, path=folder.resolve(), language_model=lm,
                         trained_from=str((manifest or {}).get("base", "")))


class CaptionerRegistry:
    """The captioners found in a list of folders (each holding one transformers folder per model)."""

    def __init__(self, roots: list[Path]):
        self.roots = list(roots)
        self._items: dict[str, CaptionerInfo] = {}
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, CaptionerInfo] = {}
        for root in self.roots:
            if not root.is_dir():
                continue
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                info = read_captioner_info(folder)
                if info is not None and info.name not in found:
                    found[info.name] = info
        for name, info in list(found.items()):  # trained tensors only: listed once their base is found
            if (info.path / "config.json").is_file() or not info.trained_from:
                continue
            base = self._find_base(info, found)
            if base is None:
                log.warning("captioner %s: its base %r is not found; it is not listed", name, info.trained_from)
                del found[name]
            else:
                found[name] = replace(info, base_path=base.path)
        self._items = found

    @staticmethod
    def _find_base(info: CaptionerInfo, found: dict[str, CaptionerInfo]) -> CaptionerInfo | None:
        base = found.get(info.trained_from)
        if base is None:  # a base outside the model folders: the path the trainer wrote down
            stored = (read_manifest(info.path) or {}).get("base_path")
            base = read_captioner_info(Path(stored)) if stored and Path(stored).is_dir() else None
        if base is None or base.kind != info.kind or not (base.path / "config.json").is_file():
            return None
        return base

    def list(self, kind: str | None = None) -> list[CaptionerInfo]:
        return [i for i in self._items.values() if kind is None or i.kind == kind]

    def find(self, name: str) -> CaptionerInfo | None:
        self.refresh() if name not in self._items else None
        return self._items.get(name)

    def default_captioner(self) -> CaptionerInfo | None:
        """BLIP v1 first (the light default), then the first BLIP-2 captioner."""
        return next(iter(self.list(KIND_BLIP)), None) or next(iter(self.list(KIND_BLIP2)), None)

    def resolve(self, name: str | None, *, purpose: str) -> CaptionerInfo:
        """A name (or "clip"/None/"" for the default) -> CaptionerInfo fit for `purpose` ("caption", "vqa", "search")."""
        if not name or name in ("clip", "default"):
            info = (next(iter(self.list(KIND_BLIP2_ITM)), None) if purpose == "search"
                    else next(iter(self.list(KIND_BLIP2)), None) if purpose == "vqa" else self.default_captioner())
            if info is None:
                raise CaptionerNotFoundError(self._nothing_message(purpose))
            return info
        info = self.find(name)
        if info is None:
            names = ", ".join(i.name for i in self.list()) or "none on disk"
            raise CaptionerNotFoundError(f"captioner {name!r} not found (available: {names}); put transformers "
                                         f"folders in {' or '.join(str(r) for r in self.roots[:2])}")
        ok = {"caption": info.can_caption, "vqa": info.can_answer, "search": info.kind == KIND_BLIP2_ITM}[purpose]
        if not ok:
            needs = {"caption": "a BLIP or BLIP-2 captioner", "vqa": "a BLIP-2 captioner (OPT or FlanT5)",
                     "search": "a BLIP-2 retrieval model such as blip2-itm-vit-g"}[purpose]
            raise CaptionerError(f"{info.name} is a {info.kind} model; {purpose} needs {needs}")
        return info

    def _nothing_message(self, purpose: str) -> str:
        what = {"caption": "no captioner found", "vqa": "no BLIP-2 captioner found for VQA",
                "search": "no BLIP-2 retrieval model (blip2-itm-vit-g) found for image search"}[purpose]
        return (f"{what}: put a transformers folder in {self.roots[0]} (or download one with "
                "--download-captioner NAME)")


# ------------------------------------------------------------------------------------------- loading

class LoadedCaptioner:
    """A model and its processor as one managed object: the manager moves and measures `model`."""

    def __init__(self, info: CaptionerInfo, model: Any, processor: Any, quantized: bool):
        self.info = info
        self.model = model
        self.processor = processor
        self.quantized = quantized

    def to(self, device):
        # bitsandbytes weights live where they were loaded and refuse `.to()`.
        if not self.quantized:
            self.model.to(device)
        return self

    def modules(self):
        return self.model.modules()

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        # The vision tower's dtype is the one pixel values must have (BLIP-2 keeps its Q-Former in fp32).
        vision = getattr(self.model, "vision_model", self.model)
        return next(vision.parameters()).dtype


def _model_class(kind: str):
    import transformers

    return {KIND_BLIP2: transformers.Blip2ForConditionalGeneration,
            KIND_BLIP2_ITM: transformers.Blip2ForImageTextRetrieval,
            KIND_BLIP: transformers.BlipForConditionalGeneration}[kind]


def bitsandbytes_available(device) -> tuple[bool, str]:
    import importlib.util

    if getattr(device, "type", str(device)) != "cuda":
        return False, "8-bit loading needs a CUDA GPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return False, "8-bit loading needs bitsandbytes (pip install bitsandbytes)"
    return True, ""


def apply_trained_weights(model, folder: Path, manifest: dict | None = None) -> None:
    """Put a fine-tuned captioner's trained tensors into `model` (its base, loaded): each tensor replaces the
    parameter of its name; a LoRA pair `M.lora_A.weight` / `M.lora_B.weight` is merged into layer M's weight as
    W + alpha / rank * B @ A (computed in fp32, stored in the layer's dtype)."""
    import torch
    from safetensors.torch import load_file

    manifest = manifest or read_manifest(folder) or {}
    tensors = load_file(str(Path(folder) / manifest.get("weights", TRAINED_WEIGHTS_FILE)))
    lora = manifest.get("lora") or {}
    scale = float(lora.get("alpha", 1.0)) / float(lora.get("rank", 1)) if lora else 1.0
    pairs: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        for key, tensor in tensors.items():
            if key.endswith((".lora_A.weight", ".lora_B.weight")):
                module, _, part = key.rpartition(".lora_")
                pairs.setdefault(module, {})[part.split(".")[0]] = tensor
                continue
            try:
                target = model.get_parameter(key)
            except AttributeError:
                target = model.get_buffer(key)
            if target.shape != tensor.shape:
                raise CaptionerError(f"{folder}: {key} has shape {tuple(tensor.shape)}, the base's "
                                     f"{tuple(target.shape)}: trained on another base?")
            target.copy_(tensor.to(target.device, target.dtype))
        for module, pair in pairs.items():
            weight = model.get_submodule(module).weight
            delta = pair["B"].float() @ pair["A"].float()
            weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))


def _check_base(info: CaptionerInfo, manifest: dict) -> None:
    expected = manifest.get("base_bytes")
    if expected is not None and info.base_path is not None and weights_size(info.base_path) != int(expected):
        raise CaptionerError(f"{info.name} was trained on {manifest.get('base')} (sha256 "
                             f"{str(manifest.get('base_sha256', ''))[:12]}), but the weights in {info.base_path} "
                             "are not that base any more: put the original base back, or train again")


def load_captioner(info: CaptionerInfo, dtype, *, int8: bool = False, device=None) -> LoadedCaptioner:
    """Load model + processor from the folder, on the CPU in `dtype` (the manager moves it), or 8-bit on the GPU.
    A captioner saved as trained tensors only is its base with them put in."""
    from transformers import AutoProcessor

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if info.base_path is not None:
        if int8:
            raise CaptionerError(f"{info.name} is saved as trained weights over {info.trained_from}: 8-bit loading "
                                 "cannot combine them; load it in 16 or 32 bit")
        manifest = read_manifest(info.path) or {}
        _check_base(info, manifest)
        processor = AutoProcessor.from_pretrained(info.path, local_files_only=True)
        model = _model_class(info.kind).from_pretrained(info.base_path, **kwargs)
        apply_trained_weights(model, info.path, manifest)
        return LoadedCaptioner(info, model.eval(), processor, quantized=False)
    if int8:
        ok, why = bitsandbytes_available(device)
        if not ok:
            raise CaptionerError(why)
        from transformers import BitsAndBytesConfig
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": str(device)})
    processor = AutoProcessor.from_pretrained(info.path, local_files_only=True)
    model = _model_class(info.kind).from_pretrained(info.path, **kwargs).eval()
    return LoadedCaptioner(info, model, processor, quantized=int8)


def captioner_key(info: CaptionerInfo, dtype, int8: bool) -> str:
    key = f"captioner:{info.path}:{'int8' if int8 else str(dtype).removeprefix('torch.')}"
    if info.is_fine_tuned:  # trained again under the same name: a new key, so the old weights are not reused
        try:
            key += f":{(info.path / MANIFEST_FILE).stat().st_mtime_ns}"
        except OSError:
            pass
    return key


def use_captioner(manager, info: CaptionerInfo, dtype, *, int8: bool = False):
    """Lease the captioner from the model manager (loaded on first use, within the same budgets as checkpoints)."""
    return manager.use(captioner_key(info, dtype, int8),
                       lambda: load_captioner(info, dtype, int8=int8, device=manager.device),
                       kind="captioner", name=info.name)


# ------------------------------------------------------------------------------------------ download

def download_captioner(name: str, models_dir: Path, *, tqdm_class=None,
                       log_fn: Callable[[str], None] | None = None) -> Path:
    """Fetch a known captioner from the Hugging Face hub into models/BLIP2 (or models/BLIP) with huggingface_hub.

    An explicit user action only. Offline (HF_HUB_OFFLINE set, or no network) it raises
    CaptionerDownloadError saying so, and leaves nothing half-written in the models folder.
    """
    repo = KNOWN_CAPTIONERS.get(name) or (name if name.count("/") == 1 else None)
    if repo is None:
        raise CaptionerDownloadError(f"unknown captioner {name!r}: choose one of {', '.join(KNOWN_CAPTIONERS)} "
                                     "or give a hub repository as owner/name")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    folder_name = repo.split("/")[1]
    sub = "BLIP" if folder_name.startswith("blip-") else "BLIP2"
    target = Path(models_dir) / sub / folder_name
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CaptionerDownloadError(f"cannot download {repo}: offline mode (HF_HUB_OFFLINE is set). Unset it, or "
                                     f"copy the model folder to {target} by hand.")
    partial = target.with_name(f".{target.name}.download")
    if log_fn:
        log_fn(f"downloading {repo} to {target}")
    try:
        snapshot_download(repo, local_dir=partial, tqdm_class=tqdm_class,
                          allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"])
    except LocalEntryNotFoundError as e:
        raise CaptionerDownloadError(f"cannot download {repo}: the hub is unreachable (offline?): {e}") from None
    except HfHubHTTPError as e:
        raise CaptionerDownloadError(f"cannot download {repo}: {e}") from None
    except OSError as e:
        raise CaptionerDownloadError(f"cannot download {repo}: {e}") from None
    if target.exists():
        import shutil
        shutil.rmtree(target)
    os.rename(partial, target)  # the registry only ever sees a complete folder
    return target
