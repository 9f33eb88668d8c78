"""The one processing loop of txt2img and img2img, over a per-request processing object.

`Processing` is a request being made ("p" in A1111's scripts): the request's fields under A1111's names
(`prompt`, `all_prompts`, `all_seeds`, `batch_size`, `n_iter`, `steps`, `sd_model_name`,
`extra_generation_params`, ...), the context it runs in, and what it has made. `process_images(p)` leases the
checkpoint, then for each batch asks the kind of generation (`Txt2ImgProcessing`, `Img2ImgProcessing`) for its
latents or pixels, decodes, writes the infotext, saves, and at the end makes the grid and the answer's `info`.
Always-on scripts act at A1111's hook points (`HOOKS`): objects in `p.scripts` with any of those methods.
Nothing global is read or changed: a script sees only the `p` of the request it belongs to.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from modules.core import infotext as infotext_mod
from modules.core import outputs, samplers
from modules.core.jobs import Job, JobInterrupted, JobSkipped
from modules.core.version import VERSION
from modules.generation.leases import leased_checkpoint
from modules.generation.params import MAX_IMAGES, GenerationError
from modules.generation.results import (  # noqa: F401
    GenerationResult,
    ImageSaveParams,
    PostprocessImageArgs,
)
from modules.generation.sampling import decode_latents, resolve_seeds
from modules.prompting import prompt_parser, prompts

if TYPE_CHECKING:
    from modules.model_store.checkpoints import CheckpointRegistry
    from modules.model_store.model_manager import ModelManager
    from modules.model_store.sd_vae import VaeRegistry
    from modules.networks import ExtraNetworks
    from modules.prompting.styles import StyleDatabase

# A1111's always-on script hooks, in the order they run; see `Processing.run_hooks` for their arguments.
HOOKS = ("process", "before_process_batch", "process_batch", "postprocess_batch", "postprocess_image", "postprocess")


@dataclass
class GenerationContext:
    """What generation needs from the running server (no globals)."""
    registry: CheckpointRegistry
    manager: ModelManager
    styles: StyleDatabase
    outputs_root: Path
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype | None = None
    offload: str | None = None  # None | "model" | "sequential"
    attention: str = "sdpa"  # "sdpa" | "xformers"
    offload_device: str = "cuda"  # where offloaded parts run
    networks: ExtraNetworks | None = None  # LoRA files and embeddings (None: none of either)
    vaes: VaeRegistry | None = None  # the VAE files `sd_vae` picks from (None: the checkpoints' own only)
    text_encoders: Any = None  # a TextEncoderRegistry: CLIP/T5 files for checkpoints that ship without them
    events: Any = None  # scripts' callbacks: before_image_saved(params), image_saved(params), model_loaded(bundle)
    # (images, texts, model) -> (scores, model name): prompt alignment in Image search's retrieval space
    alignment: Any = None


class Processing:
    """One request being made. Subclasses say how a batch is sampled (`sample`), what an image's infotext adds
    (`image_params`), and what is done to an image before it is saved (`finish_image`)."""

    kind = "txt2img"  # the job kind and outputs folders (`txt2img-images`, `txt2img-grids`)

    def __init__(self, ctx: GenerationContext, req, job: Job | None = None, settings: dict | None = None, *,
                 keep_samples: bool = False, scripts: list | None = None, prompts: Sequence | None = None,
                 negative_prompts: Sequence | None = None, seeds: Sequence | None = None,
                 subseeds: Sequence | None = None):
        self.ctx, self.request, self.job = ctx, req, job
        self.settings = settings or {}
        self.scripts = list(scripts or [])
        self.keep_samples = keep_samples
        # `prompt` is the request's own text (A1111's p.prompt); styles apply to `all_prompts` and `styled_prompt`
        self.prompt, self.negative_prompt = req.prompt, req.negative_prompt
        self.styled_prompt, self.styled_negative_prompt = ctx.styles.apply(req.prompt, req.negative_prompt,
                                                                           req.styles)
        self.styles = list(req.styles)
        self.all_seeds, self.all_subseeds, self.seed, self.subseed = resolve_seeds(req)
        count = len(self.all_seeds)
        self.all_prompts = [self.styled_prompt] * count
        self.all_negative_prompts = [self.styled_negative_prompt] * count
        if prompts is None and negative_prompts is not None:
            prompts = [req.prompt] * len(negative_prompts)
        if prompts is not None:  # a script's list of prompts (one per image, A1111's `p.prompt = [...]`)
            count = len(prompts)
            self.all_prompts = [ctx.styles.apply(t, "", req.styles)[0] for t in prompts]
            negatives = list(negative_prompts) if negative_prompts is not None else [req.negative_prompt] * count
            self.all_negative_prompts = [ctx.styles.apply("", t, req.styles)[1] for t in negatives]
            self.all_seeds = (list(seeds) if seeds is not None else
                              [self.seed + (i if self.request.subseed_strength == 0 else 0) for i in range(count)])
            self.all_subseeds = list(subseeds) if subseeds is not None else [self.subseed + i for i in range(count)]
        for f in dataclasses.fields(req):  # every request field by A1111's name, for scripts to read and change
            if not hasattr(self, f.name):
                setattr(self, f.name, getattr(req, f.name))
        self.override_settings: dict[str, Any] = {}  # a script's settings for this request only
        self.extra_generation_params: dict[str, Any] = {}  # written into every image's infotext
        self.clip_skip = int(self.settings.get("CLIP_stop_at_last_layers", 1))
        self.ensd = int(self.settings.get("eta_noise_seed_delta", 0))
        self.eta = samplers.resolve_eta(req.sampler_name, req.eta, self.settings)
        self.warnings: list[str] = [self.eta.warning] if self.eta.warning else []
        self.sd_model_name = self.sd_model_hash = None
        self.bundle = None  # the leased checkpoint, while the request runs
        self.inpainting_model = False
        self.iteration = 0
        self.images: list = []
        self.infotexts: list[str] = []
        self.paths: list[Path] = []
        self.samples: list | None = [] if keep_samples else None
        self.tracker = None  # the current pass's StepTracker: the latest latents of a stopped batch
        self.preview_every = int(self.settings.get("show_progress_every_n_steps", 0)) \
            if self.settings.get("live_previews_enable", True) else 0
        self._initial = {f.name: getattr(self, f.name) for f in dataclasses.fields(req)}

    def derive(self) -> "Processing":
        """A fresh processing object of the same kind from this one's fields as a script left them (A1111's
        scripts change `p.steps`, `p.prompt` (a list: one prompt per image), `p.seed` (a list), `p.init_images`,
        `p.override_settings`, ... then call `process_images(p)`). The request is validated again."""
        changes = {}
        for name, before in self._initial.items():
            now = getattr(self, name)
            if now is before or (not isinstance(now, (list, dict)) and _same(now, before)):
                continue
            changes[name] = now
        if getattr(self, "image_mask", None) is not None:  # A1111's name for the inpainting mask
            changes["mask"] = self.image_mask
        if getattr(self, "mask_blur", None) is not None:
            changes["mask_blur_x"] = changes["mask_blur_y"] = int(self.mask_blur)
        lists = {}
        for name, key in (("prompt", "prompts"), ("negative_prompt", "negative_prompts"), ("seed", "seeds"),
                          ("subseed", "subseeds")):
            value = changes.get(name)
            if isinstance(value, (list, tuple)):
                if not value:
                    raise GenerationError(f"a script gave an empty list for {name}")
                lists[key] = list(value)
                changes[name] = value[0]
        if "prompts" in lists and len(lists["prompts"]) > MAX_IMAGES:
            raise GenerationError(f"at most {MAX_IMAGES} images per request")
        req = dataclasses.replace(self.request, **changes)
        req = validate_request(req)
        settings = {**self.settings, **self.override_settings}
        fresh = type(self)(self.ctx, req, self.job, settings, keep_samples=self.keep_samples, scripts=self.scripts,
                           **lists)
        fresh.extra_generation_params.update(self.extra_generation_params)
        return fresh

    @property
    def outpath_samples(self) -> str:
        """Where this request's images are saved (A1111's p.outpath_samples)."""
        return str(outputs.samples_folder(self.ctx.outputs_root, f"{self.kind}-images", None,
                                          self.settings.get("outdir_samples", "")))

    @property
    def outpath_grids(self) -> str:
        return str(outputs.dated_folder(self.ctx.outputs_root, f"{self.kind}-grids"))

    # -- scripts ----------------------------------------------------------------------------------------------
    def run_hooks(self, name: str, *args, **kwargs) -> None:
        """Call hook `name` of every script that has it: process(p), before_process_batch(p, batch_number,
        prompts, seeds, subseeds), process_batch(p, ...the same), postprocess_batch(p, images, batch_number)
        with the batch's PIL images (the list may be changed in place), postprocess_image(p, pp) with a
        `PostprocessImageArgs`, postprocess(p, processed) with the `GenerationResult`."""
        for script in self.scripts:
            hook = getattr(script, name, None)
            if callable(hook):
                hook(self, *args, **kwargs)

    # -- what a kind of generation provides ------------------------------------------------------------------
    def setup(self, stack: contextlib.ExitStack, bundle) -> None:
        """Lease and prepare what every batch needs (LoRAs, conditioning, pipelines), entered into `stack`."""
        raise NotImplementedError  # every subclass defines it; Processing itself is never run

    def sample(self, batch_number: int, seeds: list[int], subseeds: list[int]):
        """The batch's latents (a tensor) or, when no sampling was needed, its PIL images."""
        raise NotImplementedError

    def image_params(self, index: int) -> dict[str, Any]:
        """The infotext parameters of image `index` (into `all_seeds`) beyond `extra_generation_params`."""
        raise NotImplementedError

    def finish_image(self, batch_index: int, image):
        """What is done to an image before hooks and saving (img2img pastes it back over the original)."""
        return image

    def info_params(self) -> dict[str, Any]:
        """`extra_generation_params` of the answer's `info` (the kind's own, without per-image values)."""
        return {}

    def info_denoising_strength(self):
        return self.denoising_strength

    def conditioning_for(self, prompt: str, negative: str):
        """The conditioning of a batch's prompts, encoded once per text. A script may have changed
        `all_prompts`: those prompts' LoRA tags are stripped (the request's own prompt's LoRAs are the ones
        merged). Needs `conditioner`, `conditioning_steps`, `old_scheduling` and `first_prompt` from setup."""
        cache = self.__dict__.setdefault("_conditionings", {})
        key = prompt + "\0" + negative
        if key not in cache:
            text = self.first_prompt if prompt == self.network_source else prompt_parser.parse_extra_networks(prompt)[0]
            cache[key] = prompts.build_conditioning(self.conditioner, text, negative, self.conditioning_steps,
                                                    use_old_scheduling=self.old_scheduling)
        return cache[key]

    def batch_conditioning(self, batch_number: int):
        lo = batch_number * self.batch_size
        return self.conditioning_for(self.all_prompts[lo], self.all_negative_prompts[lo])

    # -- the answer ------------------------------------------------------------------------------------------
    def decode(self, out) -> list:
        if isinstance(out, torch.Tensor):
            return decode_latents(self.pipe, out, self.samples)
        if self.samples is not None:  # pixels with no VAE pass (an upscale, or nothing to denoise)
            self.samples.extend(np.asarray(im.convert("RGB"), np.float32) / 255 for im in out)
        return list(out)

    def info(self, grid_count: int) -> dict:
        """The `info` of an A1111 txt2img/img2img answer."""
        req = self.request
        started = self.job.started if self.job and self.job.started else datetime.datetime.now().timestamp()
        vae = vae_params(self.bundle) if self.bundle is not None else {}
        count = len(self.infotexts) - grid_count
        return {
            "prompt": self.all_prompts[0], "all_prompts": self.all_prompts[:count] or [self.all_prompts[0]],
            "negative_prompt": self.all_negative_prompts[0],
            "all_negative_prompts": self.all_negative_prompts[:count] or [self.all_negative_prompts[0]],
            "seed": self.seed, "all_seeds": self.all_seeds, "subseed": self.subseed,
            "all_subseeds": self.all_subseeds, "subseed_strength": self.subseed_strength, "width": self.width,
            "height": self.height, "sampler_name": self.sampler_name, "scheduler": self.scheduler,
            "cfg_scale": self.cfg_scale, "steps": self.steps, "batch_size": self.batch_size, "n_iter": self.n_iter,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": self.sd_model_name,
            "sd_model_hash": self.sd_model_hash, "sd_vae_name": vae.get("VAE"), "sd_vae_hash": vae.get("VAE hash"),
            "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
            "denoising_strength": self.info_denoising_strength(),
            "extra_generation_params": {**self.info_params(), **self.extra_generation_params},
            "index_of_first_image": grid_count, "infotexts": self.infotexts, "styles": self.styles,
            "job_timestamp": datetime.datetime.fromtimestamp(started).strftime("%Y%m%d%H%M%S"),
            "clip_skip": self.clip_skip, "is_using_inpainting_conditioning": bool(self.inpainting_model),
            "version": VERSION, "warnings": self.warnings,
        }


def process_images(p: Processing) -> GenerationResult:
    """Make every image of `p` on the current thread (the job worker), calling its scripts' hooks."""
    p.run_hooks("process")
    today = datetime.date.today()
    job = p.job
    if job is not None:
        job.preview_every = p.preview_every
    with contextlib.ExitStack() as stack:
        bundle = p.bundle = stack.enter_context(leased_checkpoint(p.ctx, p.settings, p.warnings))
        p.sd_model_name, p.sd_model_hash = bundle.info.model_name, bundle.info.shorthash
        if p.ctx.events is not None:
            p.ctx.events.model_loaded(bundle)
        p.inpainting_model = bundle.arch.inpainting
        p.setup(stack, bundle)
        for it in range(p.n_iter):
            if job is not None:
                job.begin_iteration(it, p.n_iter)
            p.iteration = it
            lo, hi = it * p.batch_size, (it + 1) * p.batch_size
            seeds, subseeds, prompts = p.all_seeds[lo:hi], p.all_subseeds[lo:hi], p.all_prompts[lo:hi]
            p.run_hooks("before_process_batch", batch_number=it, prompts=prompts, seeds=seeds, subseeds=subseeds)
            p.run_hooks("process_batch", batch_number=it, prompts=prompts, seeds=seeds, subseeds=subseeds)
            stopped = None
            try:
                out = p.sample(it, seeds, subseeds)
            except (JobInterrupted, JobSkipped) as e:
                # A1111 keeps what was drawn so far: the latest latents are this batch's images
                stopped = e
                out = p.tracker.latents if p.tracker is not None else None
                if out is None:
                    if isinstance(e, JobInterrupted):
                        break
                    continue
            images = p.decode(out)
            p.run_hooks("postprocess_batch", images, batch_number=it)
            for j, image in enumerate(images):
                index = lo + j
                pp = PostprocessImageArgs(p.finish_image(j, image))
                p.run_hooks("postprocess_image", pp)
                params = {**p.image_params(index), **p.extra_generation_params}
                text = infotext_mod.create_infotext(p.all_prompts[index], p.all_negative_prompts[index], params)
                p.images.append(pp.image)
                p.infotexts.append(text)
                save_sample(p.ctx, p.settings, p.request, f"{p.kind}-images", today, pp.image, p.all_seeds[index],
                            p.all_prompts[index], text, p.paths, p)
            if isinstance(stopped, JobInterrupted):
                break
    grid_count = add_grid(p.ctx, p.settings, p.request, f"{p.kind}-grids", today, p.images, p.infotexts,
                          p.all_seeds[0], p.all_prompts[0], p.paths, p)
    result = GenerationResult(images=p.images, infotexts=p.infotexts, info=p.info(grid_count), paths=p.paths,
                              grid_count=grid_count, samples=p.samples)
    p.run_hooks("postprocess", result)
    return result


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # values that do not compare plainly (arrays): only the same object is unchanged
        return False


def validate_request(req):
    """A request a script changed, checked as the API would check it (img2img's checks for img2img)."""
    from modules.generation.img2img_params import Img2ImgRequest, validate_img2img
    from modules.generation.params import validate
    return validate_img2img(req) if isinstance(req, Img2ImgRequest) else validate(req)


def vae_params(bundle) -> dict[str, str]:
    """`VAE hash` and `VAE` of the infotext when a VAE file replaced the checkpoint's own."""
    vae = bundle.vae_info
    return {"VAE hash": vae.shorthash, "VAE": vae.name} if vae is not None else {}


def network_params(applied, embeddings) -> dict:
    params: dict[str, Any] = {}
    if applied:
        params["Lora hashes"] = ", ".join(f"{a.info.name}: {a.info.shorthash}" for a in applied)
    if embeddings:
        params["TI hashes"] = ", ".join(f"{e.name}: {e.shorthash}" for e in embeddings)
    return params


def sampler_params(sampler: str, eta_choice: samplers.EtaChoice, ensd: int) -> dict[str, Any]:
    """The sampler's settings that change its images, as A1111 writes them: Eta DDIM / Eta (when not the
    default) and ENSD (when set and the sampler draws noise while it runs)."""
    params: dict[str, Any] = dict(eta_choice.infotext)
    if ensd and samplers.is_stochastic(sampler):
        params["ENSD"] = ensd
    return params


def base_infotext_params(p: Processing, index: int, denoising_strength) -> dict[str, Any]:
    """The infotext keys txt2img and img2img share, in A1111's order (None values are left out when written)."""
    return {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        # "Automatic" is written as the schedule it stands for (as A1111 does), so the text reproduces the image;
        # FLUX and SD3 use their own flow schedule whatever the type (pasted back, a type would only warn)
        "Schedule type": None if p.bundle is not None and p.bundle.arch.is_flow else written_schedule(
            p.sampler_name, p.scheduler),
        "CFG scale": p.cfg_scale,
        "Seed": p.all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash,
        "Model": p.sd_model_name,
        "Variation seed": p.all_subseeds[index] if p.subseed_strength > 0 else None,
        "Variation seed strength": p.subseed_strength if p.subseed_strength > 0 else None,
        "Denoising strength": denoising_strength,
        "Clip skip": p.clip_skip if p.clip_skip > 1 else None,
    }


def written_schedule(sampler: str, schedule: str) -> str | None:
    if schedule == samplers.AUTOMATIC:
        schedule = samplers.automatic_schedule(sampler)
    return None if schedule == "Uniform" else schedule


def save_sample(ctx: GenerationContext, settings: dict, req, folder_name: str, today, image, seed: int, prompt: str,
                infotext: str, paths: list, p=None) -> None:
    """Save one image as A1111 does (when the request and the settings say so), adding its path to `paths`."""
    if req.save_images and settings.get("samples_save", True) and not req.do_not_save_samples:
        folder = outputs.samples_folder(ctx.outputs_root, folder_name, today, settings.get("outdir_samples", ""))
        paths.append(save_with_callbacks(ctx, settings, p, image, folder, seed, prompt, infotext,
                                         settings.get("samples_format", "png")))


def save_with_callbacks(ctx: GenerationContext, settings: dict, p, image, folder, seed: int, prompt: str,
                        infotext: str | None, extension: str):
    """Save an image (A1111's file naming), with the scripts' before/after-saved callbacks around it."""
    params = ImageSaveParams(image, p, str(folder), {"parameters": infotext} if infotext else {})
    if ctx.events is not None:
        ctx.events.before_image_saved(params)
    text = params.pnginfo.get("parameters")
    path = outputs.save_image(params.image, folder, seed=seed, prompt=prompt,
                              infotext=text if settings.get("enable_pnginfo", True) else None,
                              extension=extension, jpeg_quality=settings.get("jpeg_quality", 80))
    params.filename = str(path)
    if ctx.events is not None:
        ctx.events.image_saved(params)
    return path


def add_grid(ctx: GenerationContext, settings: dict, req, folder_name: str, today, images: list, infotexts: list,
             seed: int, prompt: str, paths: list, p=None) -> int:
    """A1111's grid of a multi-image result: none at all with `do_not_save_grid` (which API requests without
    `save_images` set, as A1111's API does), else saved when the settings say so and put first in `images`
    (with the first image's infotext) when `return_grid` is on. Returns how many grids lead the images."""
    if len(images) < 2 or req.do_not_save_grid:
        return 0
    save = req.save_images and settings.get("grid_save", True)
    if not (save or settings.get("return_grid", True)):
        return 0
    margin = int(settings.get("grid_margin", 0))
    grid = outputs.make_grid(images, background=settings.get("grid_background_color", "black") if margin else "black",
                             margin=margin)
    if save:
        paths.append(save_with_callbacks(ctx, settings, p, grid, outputs.dated_folder(ctx.outputs_root, folder_name,
                                                                                      today),
                                         seed, prompt, infotexts[0], settings.get("grid_format", "png")))
    if not settings.get("return_grid", True):
        return 0
    images.insert(0, grid)
    infotexts.insert(0, infotexts[0])
    return 1


def common_params(p: Processing) -> dict[str, Any]:
    """The infotext entries every kind ends with: the styles (A1111's `Styles array`) and the version."""
    params: dict[str, Any] = {}
    if p.styles:
        params["Styles array"] = json.dumps(p.styles)
    params["Version"] = VERSION
    return params


def local_context(checkpoint_dirs, outputs_root, *, lora_dirs=(), embedding_dirs=(), vae_dir=None,
                  text_encoder_dirs=(), device: str = "cpu", ram_budget: int = 8 * 2**30,
                  vram_budget: int = 0) -> GenerationContext:
    """A generation context without a server (scripts, notebooks, tests, benchmarks): the checkpoints of
    `checkpoint_dirs`, a model manager of its own on `device`, styles and hashes kept in `outputs_root`, and
    the LoRA, embedding and VAE folders when given."""
    from modules import networks
    from modules.model_store import checkpoints, hashing, sd_vae
    from modules.model_store.model_manager import ModelManager
    from modules.prompting.styles import StyleDatabase

    outputs_root = Path(outputs_root)
    cache = hashing.HashCache(outputs_root / "cache.json")
    registry = checkpoints.CheckpointRegistry([Path(d) for d in checkpoint_dirs], [], cache)
    registry.refresh()
    vaes = None
    if vae_dir is not None:
        vaes = sd_vae.VaeRegistry(Path(vae_dir), cache)
        vaes.refresh()
    extra = networks.ExtraNetworks([Path(d) for d in lora_dirs], [Path(d) for d in embedding_dirs]) \
        if (lora_dirs or embedding_dirs) else None
    encoders = None
    if text_encoder_dirs:
        from modules.model_store.text_encoders import TextEncoderRegistry
        encoders = TextEncoderRegistry([Path(d) for d in text_encoder_dirs])
        encoders.refresh()
    return GenerationContext(registry=registry, manager=ModelManager(device, vram_budget, ram_budget),
                             styles=StyleDatabase(outputs_root / "styles.csv"), outputs_root=outputs_root / "outputs",
                             networks=extra, vaes=vaes, text_encoders=encoders)
