"""Text encoders that ship apart from their checkpoint, as ComfyUI and Forge users keep them in
`models/text_encoder/` (or `models/text_encoders/`): CLIP-L (`clip_l.safetensors`), CLIP-G and T5-XXL
(`t5xxl_fp16.safetensors`, `t5xxl_fp8_e4m3fn.safetensors`). FLUX transformer-only files take their CLIP-L and T5
from here; the manager holds each file once, whatever checkpoint leases it (one T5 in memory for every FLUX model).

Files are told apart by their tensors (T5's `encoder.block.*`; CLIP's `text_model.*`, CLIP-G by its 1280 width
or a `clip_g` name). T5's config is read from its shapes; CLIP's is the published CLIP-L/CLIP-G one (or the one a
file carries in its `diffusers_configs` metadata, as the tiny test files do). An fp8 T5 keeps its fp8 weights in
memory and casts each layer up to the compute dtype as it runs (torch has no fp8 matmul on most hardware).

T5's tokenizer is not shipped (no copy of its vocabulary is reachable here); `t5_tokenizer` finds one in the
user's model folders and says exactly what to add when there is none.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.model_store.checkpoint_files import (
    DIFFUSERS_CONFIGS_METADATA_KEY,
    CheckpointError,
    read_safetensors_header,
)

log = logging.getLogger("webui.text_encoders")

FOLDER_NAMES = ("text_encoder", "text_encoders")
EXTENSIONS = (".safetensors",)
KINDS = ("clip_l", "clip_g", "t5")
KIND_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL"}
_T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "transformer.")
_CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.", "transformer.")
T5_TOKENIZER_HELP = ("T5's tokenizer is not shipped with the studio: put a FLUX or SD3 diffusers folder (its "
                     "tokenizer_2 or tokenizer_3) in models/Stable-diffusion, or T5's tokenizer files (spiece.model, "
                     "or tokenizer.json with tokenizer_config.json) in a folder such as "
                     "models/text_encoder/t5-tokenizer/")


@dataclass(frozen=True)
class TextEncoderInfo:
    path: Path
    kind: str  # "clip_l" | "clip_g" | "t5"

    @property
    def name(self) -> str:
        return self.path.name

    def key(self, dtype, projection: bool = False) -> str:
        """The manager's key: one entry per file, dtype and CLIP head (SD3 reads CLIP-L's projection, FLUX not)."""
        return f"text_encoder:{self.path}:{str(dtype).removeprefix('torch.')}{':projection' if projection else ''}"


def strip_prefixes(state_dict: dict, prefixes: tuple[str, ...]) -> dict:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def classify(path: Path) -> str | None:
    """"t5", "clip_l", "clip_g" for a text-encoder file (by its header), None for anything else."""
    try:
        shapes, _ = read_safetensors_header(path)
    except (OSError, ValueError):
        return None
    t5 = strip_prefixes(shapes, _T5_PREFIXES)
    if any(k.startswith("encoder.block.") for k in t5):
        return "t5"
    clip = strip_prefixes(shapes, _CLIP_PREFIXES)
    embed = clip.get("text_model.embeddings.token_embedding.weight") or clip.get("embeddings.token_embedding.weight")
    if embed is None:
        return None
    if "clip_g" in path.name.lower() or embed[1] == 1280:
        return "clip_g"
    return "clip_l"


class TextEncoderRegistry:
    """The text-encoder files under the given folders (searched recursively), rescanned on `refresh`."""

    def __init__(self, folders: list[Path]):
        self.folders = [Path(f) for f in folders]
        self._items: list[TextEncoderInfo] = []
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}

    def refresh(self) -> None:
        found = []
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path.is_file() and path.suffix.lower() in EXTENSIONS:
                    kind = classify(path)
                    if kind:
                        found.append(TextEncoderInfo(path, kind))
        with self._lock:
            self._items = found

    def list(self) -> list[TextEncoderInfo]:
        with self._lock:
            return list(self._items)

    def first(self, kind: str) -> TextEncoderInfo | None:
        """The file of `kind` to use: the first by name, a full-precision one before an fp8 one."""
        items = [i for i in self.list() if i.kind == kind]
        items.sort(key=lambda i: ("fp8" in i.name.lower(), str(i.path).lower()))
        return items[0] if items else None

    def choices(self, kind: str) -> list[str]:
        """What the `sd_text_encoder_<kind>` setting accepts: Automatic and every file of that kind."""
        return ["Automatic", *[i.name for i in self.list() if i.kind == kind]]

    def pick(self, kind: str, choice: str | None) -> TextEncoderInfo | None:
        """The file of `kind` a request uses: the one its setting names, or for Automatic (or no setting)
        `first`. CheckpointError for a name that is not there."""
        choice = (choice or "Automatic").strip()
        if choice == "Automatic":
            return self.first(kind)
        for info in self.list():
            if info.kind == kind and choice.lower() in (info.name.lower(), info.path.stem.lower()):
                return info
        raise CheckpointError(f"no {KIND_NAMES[kind]} text encoder named {choice!r} in the text-encoder folders "
                              f"(there are: {', '.join(self.choices(kind)[1:]) or 'none'})")

    def tokenizer_folders(self) -> list[Path]:
        """Folders under the text-encoder folders that hold a T5 tokenizer's files."""
        out = []
        for folder in self.folders:
            if folder.is_dir():
                out += sorted({p.parent for name in ("spiece.model", "tokenizer.json") for p in folder.rglob(name)})
        return out


def t5_config(shapes: dict[str, Any]) -> dict[str, Any]:
    """`T5Config` keyword arguments read from a T5 encoder's key -> shape map (transformers' names)."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    embed = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    attn = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[attn + "relative_attention_bias.weight"]
    inner = shapes[attn + "q.weight"][0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")][0]
    return dict(vocab_size=embed[0], d_model=embed[1], d_kv=inner // heads, d_ff=ff, num_layers=max(layers) + 1,
                num_heads=heads, relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated
                else "relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def keep_fp8_layers(model, file_dtypes: dict, compute_dtype, *, skip: tuple[type, ...] = (),
                    skip_names: tuple[str, ...] = ()) -> int:
    """Layers whose weights the file stores in fp8 keep them in fp8 in memory and are cast up to `compute_dtype`
    while they run (diffusers' layerwise casting hook, per layer: storing fp8 values as fp8 loses nothing; a layer
    whose weight or bias the file keeps in bf16/fp16 stays in the compute dtype). `file_dtypes`: parameter name -> the file's dtype.
    Returns the number of layers kept in fp8."""
    import torch
    from diffusers.hooks import apply_layerwise_casting_hook
    from diffusers.hooks.layerwise_casting import (
        _GO_LC_SUPPORTED_PYTORCH_LAYERS as layers,
    )

    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    if compute_dtype in fp8:
        return 0
    kept = 0
    for name, module in model.named_modules():
        if not isinstance(module, layers) or isinstance(module, skip) or name.endswith(skip_names):
            continue
        stored = {file_dtypes.get(f"{name}.{p}") for p, _ in module.named_parameters(recurse=False)}
        if len(stored) == 1 and (stored := stored.pop()) in fp8:  # weight and bias alike: exact
            module.to(stored)
            apply_layerwise_casting_hook(module, stored, compute_dtype, False)
            kept += 1
    return kept


def _cast(state_dict: dict, dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _assemble(make, state_dict: dict, dtype, source: str, what: str, ignored=()):
    """A transformers model built by `make` on the meta device and given `state_dict` (cast to `dtype`); missing or
    unknown tensors (besides `ignored` suffixes) are a CheckpointError naming `what` and the file."""
    from accelerate import init_empty_weights
    try:
        with init_empty_weights():
            model = make()
        missing, unexpected = model.load_state_dict(_cast(state_dict, dtype), strict=False, assign=True)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: not a {what} this project can load ({e})") from e
    missing = [k for k in missing if not k.endswith(ignored)]
    unexpected = [k for k in unexpected if not k.endswith(ignored)]
    if missing or unexpected:
        raise CheckpointError(f"{source}: the {what}'s tensors do not fit ({len(missing)} missing, "
                              f"{len(unexpected)} unknown, e.g. {(missing or unexpected)[0]})")
    return model


def load_t5(state_dict: dict, dtype, source: str):
    """A `T5EncoderModel` (eval, CPU) from a T5 encoder's tensors (transformers' names, any prefix above)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    sd = strip_prefixes(state_dict, _T5_PREFIXES)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.pop("encoder.embed_tokens.weight", None)
    model = _assemble(lambda: T5EncoderModel(T5Config(**t5_config(sd))), sd, dtype, source, "T5 encoder",
                      ignored=("encoder.embed_tokens.weight",))  # tied to `shared`
    model.tie_weights()
    # the embedding stays in the compute dtype (transformers reads the model's dtype from its first parameter), and
    # so does each feed-forward's output layer (T5 casts its input to that layer's weight dtype)
    keep_fp8_layers(model, {k: v.dtype for k, v in sd.items()}, dtype, skip=(torch.nn.Embedding,),
                    skip_names=(".wo",))
    return model.eval()


def clip_config(kind: str, metadata: dict[str, str], component: str = "text_encoder") -> dict[str, Any]:
    """A CLIP text config: the file's own (`diffusers_configs` metadata, its `component` entry) or the published
    CLIP-L / CLIP-G one."""
    from modules.core.paths import SD_CONFIGS_DIR

    configs = metadata.get(DIFFUSERS_CONFIGS_METADATA_KEY)
    if configs:
        try:
            return json.loads(configs)[component]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"the file's {DIFFUSERS_CONFIGS_METADATA_KEY} metadata has no {component}") from e
    sub = "sdxl/text_encoder_2" if kind == "clip_g" else "sd1/text_encoder"
    return json.loads((SD_CONFIGS_DIR / sub / "config.json").read_text(encoding="utf-8"))


def load_clip(state_dict: dict, config: dict, dtype, source: str, *, projection: bool = False):
    """A `CLIPTextModel` (or `CLIPTextModelWithProjection`) from CLIP text tensors in transformers' names."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sd = strip_prefixes(state_dict, _CLIP_PREFIXES)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    if not projection:  # transformers 5's CLIPTextModel has no `text_model.` level; files (and the projected model) do
        sd = {k.removeprefix("text_model."): v for k, v in sd.items() if k != "text_projection.weight"}
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    return _assemble(lambda: cls(CLIPTextConfig(**settings)), sd, dtype, source, "CLIP text encoder",
                     ignored=("position_ids",)).eval()


def load_file(info: TextEncoderInfo, dtype, projection: bool = False):
    """The encoder module of a text-encoder file (what the manager holds); CLIP with its projection for SD3."""
    from modules.model_store.checkpoint_files import load_state_dict_and_extras

    state_dict, extras = load_state_dict_and_extras(info.path)
    if info.kind == "t5":
        return load_t5(state_dict, dtype, info.name)
    return load_clip(state_dict, clip_config(info.kind, extras.get("metadata", {})), dtype, info.name,
                     projection=projection)


def t5_tokenizer(registry: TextEncoderRegistry | None, checkpoint_folders: list[Path]):
    """T5's tokenizer from the user's folders: a tokenizer folder under the text-encoder folders, else a FLUX or
    SD3 diffusers folder's (`tokenizer_2` / `tokenizer_3`); CheckpointError saying what to add when none is."""
    from transformers import T5TokenizerFast

    candidates = list(registry.tokenizer_folders()) if registry is not None else []
    for folder in checkpoint_folders:  # the components model_index.json names as T5 tokenizers
        try:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        candidates += [folder / name for name, spec in sorted(index.items())
                       if isinstance(spec, list) and len(spec) == 2 and str(spec[1]).startswith("T5Tokenizer")]
    for folder in candidates:
        if not folder.is_dir():
            continue
        key = str(folder)
        cached = registry._tokenizers.get(key) if registry is not None else None
        if cached is not None:
            return cached
        try:
            tokenizer = T5TokenizerFast.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            log.info("not a T5 tokenizer: %s (%s)", folder, e)
            continue
        if registry is not None:
            registry._tokenizers[key] = tokenizer
        return tokenizer
    raise CheckpointError(T5_TOKENIZER_HELP)



