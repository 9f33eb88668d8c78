"""LoRA and textual inversion: folder registries, loading through the model manager, per-request application.

- `LoraRegistry`: `.safetensors` (and `.pt` via safe loading) files in the LoRA folders; AutoV3 hashes.
- `load_lora(path)` -> `LoraWeights`: kohya (`lora_unet_*`, `lora_te*_*`, `.alpha`) and PEFT/diffusers
  (`unet.*.lora_A/lora_B`, `*.lora.down/up`) layouts normalised to one form; the model manager caches it.
  LyCORIS files under kohya names load too, as A1111 reads them: LoCon (LoRA on convolutions), LoHa
  (`hada_w1_a`..., optionally CP-decomposed with `hada_t1/t2`), LoKr (`lokr_w1`/`lokr_w2` or their `_a`/`_b`
  factors, `lokr_t2`) and full weight differences (`diff`).
  kohya UNet names may be diffusers' (`down_blocks_0_attentions_0_proj_in`) or LDM's (`input_blocks_1_1_proj_in`,
  as every SDXL kohya LoRA writes them): both find the layer.
- `applied_loras(bundle, ...)`: adds the weighted deltas into the checkpoint's own weights for one request
  and writes the saved originals back afterwards, so nothing leaks into the next request and a request
  without LoRAs runs the untouched weights (bit for bit). Merging, rather than PEFT's extra layers, keeps
  the per-step cost of a LoRA at zero.
- `EmbeddingDatabase`: textual inversion files in the embeddings folders (`.pt` with weights_only,
  `.safetensors`, diffusers' `{token: vector}` files), usable when their width matches an encoder.
- `ExtraNetworks.resolve(prompt)`: strips `<lora:...>` tags, resolves them, and says which were ignored and why.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from modules import prompt_parser

log = logging.getLogger("webui.extra_networks")

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


# ----------------------------------------------------------------------------------------- hashes

def autov3(path: str | os.PathLike) -> str:
    """A1111/Civitai's AutoV3 ("addnet") hash: sha256 of a safetensors file's data after its header."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + header_len)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _HashMemo:
    """Hashes per (file, size, mtime): a file is hashed once per version."""

    def __init__(self):
        self._lock = threading.Lock()
        self._known: dict[tuple, str] = {}

    def get(self, path: Path, fn) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns, fn.__name__)
        with self._lock:
            if key in self._known:
                return self._known[key]
        value = fn(path)
        with self._lock:
            self._known[key] = value
        return value


_hashes = _HashMemo()


# ------------------------------------------------------------------------------------------ LoRA files

@dataclass(frozen=True)
class LoraInfo:
    name: str  # file name without extension, relative to its folder ("sub/name" in sub-folders)
    path: Path
    alias: str

    @property
    def hash(self) -> str:
        """AutoV3 (full) for safetensors; the file's sha256 for other formats."""
        return _hashes.get(self.path, autov3 if self.path.suffix == ".safetensors" else sha256_file)

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    def metadata(self) -> dict:
        if self.path.suffix != ".safetensors":
            return {}
        from modules.sd_models import CheckpointError, read_safetensors_metadata
        try:
            return dict(read_safetensors_metadata(self.path))
        except CheckpointError as exc:  # unreadable header: the card shows no metadata
            log.warning("LoRA %s: cannot read its metadata: %s", self.name, exc)
            return {}


class LoraRegistry:
    """The LoRA files of some folders, rescanned on `refresh()`."""

    def __init__(self, dirs: list[Path]):
        self.dirs = [Path(d) for d in dirs]
        self._lock = threading.Lock()
        self._items: dict[str, LoraInfo] = {}

    def refresh(self) -> list[LoraInfo]:
        found: dict[str, LoraInfo] = {}
        for root in self.dirs:
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() not in LORA_EXTENSIONS or not path.is_file():
                    continue
                name = path.relative_to(root).with_suffix("").as_posix()
                alias = name
                if path.suffix == ".safetensors":
                    from modules.sd_models import CheckpointError, read_safetensors_metadata
                    try:
                        alias = read_safetensors_metadata(path).get("ss_output_name") or name
                    except CheckpointError as exc:  # listed by its file name; using it reports the error
                        log.warning("LoRA %s: cannot read its header: %s", name, exc)
                found.setdefault(name, LoraInfo(name=name, path=path, alias=alias))
        with self._lock:
            self._items = found
        return list(found.values())

    def list(self) -> list[LoraInfo]:
        with self._lock:
            return list(self._items.values())

    def find(self, name: str) -> LoraInfo | None:
        """By name (with or without sub-folder), then by alias (A1111 looks aliases up too)."""
        with self._lock:
            items = dict(self._items)
        if name in items:
            return items[name]
        for info in items.values():
            if Path(info.name).name == name:
                return info
        for info in items.values():
            if info.alias == name:
                return info
        return None


# ------------------------------------------------------------------------------------ LoRA weights

@dataclass
class LoraModule:
    down: Any  # [r, in] or [r, in, k, k]
    up: Any  # [out, r] or [out, r, 1, 1]
    alpha: float | None


@dataclass
class LycoModule:
    """A LyCORIS layer (LoHa, LoKr or a full `diff`) that has no plain up @ down form: its delta is built
    whole, with A1111's (and LyCORIS') formulas and scale alpha / rank (1 without alpha or rank)."""
    kind: str  # "loha" | "lokr" | "full" | "locon_cp" (a LoRA with a CP-decomposed `lora_mid`)
    tensors: dict[str, Any]
    alpha: float | None

    @property
    def rank(self) -> int | None:
        t = self.tensors
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "locon_cp":
            return t["down"].shape[0]
        if self.kind == "lokr":
            for key in ("lokr_w2_b", "lokr_w1_b"):  # A1111's order
                if key in t:
                    return t[key].shape[0]
        return None

    def scale(self) -> float:
        rank = self.rank
        return self.alpha / rank if self.alpha is not None and rank else 1.0

    def _factor(self, prefix: str, tucker: str | None, cp_out: bool):
        """w = a @ b (or a CP/Tucker rebuild with `tucker`), or the stored full matrix `prefix`."""
        import torch
        t = self.tensors
        if prefix in t:
            return t[prefix]
        a, b = t[prefix + "_a"], t[prefix + "_b"]
        if tucker and tucker in t:
            # [r, r, k, k] core with [r, out] and [r, in] factors -> [out, in, k, k]
            return torch.einsum("i j k l, j r, i p -> p r k l", t[tucker], b, a)
        if cp_out:
            shape = [a.shape[0], b.shape[1], *b.shape[2:]]
            return (a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape(shape)
        return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)

    def delta(self, weight_shape) -> Any:
        import torch
        t = self.tensors
        if self.kind == "full":
            delta = t["diff"]
        elif self.kind == "locon_cp":
            delta = torch.einsum("n m k l, i n, m j -> i j k l", t["mid"], t["up"].flatten(1), t["down"].flatten(1))
        elif self.kind == "loha":
            delta = self._factor("hada_w1", "hada_t1", True) * self._factor("hada_w2", "hada_t2", True)
        else:
            w1 = self._factor("lokr_w1", None, False)
            w2 = self._factor("lokr_w2", "lokr_t2", True)
            if w2.ndim == 4:
                w1 = w1.reshape(*w1.shape, 1, 1)
            delta = torch.kron(w1.contiguous(), w2.contiguous())  # a Tucker rebuild is a non-contiguous view
        return (delta * self.scale()).reshape(weight_shape)

    def out_features_and_numel(self) -> tuple[int, int]:
        """(rows, elements) of the delta, without building it."""
        t = self.tensors
        shape = self._shape

        def numel(dims):
            n = 1
            for d in dims:
                n *= d
            return n
        if self.kind == "full":
            return t["diff"].shape[0], t["diff"].numel()
        if self.kind == "locon_cp":
            return t["up"].shape[0], numel([t["up"].shape[0], t["down"].shape[1], *t["mid"].shape[2:]])
        if self.kind == "loha":
            dims = shape("hada_w1", "hada_t1")
            return dims[0], numel(dims)
        w1, w2 = shape("lokr_w1", None), shape("lokr_w2", "lokr_t2")
        return w1[0] * w2[0], numel(w1) * numel(w2)

    def consistent(self) -> bool:
        """Whether the factors' shapes chain (a malformed file must be skipped, not fail in a matmul)."""
        t = self.tensors

        def pair(prefix, tucker, full_ndims=(2, 4)):
            if prefix in t:
                return t[prefix].ndim in full_ndims
            a, b = t[prefix + "_a"], t[prefix + "_b"]
            if tucker and tucker in t:  # [r, out] and [r, in] around a [r, r, k, k] core
                core = t[tucker]
                return (a.ndim == 2 and b.ndim == 2 and core.ndim == 4 and core.shape[0] == a.shape[0]
                        and core.shape[1] == b.shape[0])
            return a.ndim == 2 and b.ndim in (2, 4) and a.shape[1] == b.shape[0]

        if self.kind == "full":
            return True
        if self.kind == "locon_cp":
            up, mid, down = t["up"], t["mid"], t["down"]
            return (up.ndim in (2, 4) and down.ndim in (2, 4) and mid.ndim == 4
                    and up.flatten(1).shape[1] == mid.shape[0] and down.flatten(1).shape[0] == mid.shape[1])
        if self.kind == "loha":
            return (pair("hada_w1", "hada_t1") and pair("hada_w2", "hada_t2")
                    and self._shape("hada_w1", "hada_t1") == self._shape("hada_w2", "hada_t2"))
        return pair("lokr_w1", None, full_ndims=(2,)) and pair("lokr_w2", "lokr_t2")

    def _shape(self, prefix, tucker) -> list[int]:
        t = self.tensors
        if prefix in t:
            return list(t[prefix].shape)
        a, b = t[prefix + "_a"], t[prefix + "_b"]
        if tucker and tucker in t:
            return [a.shape[1], b.shape[1], *t[tucker].shape[2:]]
        return [a.shape[0], *b.shape[1:]]

    def fits(self, weight_shape) -> bool:
        total = 1
        for d in weight_shape:
            total *= d
        return self.consistent() and self.out_features_and_numel() == (weight_shape[0], total)

    def tensors_list(self) -> list:
        return list(self.tensors.values())


_LYCO_ROLES = {  # tensor name -> kind of LyCORIS module
    "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha", "hada_t1": "loha",
    "hada_t2": "loha",
    "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
    "lokr_w2_b": "lokr", "lokr_t2": "lokr",
    "diff": "full",
}
_LYCO_REQUIRED = {"loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
                  "lokr": ({"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"}),  # and one of the w2 forms below
                  "full": ({"diff"},)}


def _lyco_complete(kind: str, roles: set[str]) -> bool:
    if not any(req <= roles for req in _LYCO_REQUIRED[kind]):
        return False
    return kind != "lokr" or "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles


@dataclass
class LoraWeights:
    """A LoRA file in one normalised form: part -> module name (dots as "_") -> LoraModule."""
    name: str
    modules: dict[str, dict[str, LoraModule]] = field(default_factory=dict)
    unknown_keys: list[str] = field(default_factory=list)

    def to(self, device) -> "LoraWeights":
        for part in self.modules.values():
            for m in part.values():
                if isinstance(m, LycoModule):
                    m.tensors = {k: v.to(device) for k, v in m.tensors.items()}
                else:
                    m.down, m.up = m.down.to(device), m.up.to(device)
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in self.modules.values() for m in part.values()
                   for t in (m.tensors_list() if isinstance(m, LycoModule) else (m.down, m.up)))


_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))
_PEFT_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"))
_SUFFIXES = (  # (suffix, role)
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".alpha", "alpha"),
) + tuple((f".{name}", name) for name in _LYCO_ROLES)


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(part, module name with "_", role) of one LoRA key, or None when it is of no known layout."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            break
    else:
        return None
    for prefix, part in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            return part, stem[len(prefix):], role
    for prefix, part in _PEFT_PREFIXES:
        if stem.startswith(prefix):
            return part, stem[len(prefix):].replace(".", "_"), role
    return None


class LoraFileError(ValueError):
    """A LoRA file that cannot be used (unreadable, no LoRA keys)."""


def load_lora(path: str | os.PathLike, name: str | None = None) -> LoraWeights:
    """Read a LoRA file (CPU tensors) into the normalised form."""
    import torch
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as exc:
        raise LoraFileError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(state, dict):
        raise LoraFileError(f"{path.name} holds no tensors")
    weights = LoraWeights(name=name or path.stem)
    raw: dict[tuple[str, str], dict[str, Any]] = {}
    for key, value in state.items():
        split = _split_key(key) if isinstance(value, torch.Tensor) else None
        if split is None:
            weights.unknown_keys.append(key)
            continue
        part, module, role = split
        raw.setdefault((part, module), {})[role] = value
    for (part, module), roles in raw.items():
        alpha = roles.get("alpha")
        alpha = float(alpha) if alpha is not None else None
        kinds = {_LYCO_ROLES[r] for r in roles if r in _LYCO_ROLES}
        if len(kinds) == 1 and _lyco_complete(next(iter(kinds)), set(roles)):
            kind = next(iter(kinds))
            weights.modules.setdefault(part, {})[module] = LycoModule(
                kind, {r: v.float() for r, v in roles.items() if r in _LYCO_ROLES}, alpha)
            continue
        if "mid" in roles and not kinds and {"down", "up"} <= set(roles):
            weights.modules.setdefault(part, {})[module] = LycoModule(
                "locon_cp", {r: roles[r].float() for r in ("down", "up", "mid")}, alpha)
            continue
        if "down" not in roles or "up" not in roles or kinds or "mid" in roles:
            weights.unknown_keys.extend(f"{part}:{module}.{r}" for r in roles)
            continue
        weights.modules.setdefault(part, {})[module] = LoraModule(
            down=roles["down"].float(), up=roles["up"].float(), alpha=alpha)
    if not weights.modules:
        raise LoraFileError(f"{path.name} has no LoRA weights of a known layout (kohya, PEFT/diffusers, "
                            "LyCORIS LoCon/LoHa/LoKr/full)")
    return weights


def ldm_unet_module_names(unet_config, module_names) -> dict[str, str]:
    """diffusers UNet module name -> its flat name in the original LDM layout, as kohya's SDXL LoRAs (and some SD1
    ones) name the UNet's layers ("down_blocks.0.attentions.0.proj_in" -> "input_blocks_1_1_proj_in"); modules
    with no LDM equivalent are left out."""
    from modules.ldm_convert import unet_key_to_ldm
    names = {}
    for name in module_names:
        try:
            ldm = unet_key_to_ldm(f"{name}.weight", unet_config)
        except KeyError:  # a layer LDM does not have (or that ldm_convert does not know yet)
            continue
        names[name] = ldm.removesuffix(".weight").replace(".", "_")
    return names


_INDEXED_MODELS = (("unet", "unet"), ("te1", "text_encoder"), ("te2", "text_encoder_2"))


def _module_index(bundle) -> dict[str, dict[str, Any]]:
    """part -> normalised module name -> module with a weight, for the bundle's UNet and text encoders.

    UNet layers are known by their diffusers names and by their LDM names (kohya's SDXL naming). The index is
    kept with the bundle (its modules stay the same objects while it is loaded), so a request pays nothing for it."""
    models = [bundle.components.get(key) for _, key in _INDEXED_MODELS]
    cached = bundle.cache.get("lora_module_index")
    if cached is not None and all(a is b for a, b in zip(cached[0], models)):
        return cached[1]
    import torch
    index: dict[str, dict[str, Any]] = {}
    for (part, _), model in zip(_INDEXED_MODELS, models):
        if model is None:
            continue
        layers = {name: module for name, module in model.named_modules()
                  if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
        names: dict[str, Any] = {}
        for name, module in layers.items():
            flat = name.replace(".", "_")
            names[flat] = module
            if part != "unet" and not flat.startswith("text_model_"):
                names["text_model_" + flat] = module  # kohya names CLIP's layers under text_model
        config = getattr(model, "config", None)
        if part == "unet" and config is not None and "down_block_types" in config:
            for name, ldm in ldm_unet_module_names(config, layers).items():
                names.setdefault(ldm, layers[name])
        index[part] = names
    bundle.cache["lora_module_index"] = (models, index)
    return index


def _scale(m: LoraModule) -> float:
    return (m.alpha / m.down.shape[0]) if m.alpha is not None else 1.0


def _is_matmul(m: LoraModule) -> bool:
    """A LoRA whose delta is a plain up @ down (linear layers and 1x1 convolutions)."""
    if isinstance(m, LycoModule):
        return False
    return not (m.down.ndim == 4 and tuple(m.down.shape[2:]) != (1, 1))


def _fits(m: LoraModule, weight_shape) -> bool:
    """Whether the LoRA's delta has the layer's shape (else the layer is skipped with a warning)."""
    if isinstance(m, LycoModule):
        return m.fits(weight_shape)
    out_features = m.up.shape[0]
    in_numel = m.down[0].numel()
    total = 1
    for d in weight_shape:
        total *= d
    return out_features == weight_shape[0] and out_features * in_numel == total and m.up.shape[1] == m.down.shape[0]


def _delta(m: LoraModule, weight_shape) -> Any:
    if isinstance(m, LycoModule):
        return m.delta(weight_shape)
    down, up = m.down, m.up
    scale = _scale(m)
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], down.shape[1], *down.shape[2:])
    else:
        delta = up.flatten(1) @ down.flatten(1)
    return (delta * scale).reshape(weight_shape)


@dataclass
class AppliedLora:
    info: LoraInfo
    te_multiplier: float
    unet_multiplier: float
    weights: LoraWeights


@contextlib.contextmanager
def applied_loras(bundle, loras: list[AppliedLora], warnings: list[str] | None = None) -> Iterator[None]:
    """Merge the LoRAs into the bundle's weights for the with-block; the originals come back on exit."""
    import torch
    if not loras:
        yield
        return
    index = _module_index(bundle)
    deltas: dict[int, tuple[Any, list]] = {}  # id(module) -> (module, [(LoraModule, multiplier), ...])
    for lora in loras:
        missed = 0
        for part, modules in lora.weights.modules.items():
            mult = lora.unet_multiplier if part == "unet" else lora.te_multiplier
            targets = index.get(part, {})
            for name, m in modules.items():
                module = targets.get(name)
                if module is None:
                    missed += 1
                    continue
                if mult == 0:
                    continue
                weight = module.weight
                if not _fits(m, weight.shape):
                    missed += 1
                    continue
                deltas.setdefault(id(module), (module, []))[1].append((lora.info.name, m, mult))
        if missed and warnings is not None:
            warnings.append(f"LoRA {lora.info.name}: {missed} of its layers do not match this checkpoint and were skipped")
    # The originals of every weight a LoRA has touched are kept with the bundle (in CPU RAM) after their first
    # use: cloning them afresh for each request cost more than the sampling saved (fresh multi-MB allocations
    # page-fault on every request), and restoring from an exact copy keeps removal bit-exact.
    originals = bundle.cache.setdefault("lora_originals", {})
    merged: list[Any] = []
    try:
        with torch.no_grad():
            for module, named_parts in deltas.values():
                # in name order, so that <lora:a> <lora:b> and <lora:b> <lora:a> give the same bits
                parts = [(m, mult) for _, m, mult in sorted(named_parts, key=lambda p: p[0])]
                weight = module.weight
                original = originals.get(id(module))
                if original is None or original.shape != weight.shape:
                    original = originals[id(module)] = weight.detach().to("cpu", copy=True)
                merged.append((weight, original))
                source = original.to(weight.device, non_blocking=True)
                if weight.dtype == torch.float32 and all(_is_matmul(m) for m, _ in parts):
                    # weight = original + sum(scale * up @ down), written in place with no full-size temporary:
                    # several LoRAs are one matmul over their factors side by side ([out, r1+r2+..] @ [r1+r2+.., in])
                    flat = weight.view(weight.shape[0], -1)
                    factors = [(m.up.flatten(1).to(weight.device).float(), m.down.flatten(1).to(weight.device).float(),
                                _scale(m) * mult) for m, mult in parts]
                    if len(factors) == 1:
                        up, down, alpha = factors[0]
                        torch.addmm(source.view(flat.shape), up, down, alpha=alpha, out=flat)
                    else:
                        up = torch.cat([u * alpha for u, _, alpha in factors], dim=1)
                        down = torch.cat([d for _, d, _ in factors], dim=0)
                        torch.addmm(source.view(flat.shape), up, down, out=flat)
                else:
                    delta = sum(_delta(m, weight.shape).to(weight.device) * mult for m, mult in parts)
                    weight.copy_((source.float() + delta).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for weight, original in merged:
                weight.copy_(original)  # the saved originals: removal is exact


# ------------------------------------------------------------------------------------- embeddings

class Embedding:
    """One textual inversion embedding: vectors per text-encoder width."""

    def __init__(self, name: str, path: Path, vectors: dict[int, Any], step: int | None = None,
                 checkpoint: str | None = None, checkpoint_name: str | None = None):
        self.name, self.path = name, path
        self._vectors = vectors
        self.step, self.checkpoint, self.checkpoint_name = step, checkpoint, checkpoint_name

    def vectors_for(self, dim: int):
        return self._vectors.get(dim)

    @property
    def count(self) -> int:
        return next(iter(self._vectors.values())).shape[0]

    @property
    def shape(self) -> int:
        """The vector width as A1111 reports it (an SDXL embedding: CLIP-L's plus CLIP-G's, 2048)."""
        return sum(self._vectors)

    @property
    def dims(self) -> set[int]:
        return set(self._vectors)

    @property
    def shorthash(self) -> str:
        return _hashes.get(self.path, sha256_file)[:12]


class EmbeddingError(ValueError):
    pass


def load_embedding(path: Path) -> Embedding:
    import torch
    name = path.stem
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EmbeddingError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name} is not an embedding file")
    step = checkpoint = checkpoint_name = None
    tensors: list[Any] = []
    if "string_to_param" in data:  # A1111's own .pt format
        tensors = list(data["string_to_param"].values())[:1]
        step, checkpoint, checkpoint_name = data.get("step"), data.get("sd_checkpoint"), data.get("sd_checkpoint_name")
    elif "emb_params" in data:
        tensors = [data["emb_params"]]
    elif "clip_l" in data or "clip_g" in data:  # SDXL: one set of vectors per encoder
        tensors = [data[k] for k in ("clip_l", "clip_g") if k in data]
    else:
        values = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if len(values) == 1:  # diffusers' {token: vector(s)}
            tensors = values
    vectors: dict[int, Any] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2):
            continue
        t = t.detach().float().reshape(-1, t.shape[-1])
        vectors[t.shape[-1]] = t
    if not vectors:
        raise EmbeddingError(f"{path.name} holds no embedding vectors of a known layout")
    return Embedding(name, path, vectors, step=step if isinstance(step, int) else None,
                     checkpoint=checkpoint if isinstance(checkpoint, str) else None,
                     checkpoint_name=checkpoint_name if isinstance(checkpoint_name, str) else None)


class EmbeddingDatabase:
    """The embeddings of some folders; files that fail to load are listed with why."""

    def __init__(self, dirs: list[Path]):
        self.dirs = list(dict.fromkeys(Path(d) for d in dirs))
        self._lock = threading.Lock()
        self._items: dict[str, Embedding] = {}
        self._errors: dict[str, str] = {}
        self._scanned = False

    def files(self) -> dict[str, Path]:
        """name -> file of every embedding file in the folders (the first of a name wins), nothing loaded: a
        listing that needs no torch (the UI builds its cards from it at start-up)."""
        found: dict[str, Path] = {}
        for root in self.dirs:
            if root.is_dir():
                for path in sorted(root.rglob("*")):
                    if path.suffix.lower() in EMBEDDING_EXTENSIONS and path.is_file():
                        found.setdefault(path.stem, path)
        return found

    def refresh(self) -> None:
        items, errors = {}, {}
        for name, path in self.files().items():
            try:
                items[name] = load_embedding(path)
            except EmbeddingError as exc:
                errors[name] = str(exc)
                log.warning("embedding skipped: %s", exc)
        with self._lock:
            self._items, self._errors, self._scanned = items, errors, True

    def all(self) -> dict[str, Embedding]:
        if not self._scanned:
            self.refresh()
        with self._lock:
            return dict(self._items)

    def errors(self) -> dict[str, str]:
        with self._lock:
            return dict(self._errors)

    def split_for(self, dims: set[int]) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped) for a model whose text encoders have these widths: an embedding is loaded when
        it has vectors for exactly those encoders (as A1111, an SD1 embedding is skipped by SDXL and an
        SDXL one, with CLIP-L and CLIP-G vectors, by SD1)."""
        loaded, skipped = {}, {}
        for name, emb in self.all().items():
            (loaded if emb.dims == set(dims) else skipped)[name] = emb
        return loaded, skipped


# ------------------------------------------------------------------------------------ prompt tags

@dataclass
class ResolvedNetworks:
    """A prompt's LoRA tags, resolved: what will be applied and what was ignored, and why."""
    prompt: str  # the prompt without tags
    loras: list[tuple[LoraInfo, float, float]] = field(default_factory=list)  # (info, te, unet)
    warnings: list[str] = field(default_factory=list)


def _parse_multiplier(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


_widths_cache: dict[tuple[str, int], frozenset[int]] = {}


def text_encoder_widths(info) -> set[int]:
    """The widths of a checkpoint's text encoders, read from its file header or configs (nothing loaded);
    cached per file version, since the UI's token counter asks on every keystroke."""
    if info is None:
        return set()
    path = Path(info.filename)
    try:
        key = (str(path), (path / "model_index.json" if path.is_dir() else path).stat().st_mtime_ns)
    except OSError:
        return set()
    cached = _widths_cache.get(key)
    if cached is not None:
        return set(cached)
    widths: set[int] = set()
    if path.is_dir():
        for sub in ("text_encoder", "text_encoder_2"):
            config = path / sub / "config.json"
            if not config.is_file():
                continue  # SD1/SD2 folders have one text encoder
            try:
                widths.add(int(json.loads(config.read_text()).get("hidden_size")))
            except (ValueError, TypeError, OSError) as exc:
                log.warning("checkpoint %s: cannot read %s/config.json: %s", info.name, sub, exc)
    elif path.suffix == ".safetensors":
        from modules.sd_models import CheckpointError, read_safetensors_shapes
        try:
            shapes = read_safetensors_shapes(path)
        except CheckpointError as exc:
            log.warning("checkpoint %s: cannot read its header for the text encoder widths: %s", info.name, exc)
            return widths
        widths.update(shape[1] for key, shape in shapes.items()
                      if key.endswith("token_embedding.weight") and len(shape) == 2)
    _widths_cache[key] = frozenset(widths)
    return widths


class ExtraNetworks:
    """The LoRA registry and the embedding database of one server."""

    def __init__(self, lora_dirs: list[Path], embedding_dirs: list[Path]):
        self.loras = LoraRegistry(lora_dirs)
        self.embeddings = EmbeddingDatabase(embedding_dirs)
        self.loras.refresh()

    def embeddings_for(self, checkpoint) -> tuple[dict[str, Embedding], dict[str, Embedding]]:
        """(loaded, skipped) embeddings for a checkpoint (all loaded when its widths cannot be read)."""
        widths = text_encoder_widths(checkpoint)
        return self.embeddings.split_for(widths) if widths else (self.embeddings.all(), {})

    def resolve(self, prompt: str) -> ResolvedNetworks:
        text, tags = prompt_parser.parse_extra_networks(prompt)
        out = ResolvedNetworks(prompt=text)
        seen: set[str] = set()
        for tag in tags:
            if tag.kind not in ("lora", "lyco"):
                out.warnings.append(f"{tag.text} ignored: unknown extra network type {tag.kind!r} (only lora is supported)")
                continue
            name = tag.args[0].strip()
            info = self.loras.find(name)
            if info is None:
                out.warnings.append(f"{tag.text} ignored: no LoRA named {name!r} in {', '.join(map(str, self.loras.dirs))}")
                continue
            values = [a.strip() for a in tag.args[1:3]]
            mults = [_parse_multiplier(v) for v in values]
            if any(m is None for m in mults):
                bad = next(v for v, m in zip(values, mults) if m is None)
                out.warnings.append(f"{tag.text} ignored: {bad!r} is not a number")
                continue
            te = mults[0] if mults else 1.0
            unet = mults[1] if len(mults) > 1 else te
            if info.name in seen:
                out.warnings.append(f"{tag.text} ignored: LoRA {info.name!r} is already in the prompt")
                continue
            seen.add(info.name)
            out.loras.append((info, te, unet))
        return out

    @contextlib.contextmanager
    def leased(self, manager, resolved: ResolvedNetworks, warnings: list[str]) -> Iterator[list[AppliedLora]]:
        """Lease every resolved LoRA from the model manager (loaded once, then cached); unreadable files
        are skipped with a warning."""
        with contextlib.ExitStack() as stack:
            applied = []
            for info, te, unet in resolved.loras:
                st = info.path.stat()
                key = f"lora:{info.path}:{st.st_size}:{st.st_mtime_ns}"
                try:
                    weights = stack.enter_context(manager.use(key, lambda info=info: load_lora(info.path, info.name),
                                                              kind="lora", name=f"LoRA {info.name}"))
                except LoraFileError as exc:
                    warnings.append(f"<lora:{info.name}> ignored: {exc}")
                    continue
                if weights.unknown_keys:
                    warnings.append(f"<lora:{info.name}>: {len(weights.unknown_keys)} of its tensors are of a kind "
                                    f"this studio does not read (e.g. {weights.unknown_keys[0]}) and were left out")
                applied.append(AppliedLora(info, te, unet, weights))
            yield applied


# ------------------------------------------------------------------------------------------- cards

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.jpeg", ".jpeg", ".preview.webp",
                    ".webp")


@dataclass(frozen=True)
class Card:
    """One entry of the extra-networks panel: what the prompt gets (`tag`), the picture beside the file
    (A1111's NAME.png / NAME.preview.png), and whether it fits the checkpoint (None: cannot tell)."""
    kind: str  # "lora" | "embedding"
    name: str
    tag: str
    path: Path
    preview: Path | None
    applies: bool | None


def _preview_of(path: Path) -> Path | None:
    stem = path.with_suffix("")
    for suffix in PREVIEW_SUFFIXES:
        candidate = stem.parent / (stem.name + suffix)
        if candidate.is_file():
            return candidate
    return None


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]] | None:
    if path.suffix.lower() != ".safetensors":
        return None  # a pickle: its shapes need torch.load, which a listing does not do
    from modules.sd_models import CheckpointError, read_safetensors_shapes
    try:
        return read_safetensors_shapes(path)
    except CheckpointError as exc:
        log.warning("%s: cannot read its header: %s", path.name, exc)
        return None


def lora_context_width(path: Path) -> int | None:
    """The text-conditioning width a LoRA file was trained for (SD1 768, SD2 1024, SDXL 2048), from the input
    width of its cross-attention key/value layers; None when the header does not tell."""
    shapes = _header_shapes(path) or {}
    for key, shape in shapes.items():
        if "attn2" in key and ("to_k" in key or "to_v" in key) and ("down" in key or "lora_A" in key) and len(shape) == 2:
            return shape[1]
    return None


def embedding_file_widths(path: Path) -> set[int] | None:
    """The vector widths an embedding file holds (from its header); None when the header does not tell."""
    shapes = _header_shapes(path)
    if not shapes:
        return None
    return {shape[-1] for shape in shapes.values() if len(shape) in (1, 2)} or None


def cards_for(networks: "ExtraNetworks", checkpoint) -> list[Card]:
    """The LoRA and embedding cards, with whether each applies to `checkpoint`: a LoRA when its conditioning
    width is the checkpoint's (the sum of its text encoders' widths), an embedding when its vector widths are
    exactly the encoders' (as generation decides). Nothing is loaded: headers and file names only."""
    widths = text_encoder_widths(checkpoint)
    cards = []
    for info in networks.loras.list():
        width = lora_context_width(info.path)
        applies = None if not widths or width is None else width == sum(widths)
        cards.append(Card("lora", info.name, f"<lora:{info.name}:1>", info.path, _preview_of(info.path), applies))
    for name, path in sorted(networks.embeddings.files().items()):
        dims = embedding_file_widths(path)
        applies = None if not widths or dims is None else dims == set(widths)
        cards.append(Card("embedding", name, name, path, _preview_of(path), applies))
    return cards


def for_folders(folders, demo: bool = False) -> ExtraNetworks:
    """The server's extra networks: --lora-dir (default MODELS/Lora), --embeddings-dir (default
    DATA/embeddings) and MODELS/embeddings, plus the demo set's folders with --demo."""
    lora_dirs = [folders.lora_dir]
    embedding_dirs = [folders.embeddings_dir, folders.models_dir / "embeddings"]
    if demo:
        demo_root = folders.data_dir / "demo-models"
        lora_dirs.append(demo_root / "Lora")
        embedding_dirs.append(demo_root / "embeddings")
    return ExtraNetworks(lora_dirs, embedding_dirs)
