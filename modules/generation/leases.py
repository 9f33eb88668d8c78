"""What a request leases from the model manager for its run: its checkpoint (the one it names, else the first
that loads) with the VAE its settings pick, and its LoRAs, merged into the checkpoint's weights while they
apply and taken out exactly afterwards."""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from modules import networks
from modules.generation.params import GenerationError
from modules.model_store import checkpoint_files, sd_pipelines
from modules.prompting import prompt_parser

log = logging.getLogger("webui.generation")

if TYPE_CHECKING:
    from modules.generation.processing import GenerationContext


@contextlib.contextmanager
def leased_checkpoint(ctx: GenerationContext, settings: dict, warnings: list[str]):
    """The request's checkpoint (with the VAE its `sd_vae` setting picks), leased for the with-block.

    A checkpoint the request names must load, or the request fails with the reason. With none named (the user
    never chose one), the first checkpoint of the list that loads is used: a file that cannot load is skipped,
    named in `warnings`, and left out of later defaults until it changes on disk.
    """
    name = settings.get("sd_model_checkpoint") or ""
    if name:
        candidates = [ctx.registry.resolve(name)]
    else:
        candidates = ctx.registry.usable()
    with contextlib.ExitStack() as stack:
        for info in candidates:
            try:
                bundle = stack.enter_context(sd_pipelines.use_checkpoint(
                    ctx.manager, info, dtype=ctx.dtype, vae_dtype=ctx.vae_dtype, attention=ctx.attention))
            except checkpoint_files.CheckpointError as e:
                if name:
                    raise
                ctx.registry.mark_unusable(info, str(e))
                warnings.append(f"skipped checkpoint {info.name}, which cannot be loaded: {e}")
                log.warning("default checkpoint %s skipped: %s", info.name, e)
                continue
            break
        else:
            skipped = ctx.registry.unusable()
            raise GenerationError("no checkpoint found: put a .safetensors file in models/Stable-diffusion (or start "
                                  "with --demo)" if not skipped else "no checkpoint can be loaded: " + "; ".join(
                                      f"{n}: {why}" for n, why in skipped.items()))
        if bundle.separate_parts:  # a FLUX/SD3 transformer-only file: its text encoders from models/text_encoder
            choices = {kind: settings.get(f"sd_text_encoder_{kind}") for kind in ("clip_l", "clip_g", "t5")}
            bundle = stack.enter_context(sd_pipelines.use_separate_parts(
                ctx.manager, bundle, ctx.text_encoders, flow_folders(ctx), dtype=ctx.dtype, choices=choices))
        vae = ctx.vaes.choose(settings.get("sd_vae"), info.filename) if ctx.vaes is not None else None
        if vae is None and "vae" in bundle.separate_parts:
            vae = separate_vae(ctx, bundle)
        bundle = stack.enter_context(sd_pipelines.use_vae(ctx.manager, bundle, vae, dtype=ctx.vae_dtype or ctx.dtype,
                                                          attention=ctx.attention))
        prediction = settings.get("sd_prediction_type") or "Automatic"
        yield bundle if prediction == "Automatic" else bundle.with_prediction_type(prediction)


def separate_vae(ctx, bundle):
    """The VAE file for a checkpoint file that has none: a 16-channel one from the VAE folder (FLUX's `ae`, or for
    SD3 only a file named for SD3: the two VAEs have the same shape and different weights)."""
    flux = bundle.arch.family == "flux"
    prefer = ("flux", "ae") if flux else ("sd3", "sd3.5")
    vae = ctx.vaes.for_latent_channels(16, prefer=prefer, only_preferred=not flux) if ctx.vaes is not None else None
    if vae is None:
        what = "FLUX's VAE (ae.safetensors)" if flux else "SD3's VAE (a file with sd3 in its name)"
        raise checkpoint_files.CheckpointError(f"{bundle.info.name} holds no VAE: put {what} in models/VAE")
    return vae


def flow_folders(ctx) -> list:
    """The FLUX/SD3 diffusers folders among the checkpoints (T5's tokenizer can come from one)."""
    from pathlib import Path
    return [Path(i.filename) for i in ctx.registry.list() if i.is_diffusers_folder]


def resolve_networks(ctx, prompt: str) -> networks.ResolvedNetworks:
    """The prompt's extra network tags, resolved (only stripped when the server has no extra networks)."""
    if ctx.networks is not None:
        return ctx.networks.resolve(prompt)
    return networks.ResolvedNetworks(prompt=prompt_parser.parse_extra_networks(prompt)[0])


def add_new(warnings: list[str], new: list[str]) -> None:
    warnings.extend(w for w in dict.fromkeys(new) if w not in warnings)


@contextlib.contextmanager
def leased_networks(ctx, resolved, warnings):
    """Lease the resolved LoRAs from the manager for the with-block; yields them (as `AppliedLora`s).
    A warning both prompts of a request give is reported once."""
    if ctx.networks is None or not resolved.loras:
        yield []
        return
    said: list[str] = []
    with ctx.networks.leased(ctx.manager, resolved, said) as applied:
        add_new(warnings, said)
        yield applied


@contextlib.contextmanager
def leased_passes(ctx, resolved, hr_resolved, warnings):
    """The LoRAs of the first pass and of the hires pass, each leased once; yields (first, hires)."""
    with leased_networks(ctx, resolved, warnings) as applied:
        if hr_resolved is resolved:
            yield applied, applied
            return
        with leased_networks(ctx, hr_resolved, warnings) as hr_applied:
            yield applied, hr_applied


class MergedLoras:
    """The LoRAs merged into the leased checkpoint's weights: `use(loras)` switches to another set (removing the
    current one exactly) only when its (name, te, unet) set differs, so a request whose passes share their LoRAs
    merges once. Whatever is merged is removed when the with-block ends."""

    def __init__(self, bundle, warnings: list[str]):
        self.bundle, self.warnings = bundle, warnings
        self._key: frozenset | None = None
        self._stack: contextlib.ExitStack | None = None

    def use(self, loras: list) -> bool:
        """Merge `loras` in place of the current set; False (and nothing done) when that set is merged already."""
        key = frozenset((a.info.name, a.te_multiplier, a.unet_multiplier) for a in loras)
        if self._stack is not None and key == self._key:
            return False
        self.close()
        stack = contextlib.ExitStack()
        said: list[str] = []
        stack.enter_context(networks.applied_loras(self.bundle, loras, said))
        add_new(self.warnings, said)
        self._stack, self._key = stack, key
        return True

    def close(self) -> None:
        stack, self._stack, self._key = self._stack, None, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> "MergedLoras":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def networks_applied(ctx, bundle, resolved, warnings):
    """Lease the request's LoRAs from the manager and merge them into the leased checkpoint until the
    request ends; yields the applied LoRAs (for the infotext)."""
    with leased_networks(ctx, resolved, warnings) as applied, MergedLoras(bundle, warnings) as merged:
        merged.use(applied)
        yield applied
