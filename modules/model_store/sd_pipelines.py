"""Checkpoints held by the model manager, and the diffusers pipelines built over their shared modules."""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterator

import torch

from modules.model_store import checkpoints, loading

log = logging.getLogger("webui.pipelines")

PIPELINE_KINDS = ("txt2img", "img2img", "inpaint")


class CheckpointBundle:
    """One loaded checkpoint: its UNet, VAE, text encoders and tokenizers, moved as one unit.

    Every pipeline of this checkpoint (txt2img, img2img, inpaint) is a view over these same modules,
    so switching between tabs never copies weights.
    """

    def __init__(self, loaded: "loading.LoadedCheckpoint"):
        self.info = loaded.info
        self.arch = loaded.arch
        self.config_dir = loaded.config_dir  # the diffusers configs it was built with (a VAE file's shape)
        self.components = dict(loaded.components)
        # what the file does not hold, added per lease from the shared text-encoder and VAE files
        self.separate_parts = dict(loaded.separate_parts)
        self.scheduler_config = dict(self.components["scheduler"].config)
        self.vae_info = None  # the VAE file used instead of the checkpoint's own (see `with_vae`), if any
        # What is kept with the checkpoint across requests (the LoRA layer index and the originals of the weights
        # LoRAs touch, in CPU RAM); shared by every view of the bundle.
        self.cache: dict = {}

    def with_vae(self, vae, vae_info) -> "CheckpointBundle":
        """A view of this checkpoint whose pipelines use another VAE (every other module is this bundle's)."""
        view = copy.copy(self)
        view.components = {**self.components, "vae": vae}
        view.vae_info = vae_info
        return view

    def with_components(self, **parts) -> "CheckpointBundle":
        """A view of this checkpoint with `parts` added (text encoders and tokenizers held apart from it)."""
        view = copy.copy(self)
        view.components = {**self.components, **parts}
        view.separate_parts = {k: v for k, v in self.separate_parts.items() if k not in parts}
        return view

    def with_prediction_type(self, prediction_type: str) -> "CheckpointBundle":
        """A view of this checkpoint whose samplers predict `prediction_type` (epsilon or v_prediction) instead
        of what the checkpoint says: the fix for a model whose type was guessed wrong."""
        if prediction_type == self.scheduler_config.get("prediction_type", "epsilon"):
            return self
        view = copy.copy(self)
        view.scheduler_config = {**self.scheduler_config, "prediction_type": prediction_type}
        return view

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in self.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for m in self.modules() for t in list(m.parameters()) + list(m.buffers()))

    @property
    def host_nbytes(self) -> int:
        """Bytes kept in CPU RAM beside the weights wherever they are: the originals of LoRA-touched weights."""
        return sum(t.numel() * t.element_size() for t in self.cache.get("lora_originals", {}).values())

    def to(self, device) -> "CheckpointBundle":
        for m in self.modules():
            m.to(device)
        return self

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network that predicts the noise (the UNet; the transformer of SD3 and FLUX)."""
        return self.components["transformer"] if self.arch.is_flow else self.components["unet"]

    @property
    def device(self) -> torch.device:
        return self.denoiser.device


def checkpoint_key(info: "checkpoints.CheckpointInfo", dtype: torch.dtype) -> str:
    return f"checkpoint:{info.filename}:{str(dtype).removeprefix('torch.')}"


@contextlib.contextmanager
def use_checkpoint(manager, info, *, dtype: torch.dtype, vae_dtype: torch.dtype | None = None,
                   attention: str = "sdpa") -> Iterator[CheckpointBundle]:
    """Lease a checkpoint from the manager (loading it on first use) for the duration of a job."""
    def load() -> CheckpointBundle:
        loaded = loading.load_checkpoint(info, torch_dtype=dtype, vae_dtype=vae_dtype)
        if attention == "xformers":
            denoiser = loaded.components.get("unet") or loaded.components["transformer"]
            denoiser.enable_xformers_memory_efficient_attention()
            loaded.components["vae"].enable_xformers_memory_efficient_attention()
        return CheckpointBundle(loaded)

    with manager.use(checkpoint_key(info, dtype), load, kind="checkpoint", name=info.title) as bundle:
        yield bundle


@contextlib.contextmanager
def use_vae(manager, bundle: CheckpointBundle, vae, *, dtype: torch.dtype,
            attention: str = "sdpa") -> Iterator[CheckpointBundle]:
    """Lease the VAE file `vae` (a `sd_vae.VaeInfo`; None: the checkpoint's own) for a leased checkpoint; yields
    the bundle, or a view of it whose pipelines use that VAE."""
    if vae is None:
        yield bundle
        return
    from modules.model_store import sd_vae

    def load_vae():
        model = sd_vae.load_vae(vae, bundle.config_dir, dtype)
        if attention == "xformers":
            model.enable_xformers_memory_efficient_attention()
        return model

    # keyed by the checkpoint's VAE config too: a single VAE file takes the shape of the checkpoint's VAE
    with manager.use(f"{vae.key(dtype)}:{bundle.config_dir}", load_vae, kind="vae", name=vae.name) as model:
        yield bundle.with_vae(model, vae)


@contextlib.contextmanager
def use_separate_parts(manager, bundle: CheckpointBundle, text_encoder_files, checkpoint_folders, *,
                       dtype: torch.dtype, choices: dict[str, str] | None = None) -> Iterator[CheckpointBundle]:
    """Lease the text encoders a checkpoint file does not hold (FLUX and SD3 transformer-only files) from the
    text-encoder folders, each file once in the manager for every checkpoint that uses it, and add T5's tokenizer;
    yields the bundle with them (`choices`: kind -> the file its setting names, else Automatic). The VAE such a
    file lacks comes through `use_vae`. CheckpointError naming the file to add when one is not there."""
    from modules.model_store import text_encoders
    from modules.model_store.checkpoint_files import CheckpointError

    parts = {}
    with contextlib.ExitStack() as stack:
        for name, (kind, projection) in bundle.separate_parts.items():
            if kind == "t5_tokenizer":
                parts[name] = text_encoders.t5_tokenizer(text_encoder_files, checkpoint_folders)
                continue
            if kind not in text_encoders.KIND_NAMES:
                continue
            info = text_encoder_files.pick(kind, (choices or {}).get(kind)) if text_encoder_files is not None \
                else None
            if info is None:
                raise CheckpointError(
                    f"{bundle.info.name} holds no {text_encoders.KIND_NAMES[kind]} text encoder: put one (for example "
                    f"{'t5xxl_fp16' if kind == 't5' else kind}.safetensors) in models/text_encoder")
            parts[name] = stack.enter_context(manager.use(
                info.key(dtype, projection), lambda info=info, projection=projection: text_encoders.load_file(
                    info, dtype, projection), kind="text_encoder", name=info.name))
        yield bundle.with_components(**parts) if parts else bundle


def _pipeline_class(arch, kind: str):
    import diffusers
    if arch.is_flow:
        names = {"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"} \
            if arch.family == "flux" else {"txt2img": "StableDiffusion3Pipeline",
                                           "img2img": "StableDiffusion3Img2ImgPipeline",
                                           "inpaint": "StableDiffusion3InpaintPipeline"}
    elif arch.family == "sdxl":
        names = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline",
                 "inpaint": "StableDiffusionXLInpaintPipeline"}
    else:
        names = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                 "inpaint": "StableDiffusionInpaintPipeline"}
    return getattr(diffusers, names[kind])


def make_pipeline(bundle: CheckpointBundle, kind: str, scheduler, *, offload: str | None = None,
                  offload_device: str | torch.device = "cuda"):
    """A pipeline of `kind` over the bundle's modules with this request's own scheduler object."""
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"unknown pipeline kind {kind!r}")
    cls = _pipeline_class(bundle.arch, kind)
    accepted = set(cls._get_signature_keys(cls)[0]) | set(cls._get_signature_keys(cls)[1])
    parts = {k: v for k, v in bundle.components.items() if k in accepted}
    parts["scheduler"] = scheduler
    if "requires_safety_checker" in accepted:
        parts["requires_safety_checker"] = False
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in accepted and optional not in parts:
            parts[optional] = None
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    # --medvram/--lowvram: the manager keeps these checkpoints in RAM and diffusers' offload hooks move each
    # part to the GPU only while it runs.
    if offload == "model":
        pipe.enable_model_cpu_offload(device=offload_device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=offload_device)
    return pipe


# Linear latent -> RGB factors for SD1/SD2 latents: a cheap live preview with no VAE pass.
# (A least-squares fit of VAE-decoded colours on latent channels, as commonly used for "approx cheap" previews.)
_LATENT_RGB_SD = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])
_LATENT_RGB_SDXL = torch.tensor([
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
])


def cheap_preview(latents: torch.Tensor, family: str = "sd1"):
    """The first latent of a batch as a small PIL image (no VAE: a 4x3 linear map)."""
    from PIL import Image

    weights = _LATENT_RGB_SDXL if family == "sdxl" else _LATENT_RGB_SD
    x = latents[0].detach().float().cpu()
    rgb = torch.einsum("chw,cr->hwr", x, weights)
    rgb = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(rgb)
