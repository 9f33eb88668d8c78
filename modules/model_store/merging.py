"""A1111's Checkpoint Merger: two or three single-file checkpoints -> one new checkpoint in the model folder.

Methods (A1111's names), with m the multiplier in [0, 1]:
- "Weighted sum": A * (1 - m) + B * m
- "Add difference": A + (B - C) * m
- "No interpolation": A as it is (to convert a `.ckpt` to `.safetensors`, save as float16, bake in a VAE or
  discard weights).

What A1111 does, and so does this:
- only A's keys are written; a key B (or C) lacks keeps A's value, as do keys without "model" in their name
  (the noise-schedule buffers), integer tensors and `..embeddings.position_ids`;
- an inpainting A (9-channel UNet input) with an ordinary B (4 channels): the first 4 input channels are
  merged, the other 5 are A's, and the default name gets ".inpainting" (A1111's rule); an ordinary A with an
  inpainting B is refused ("A must be the inpainting model"), as is any other shape that differs;
- "bake in VAE" replaces A's `first_stage_model.*` weights by a VAE file's (LDM keys, with or without the
  prefix; a diffusers-layout VAE is renamed first); "discard weights" drops every key its regex finds
  (`re.search`), after the VAE is baked in;
- "save metadata" writes A1111's `format: pt`, `sd_merge_recipe` and `sd_merge_models` (with the inputs'
  own recipes); `config_source` copies a `NAME.yaml` beside A, B or C to the new name (0 "A, B or C": the
  first found; 1 "B"; 2 "C"; 3 "Don't").

Beyond A1111: the models must be of one family (SD1 / SD2 / SDXL); an existing file is never replaced
unless `overwrite` is asked for, and never one of the models being merged; the metadata the loader needs to
read A right (`diffusers_configs`, the ModelSpec prediction type) is carried over even without "save
metadata"; "save as float16" turns every floating-point tensor to float16 (A1111 misses the keys it did not
merge). Otherwise the result keeps A's dtypes; the maths is done in float32.

Memory: one tensor at a time. A `.safetensors` input is read tensor by tensor with plain reads at the offsets
its header gives (not memory-mapped, so the file's pages never count in the process's memory), and a
`.safetensors` output is written the same way, header first, then each tensor as it is made, to a temp file
beside the target that replaces it at the end (sha256 computed on the way). A `.ckpt` input is loaded whole
(pickles cannot be read in parts), and a `.ckpt` output is built whole (torch.save of {"state_dict": tensors},
loadable with `torch.load(weights_only=True)`; it carries no metadata).

torch is imported inside the functions that need it: the UI reads this module's constants without it.
"""
from __future__ import annotations

import abc
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.model_store.checkpoint_files import (
    DIFFUSERS_CONFIGS_METADATA_KEY,
    MAX_SAFETENSORS_HEADER_BYTES,
    CheckpointError,
    detect_architecture,
    load_state_dict_and_extras,
)
from modules.model_store.hashing import sha256_of_file

if TYPE_CHECKING:
    import torch

    from modules.model_store.checkpoints import CheckpointInfo, CheckpointRegistry
    from modules.model_store.sd_vae import VaeInfo, VaeRegistry

log = logging.getLogger(__name__)

WEIGHTED_SUM = "Weighted sum"
ADD_DIFFERENCE = "Add difference"
NO_INTERPOLATION = "No interpolation"
INTERP_METHODS = (WEIGHTED_SUM, ADD_DIFFERENCE, NO_INTERPOLATION)
CHECKPOINT_FORMATS = ("safetensors", "ckpt")
CONFIG_SOURCES = ("A, B or C", "B", "C", "Don't")  # A1111's radio, sent as its index
NO_VAE = "None"
# A1111's checkpoint_dict_skip_on_merge: a buffer of fixed integers, never merged
SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
# metadata that tells the loader how to read A's tensors: kept in the result even without "save metadata"
STRUCTURAL_METADATA = (DIFFUSERS_CONFIGS_METADATA_KEY, "modelspec.prediction_type", "modelspec.architecture")
VAE_PREFIX = "first_stage_model."
MAX_NAME_LENGTH = 200

ProgressCallback = Callable[[int, int, str], None]  # (done, total, what is happening)


class MergeError(ValueError):
    """A merge that cannot be done as asked (bad options, models that do not fit together); the message says why."""


class OutputExistsError(MergeError):
    """The result's file name is taken (and overwriting was not asked for)."""


@dataclass
class MergeRequest:
    """The Checkpoint Merger's inputs, named as A1111's merger arguments (plus `overwrite`)."""
    primary_model_name: str = ""
    secondary_model_name: str | None = None
    tertiary_model_name: str | None = None
    interp_method: str = WEIGHTED_SUM
    multiplier: float = 0.3
    save_as_half: bool = False
    custom_name: str = ""
    checkpoint_format: str = "safetensors"
    config_source: int | str = 0
    bake_in_vae: str | None = NO_VAE
    discard_weights: str = ""
    save_metadata: bool = True
    overwrite: bool = False


@dataclass(frozen=True)
class MergeResult:
    path: Path
    sha256: str
    config: Path | None = None  # the .yaml copied beside it, if any
    is_inpainting: bool = False


# -------------------------------------------------------------------------------------------------------------
# Reading tensors one at a time


def _torch_dtypes() -> dict[str, "torch.dtype"]:
    import torch

    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    for code, name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, name):
            table[code] = getattr(torch, name)
    return table


class _Source(abc.ABC):
    """The tensors of one file, by key: their shapes and dtypes at once, their values one at a time. Made by
    `_SafetensorsSource` (streamed), `_DictSource` (a .ckpt loaded whole) and `_Renamed` (a VAE's keys mapped)."""
    path: Path
    metadata: dict[str, str]

    @abc.abstractmethod
    def keys(self) -> list[str]: ...

    @abc.abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def dtype(self, key: str) -> "torch.dtype": ...

    @abc.abstractmethod
    def get(self, key: str) -> "torch.Tensor": ...

    def close(self) -> None:
        pass

    def __contains__(self, key: str) -> bool:
        return key in self._key_set()

    def _key_set(self) -> set[str]:
        cached = getattr(self, "_keys_cache", None)
        if cached is None:
            cached = self._keys_cache = set(self.keys())
        return cached

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}


class _SafetensorsSource(_Source):
    """A .safetensors file read with plain reads at the offsets of its header (no mmap, no whole-file load)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            self._file = open(path, "rb", buffering=0)
        except OSError as e:
            raise CheckpointError(f"Cannot read {path}: {e}") from e
        try:
            head = self._file.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path.name} is not a safetensors file (too short).")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_SAFETENSORS_HEADER_BYTES or header_len + 8 > size:
                raise CheckpointError(f"{path.name} is not a valid safetensors file (bad header length).")
            header = json.loads(self._file.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
            self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
            self._start = 8 + header_len
            codes = _torch_dtypes()
            self._entries: dict[str, tuple["torch.dtype", tuple[int, ...], int, int]] = {}
            for key, info in header.items():
                if info["dtype"] not in codes:
                    raise CheckpointError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which cannot be "
                                          "merged")
                begin, end = (int(n) for n in info["data_offsets"])
                shape = tuple(int(n) for n in info["shape"])
                dtype = codes[info["dtype"]]
                if end < begin or self._start + end > size or end - begin != math.prod(shape) * dtype.itemsize:
                    raise CheckpointError(f"{path.name} is not a valid safetensors file (bad offsets for {key}).")
                self._entries[str(key)] = (dtype, shape, begin, end)
        except CheckpointError:
            self._file.close()
            raise
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
            self._file.close()
            raise CheckpointError(f"{path.name} is not a valid safetensors file: {e}") from e

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def dtype(self, key: str) -> "torch.dtype":
        return self._entries[key][0]

    def get(self, key: str) -> "torch.Tensor":
        import torch

        dtype, shape, begin, end = self._entries[key]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
        self._file.seek(self._start + begin)
        done = 0
        while done < len(view):
            n = self._file.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{self.path.name} ended inside tensor {key}")
            done += n
        return buffer.view(dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()


class _DictSource(_Source):
    """Tensors already in memory: a pickle (`.ckpt`, `.pt`) loaded whole, or a converted VAE."""

    def __init__(self, path: Path, tensors: Mapping[str, "torch.Tensor"], metadata: dict[str, str] | None = None):
        self.path = path
        self._tensors = dict(tensors)
        self.metadata = metadata or {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> "torch.dtype":
        return self._tensors[key].dtype

    def get(self, key: str) -> "torch.Tensor":
        return self._tensors[key]


class _Renamed(_Source):
    """Another source under other key names (a VAE file's keys as `first_stage_model.*`)."""

    def __init__(self, source: _Source, names: Mapping[str, str]):
        self.path, self.metadata = source.path, source.metadata
        self._source, self._names = source, dict(names)  # new name -> the source's

    def keys(self) -> list[str]:
        return list(self._names)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source.shape(self._names[key])

    def dtype(self, key: str) -> "torch.dtype":
        return self._source.dtype(self._names[key])

    def get(self, key: str) -> "torch.Tensor":
        return self._source.get(self._names[key])

    def close(self) -> None:
        self._source.close()


def _open_checkpoint(path: Path) -> _Source:
    if path.suffix.lower() == ".safetensors":
        return _SafetensorsSource(path)
    log.info("loading %s whole (a pickle cannot be read tensor by tensor)", path.name)
    tensors, extras = load_state_dict_and_extras(path)
    return _DictSource(path, tensors)


def _vae_source(info: "VaeInfo", whole: bool) -> _Source | None:
    """A VAE file's tensors under `first_stage_model.*` names; None for a pickle when `whole` is false (its
    shapes are only known after loading it, which the checks before queueing skip)."""
    file = info.weights_file()
    if file.suffix.lower() == ".safetensors":
        source: _Source = _SafetensorsSource(file)
    elif whole:
        source = _DictSource(file, load_state_dict_and_extras(file)[0])
    else:
        return None
    keys = source.keys()
    if any(k.startswith("vae.") for k in keys):
        source, keys = _Renamed(source, {k.removeprefix("vae."): k for k in keys}), [k.removeprefix("vae.") for k in keys]
    if any(".down_blocks." in k or k.startswith("decoder.up_blocks.") for k in keys):
        # diffusers' own layout: renamed to LDM's with the project's converter (the tensors are loaded: a VAE is small)
        if not whole:
            return None
        from modules.model_store.ldm_convert import vae_to_ldm

        state = {k: source.get(k) for k in keys}
        source.close()
        blocks = 1 + max((int(m[1]) for k in keys if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))), default=0)
        try:
            converted = vae_to_ldm(state, {"down_block_types": [None] * blocks})
        except ValueError as e:
            raise MergeError(f"VAE {info.name}: {e}") from None
        return _DictSource(file, converted)
    return _Renamed(source, {VAE_PREFIX + k.removeprefix(VAE_PREFIX): k for k in keys
                             if not k.startswith(("loss.", "model_ema."))})


# -------------------------------------------------------------------------------------------------------------
# Checking a request


@dataclass
class _Spec:
    method: str
    multiplier: float
    fmt: str
    config_source: int
    discard: re.Pattern | None
    custom_name: str
    vae: str | None
    half: bool


def _config_source_index(value: int | str | None) -> int:
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise MergeError(f"config_source must be 0-3 or one of {', '.join(CONFIG_SOURCES)}")
    if isinstance(value, int):
        if 0 <= value < len(CONFIG_SOURCES):
            return value
    else:
        text = str(value).strip()
        if text.isdigit() and int(text) < len(CONFIG_SOURCES):
            return int(text)
        for i, name in enumerate(CONFIG_SOURCES):
            if text.lower() in (name.lower(), name.lower().replace("'", "")):
                return i
        if text.lower() in ("a", "none", "no", "dont"):
            return 0 if text.lower() == "a" else 3
    raise MergeError(f"config_source {value!r}: use 0-3 or one of {', '.join(repr(c) for c in CONFIG_SOURCES)}")


def _spec(req: MergeRequest) -> _Spec:
    method = next((m for m in INTERP_METHODS if m.lower() == str(req.interp_method or "").strip().lower()), None)
    if method is None:
        raise MergeError(f"interp_method {req.interp_method!r}: use one of {', '.join(INTERP_METHODS)}")
    try:
        multiplier = float(req.multiplier)
    except (TypeError, ValueError):
        raise MergeError(f"multiplier {req.multiplier!r} is not a number") from None
    if not (0.0 <= multiplier <= 1.0):  # NaN fails this too
        raise MergeError(f"multiplier {req.multiplier} is out of range: it goes from 0 to 1")
    fmt = str(req.checkpoint_format or "").strip().lower().lstrip(".")
    if fmt not in CHECKPOINT_FORMATS:
        raise MergeError(f"checkpoint_format {req.checkpoint_format!r}: use safetensors or ckpt")
    discard = None
    if req.discard_weights and req.discard_weights.strip():
        try:
            discard = re.compile(req.discard_weights.strip())
        except re.error as e:
            raise MergeError(f"discard_weights {req.discard_weights!r} is not a valid regular expression: {e}") from None
    name = (req.custom_name or "").strip()
    for ext in (".safetensors", ".ckpt"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)].rstrip()
    if name:
        if any(c in name for c in "/\\\0") or name.startswith(".") or any(ord(c) < 32 for c in name):
            raise MergeError(f"custom_name {req.custom_name!r}: a plain file name, without folders, that does not "
                             "start with a dot")
        if len(name) > MAX_NAME_LENGTH:
            raise MergeError(f"custom_name is longer than {MAX_NAME_LENGTH} characters")
    vae = (req.bake_in_vae or "").strip()
    return _Spec(method, multiplier, fmt, _config_source_index(req.config_source), discard, name,
                 None if vae in ("", NO_VAE) else vae, bool(req.save_as_half))


def _resolve(registry: "CheckpointRegistry", text: str | None, role: str, needed_for: str) -> "CheckpointInfo":
    from modules.model_store.checkpoint_files import CheckpointNotFoundError

    if not text or not str(text).strip():
        raise MergeError(f"{needed_for} needs a {role}")
    try:
        info = registry.resolve(str(text))
    except CheckpointNotFoundError as e:
        raise MergeError(f"{role}: {e}") from None
    if info.is_diffusers_folder:
        raise MergeError(f"{role}: {info.name} is a diffusers folder; the merger takes single-file checkpoints "
                         "(.safetensors or .ckpt)")
    return info


def _stem(info: "CheckpointInfo") -> str:
    return Path(info.filename).stem


def _number(m: float) -> str:
    return f"{round(m, 2):g}"


def default_name(method: str, multiplier: float, a: "CheckpointInfo", b: "CheckpointInfo | None",
                 c: "CheckpointInfo | None") -> str:
    """The result's name when none is given: "A_B_0.3" (weighted sum, the multiplier is B's share),
    "A_B_minus_C_0.3" (add difference), "A" (no interpolation; a conversion then keeps the name)."""
    if method == WEIGHTED_SUM:
        return f"{_stem(a)}_{_stem(b)}_{_number(multiplier)}"
    if method == ADD_DIFFERENCE:
        return f"{_stem(a)}_{_stem(b)}_minus_{_stem(c)}_{_number(multiplier)}"
    return _stem(a)


@dataclass
class _Item:
    key: str
    how: str  # "copy" (A's), "merge", "slice" (the first input channels merged), "vae"
    dtype: "torch.dtype"
    shape: tuple[int, ...]


@dataclass
class _Plan:
    spec: _Spec
    req: MergeRequest
    a: "CheckpointInfo"
    b: "CheckpointInfo | None"
    c: "CheckpointInfo | None"
    vae: "VaeInfo | None"
    output: Path
    items: list[_Item] | None = None  # None when a pickle's shapes were not read (the checks before queueing)
    is_inpainting: bool = False
    sources: dict[str, _Source] = field(default_factory=dict)  # "a", "b", "c", "vae"

    def close(self) -> None:
        for source in {id(s): s for s in self.sources.values()}.values():
            source.close()
        self.sources.clear()


def _is_float(dtype) -> bool:
    return dtype.is_floating_point


def _plan_items(spec: _Spec, sources: dict[str, _Source], names: dict[str, str]) -> tuple[list[_Item], bool]:
    import torch

    a, b, c, vae = sources["a"], sources.get("b"), sources.get("c"), sources.get("vae")
    uses_b = spec.method != NO_INTERPOLATION
    uses_c = spec.method == ADD_DIFFERENCE
    items: list[_Item] = []
    inpainting = False
    vae_hits = 0
    for key in sorted(a.keys()):
        if spec.discard is not None and spec.discard.search(key):
            continue
        dtype, shape = a.dtype(key), a.shape(key)
        out_dtype = torch.float16 if spec.half and _is_float(dtype) and dtype.itemsize > 1 else dtype
        if vae is not None and key in vae:
            if vae.shape(key) != shape:
                raise MergeError(f"VAE {names['vae']} does not fit A: {key} is {list(vae.shape(key))} in the VAE, "
                                 f"{list(shape)} in A")
            vdtype = vae.dtype(key)
            vae_out = torch.float16 if spec.half and _is_float(vdtype) and vdtype.itemsize > 1 else vdtype
            items.append(_Item(key, "vae", vae_out, shape))
            vae_hits += 1
            continue
        mergeable = (uses_b and key in b and "model" in key and key not in SKIP_ON_MERGE and _is_float(dtype)
                     and _is_float(b.dtype(key)) and (not uses_c or (key in c and _is_float(c.dtype(key)))))
        if not mergeable:
            items.append(_Item(key, "copy", out_dtype, shape))
            continue
        b_shape = b.shape(key)
        if uses_c and c.shape(key) != b_shape:
            raise MergeError(f"B ({names['b']}) and C ({names['c']}) do not fit together: {key} is {list(b_shape)} in "
                             f"B, {list(c.shape(key))} in C")
        if b_shape == shape:
            items.append(_Item(key, "merge", out_dtype, shape))
            continue
        if len(shape) == 4 and len(b_shape) == 4 and shape[0] == b_shape[0] and shape[2:] == b_shape[2:]:
            if shape[1] < b_shape[1]:
                kind = "an inpainting" if b_shape[1] == 9 else "a channel-extended"
                raise MergeError(f"When merging {kind} model with a normal one, A must be the {kind.split()[-1]} "
                                 f"model: B ({names['b']}) takes {b_shape[1]} input channels, A ({names['a']}) "
                                 f"{shape[1]}")
            if shape[1] in (8, 9) and b_shape[1] == 4:
                items.append(_Item(key, "slice", out_dtype, shape))
                inpainting = inpainting or shape[1] == 9
                continue
        raise MergeError(f"A ({names['a']}) and B ({names['b']}) do not fit together: {key} is {list(shape)} in A, "
                         f"{list(b_shape)} in B")
    if vae is not None and not vae_hits:
        raise MergeError(f"VAE {names['vae']} has no weights that A's VAE (first_stage_model.*) has")
    return items, inpainting


def _check_family(sources: dict[str, _Source], names: dict[str, str]) -> None:
    families = {}
    for role in ("a", "b", "c"):
        source = sources.get(role)
        if source is None:
            continue
        try:
            arch = detect_architecture(source.shapes(), metadata=source.metadata)
        except CheckpointError as e:
            raise CheckpointError(f"{role.upper()} ({names[role]}): {e}") from None
        families[role] = arch.family
    first = families["a"]
    for role, family in families.items():
        if family != first:
            raise MergeError(f"A ({names['a']}) is an {first.upper()} model but {role.upper()} ({names[role]}) is "
                             f"{family.upper()}: only models of one family can be merged")


def _prepare(registry: "CheckpointRegistry", vaes: "VaeRegistry | None", req: MergeRequest, output_dir: Path,
             whole: bool) -> _Plan:
    """Check everything that can be checked (names, options, shapes, the output file) and open the inputs.
    With `whole` false (the checks before a job is queued) pickles are not loaded, so their shapes wait."""
    spec = _spec(req)
    a = _resolve(registry, req.primary_model_name, "primary model (A)", "Merging")
    b = _resolve(registry, req.secondary_model_name, "secondary model (B)", spec.method) \
        if spec.method != NO_INTERPOLATION else None
    c = _resolve(registry, req.tertiary_model_name, "tertiary model (C)", spec.method) \
        if spec.method == ADD_DIFFERENCE else None
    vae = None
    if spec.vae is not None:
        from modules.model_store.sd_vae import UnknownVaeError

        vae = vaes.find(spec.vae) if vaes is not None else None
        if vae is None:
            listed = ", ".join(vaes.names()) if vaes is not None and vaes.names() else "none"
            raise UnknownVaeError(f"VAE {spec.vae!r} not found (available: {listed})")
    plan = _Plan(spec, req, a, b, c, vae, output=Path())
    names = {"a": a.name, "b": b.name if b else "", "c": c.name if c else "", "vae": vae.name if vae else ""}
    try:
        opened: dict[str, _Source] = {}
        for role, info in (("a", a), ("b", b), ("c", c)):
            if info is None:
                continue
            path = Path(info.filename)
            if str(path) in opened:
                plan.sources[role] = opened[str(path)]
            elif whole or path.suffix.lower() == ".safetensors":
                plan.sources[role] = opened[str(path)] = _open_checkpoint(path)
        if vae is not None:
            source = _vae_source(vae, whole)
            if source is not None:
                plan.sources["vae"] = source
        readable = all(role in plan.sources for role, info in (("a", a), ("b", b), ("c", c)) if info is not None)
        if readable:
            _check_family(plan.sources, names)
            if vae is None or "vae" in plan.sources:
                plan.items, plan.is_inpainting = _plan_items(spec, plan.sources, names)
        name = spec.custom_name or default_name(spec.method, spec.multiplier, a, b, c)
        if plan.is_inpainting and not name.lower().endswith("inpainting"):
            name += ".inpainting"  # A1111's suffix for an inpainting result
        plan.output = Path(output_dir) / f"{name}.{spec.fmt}"
        _check_output(plan.output, [i for i in (a, b, c) if i is not None], req.overwrite)
    except BaseException:
        plan.close()
        raise
    return plan


def _check_output(path: Path, inputs: list["CheckpointInfo"], overwrite: bool) -> None:
    for info in inputs:
        same = os.path.samefile(path, info.filename) if path.exists() else os.path.abspath(path) == info.filename
        if same:
            raise MergeError(f"the result would replace {info.name}, one of the models being merged; give it "
                             "another name (custom_name)")
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; give the result another name (custom_name)")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path.name} already exists in {path.parent}; give the result another name "
                                "(custom_name) or allow overwriting it")


def check(registry: "CheckpointRegistry", vaes: "VaeRegistry | None", req: MergeRequest,
          output_dir: str | os.PathLike) -> Path:
    """The file the merge would write, after every check that reads no more than safetensors headers (so a
    request can be refused before it is queued). Raises MergeError (OutputExistsError), CheckpointError or
    UnknownVaeError, all ValueErrors, with a message saying what to change."""
    plan = _prepare(registry, vaes, req, Path(output_dir), whole=False)
    plan.close()
    return plan.output


# -------------------------------------------------------------------------------------------------------------
# Merging


def _compute_dtype(dtype):
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _combine(method: str, m: float, a, b, c):
    """A * (1 - m) + B * m, or A + (B - C) * m, in float32 (float64 for a float64 A)."""
    dtype = _compute_dtype(a.dtype)
    if method == WEIGHTED_SUM:
        out = a.to(dtype) * (1.0 - m)
        out.add_(b.to(dtype), alpha=m)
        return out
    out = b.to(dtype) - c.to(dtype)
    out.mul_(m)
    out.add_(a.to(dtype))
    return out


def _make(plan: _Plan, item: _Item):
    s = plan.sources
    if item.how == "vae":
        return s["vae"].get(item.key).to(item.dtype)
    a = s["a"].get(item.key)
    if item.how == "copy":
        return a.to(item.dtype)
    b = s["b"].get(item.key)
    c = s["c"].get(item.key) if plan.spec.method == ADD_DIFFERENCE else None
    method, m = plan.spec.method, plan.spec.multiplier
    if item.how == "merge":
        return _combine(method, m, a, b, c).to(item.dtype)
    out = a.to(_compute_dtype(a.dtype), copy=True)
    n = b.shape[1]
    out[:, :n] = _combine(method, m, out[:, :n], b, c)
    return out.to(item.dtype)


def _safetensors_codes() -> dict[Any, str]:
    return {dtype: code for code, dtype in _torch_dtypes().items()}


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _install(tmp: Path, path: Path, overwrite: bool) -> None:
    """Put the finished temp file in place: replacing only when asked; otherwise a hard link, which fails
    rather than replace a file that appeared meanwhile (plain rename where links are not supported)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path.name} appeared in {path.parent} while merging; nothing was replaced") from None
    except OSError:
        if path.exists():
            raise OutputExistsError(f"{path.name} appeared in {path.parent} while merging; nothing was replaced") \
                from None
        os.replace(tmp, path)


def _write_safetensors(plan: _Plan, metadata: dict[str, str], progress: ProgressCallback) -> str:
    import torch

    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; this writer assumes a little-endian host")
    codes = _safetensors_codes()
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for item in plan.items:
        size = math.prod(item.shape) * item.dtype.itemsize
        header[item.key] = {"dtype": codes[item.dtype], "shape": list(item.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    tmp = _temp_beside(plan.output)
    total = len(plan.items)
    try:
        with open(tmp, "xb") as f:
            for chunk in (struct.pack("<Q", len(raw)), raw):
                f.write(chunk)
                digest.update(chunk)
            for i, item in enumerate(plan.items):
                progress(i, total, _what(plan, item))
                tensor = _make(plan, item)
                if tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
                    raise RuntimeError(f"{item.key}: made {tuple(tensor.shape)} {tensor.dtype}, planned {item.shape} "
                                       f"{item.dtype}")
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                digest.update(memoryview(data))
                del tensor, data
            progress(total, total, "Saving")
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, plan.output, plan.req.overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def _write_ckpt(plan: _Plan, progress: ProgressCallback) -> str:
    import torch

    state = {}
    total = len(plan.items)
    for i, item in enumerate(plan.items):
        progress(i, total, _what(plan, item))
        state[item.key] = _make(plan, item).contiguous()
    progress(total, total, "Saving")
    tmp = _temp_beside(plan.output)
    try:
        with open(tmp, "xb") as f:
            torch.save({"state_dict": state}, f)
            f.flush()
            os.fsync(f.fileno())
        del state
        digest = sha256_of_file(tmp)
        _install(tmp, plan.output, plan.req.overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def _what(plan: _Plan, item: _Item) -> str:
    if item.how == "vae":
        return "Baking in VAE"
    if item.how == "copy":
        return "Copying A"
    return "Merging A and B" if plan.spec.method == WEIGHTED_SUM else "Adding B - C to A"


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit model hash: sha256 of the 64 KiB at offset 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def _json_field(metadata: Mapping[str, str], key: str) -> Any:
    value = metadata.get(key)
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


def _metadata(plan: _Plan, progress: ProgressCallback) -> dict[str, str]:
    a_meta = plan.sources["a"].metadata
    metadata = {k: a_meta[k] for k in STRUCTURAL_METADATA if k in a_meta}
    if not plan.req.save_metadata:
        return metadata
    infos = [(role, info) for role, info in (("a", plan.a), ("b", plan.b), ("c", plan.c)) if info is not None]
    hashes = {}
    for role, info in infos:
        progress(0, len(plan.items), f"Hashing {role.upper()}")
        hashes[role] = info.sha256
    spec = plan.spec
    recipe = {
        "type": "webui",
        "primary_model_hash": hashes["a"],
        "secondary_model_hash": hashes.get("b"),
        "tertiary_model_hash": hashes.get("c"),
        "interp_method": spec.method,
        "multiplier": spec.multiplier,
        "save_as_half": bool(plan.req.save_as_half),
        "custom_name": plan.req.custom_name or "",
        "config_source": spec.config_source,
        "bake_in_vae": plan.vae.name if plan.vae is not None else NO_VAE,
        "discard_weights": plan.req.discard_weights or "",
        "is_inpainting": plan.is_inpainting,
        "is_instruct_pix2pix": False,  # 8-channel models are not loaded by this project, so never merged
    }
    models: dict[str, Any] = {}
    for role, info in infos:
        meta = plan.sources[role].metadata
        models[hashes[role]] = {"name": info.name, "legacy_hash": legacy_hash(info.filename),
                                "sd_merge_recipe": _json_field(meta, "sd_merge_recipe")}
        inherited = _json_field(meta, "sd_merge_models")
        if isinstance(inherited, dict):
            models.update(inherited)
    metadata.update({"format": "pt", "sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)})
    return metadata


def _copy_config(plan: _Plan) -> Path | None:
    """A1111's "Copy config from": NAME.yaml beside A, B or C (the first there is), B, C, or none."""
    def beside(info):
        if info is None:
            return None
        yaml = Path(info.filename).with_suffix(".yaml")
        return yaml if yaml.is_file() else None

    source = plan.spec.config_source
    if source == 0:
        found = beside(plan.a) or beside(plan.b) or beside(plan.c)
    elif source == 1:
        found = beside(plan.b)
    elif source == 2:
        found = beside(plan.c)
    else:
        found = None
    if found is None:
        return None
    target = plan.output.with_suffix(".yaml")
    tmp = _temp_beside(target)
    try:
        shutil.copyfile(found, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("copied the config %s to %s", found, target)
    return target


def merge_checkpoints(registry: "CheckpointRegistry", vaes: "VaeRegistry | None", req: MergeRequest,
                      progress_callback: ProgressCallback | None = None, *,
                      output_dir: str | os.PathLike | None = None) -> MergeResult:
    """Merge as `req` says into `output_dir` (default: the registry's first folder), list the result
    (`registry.refresh()`) and return where it is and its sha256 (recorded in the hash cache, so listing it
    hashes nothing). Bad input raises before anything is written: MergeError (OutputExistsError),
    CheckpointError, UnknownVaeError (all ValueErrors). `progress_callback(done, total, text)` is called as
    tensors are made; an exception from it (an interrupted job) stops the merge and leaves no file."""
    if output_dir is None:
        if not registry.dirs:
            raise MergeError("there is no checkpoint folder to write the result to")
        output_dir = registry.dirs[0]
    progress = progress_callback or (lambda done, total, text: None)
    progress(0, 1, "Reading models")
    plan = _prepare(registry, vaes, req, Path(output_dir), whole=True)
    try:
        plan.output.parent.mkdir(parents=True, exist_ok=True)
        metadata = _metadata(plan, progress)
        log.info("merging %s -> %s (%s, multiplier %s)", ", ".join(i.name for i in (plan.a, plan.b, plan.c) if i),
                 plan.output, plan.spec.method, plan.spec.multiplier)
        if plan.spec.fmt == "safetensors":
            digest = _write_safetensors(plan, metadata, progress)
        else:
            digest = _write_ckpt(plan, progress)
    finally:
        plan.close()
    if registry.hash_cache is not None:
        registry.hash_cache.record(plan.output, digest)
    config = _copy_config(plan)
    registry.refresh()
    log.info("checkpoint saved to %s", plan.output)
    return MergeResult(plan.output, digest, config, plan.is_inpainting)


# -------------------------------------------------------------------------------------------------------------
# The server's entry point


def output_dir_for(webui) -> Path:
    """Where the server writes merges: `--ckpt-dir` when given (as A1111), else models/Stable-diffusion."""
    ckpt_dir = getattr(webui.args, "ckpt_dir", None)
    return Path(ckpt_dir).resolve() if ckpt_dir else webui.folders.checkpoint_dirs[0]


def submit(webui, req: MergeRequest, *, owner: str | None = None):
    """Check `req` now (a bad one raises here, before anything is queued), then merge as a job of the server's
    queue (kind "merge"), so a merge never runs beside a generation. The job's result is a MergeResult; the
    checkpoint list holds the new model when the job ends."""
    output_dir = output_dir_for(webui)
    target = check(webui.registry, webui.vaes, req, output_dir)

    def run(job):
        def progress(done: int, total: int, text: str) -> None:
            job.textinfo = text
            job.step(done, total)  # raises when the job was interrupted: the merge stops, no file is left

        replacing = webui.registry.find(str(target)) if req.overwrite and target.exists() else None
        result = merge_checkpoints(webui.registry, webui.vaes, req, progress, output_dir=output_dir)
        if replacing is not None:
            _forget_loaded(webui, replacing)
        webui.refresh_checkpoints()
        return result

    return webui.queue.submit(run, kind="merge", owner=owner)


def _forget_loaded(webui, info: "CheckpointInfo") -> None:
    """A checkpoint file was replaced: the model manager must not keep serving the old weights under its name."""
    import torch

    from modules.model_store.sd_pipelines import checkpoint_key

    manager = webui.runtime().manager
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        manager.unload(checkpoint_key(info, dtype))
