"""Wiring: turns parsed flags into the running pieces (folders, settings, registry, manager, queue)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modules.core import paths

if TYPE_CHECKING:
    import torch

    from modules.model_store.model_manager import ModelManager
from modules.core.options import Options, default_specs

log = logging.getLogger("webui")


def _placeholder_image():
    """A 1x1 image standing in for a batch's init images when its request is checked before the job runs."""
    from PIL import Image
    return Image.new("RGB", (1, 1))


@dataclass
class Runtime:
    """The torch side of the server, made on first use (so the server answers before torch is imported)."""
    device: "torch.device"
    dtype: "torch.dtype"
    vae_dtype: "torch.dtype"
    attention: str  # "sdpa" | "xformers"
    offload: str | None  # None | "model" | "sequential" (--medvram / --lowvram, CUDA only)
    manager: "ModelManager"


@dataclass
class Folders:
    data_dir: Path
    models_dir: Path
    checkpoint_dirs: list[Path]
    checkpoint_files: list[Path]
    lora_dir: Path
    vae_dir: Path
    embeddings_dir: Path
    outputs_dir: Path
    config_file: Path
    styles_file: Path
    cache_file: Path
    upscaler_dirs: dict[str, list[Path]] = dataclasses.field(default_factory=dict)  # "ESRGAN" -> folders
    text_encoder_dirs: list[Path] = dataclasses.field(default_factory=list)  # separate CLIP/T5 files

    @classmethod
    def from_args(cls, args) -> "Folders":
        from modules.model_store import upscalers
        data = Path(args.data_dir).resolve() if args.data_dir else paths.REPO_ROOT
        models = Path(args.models_dir).resolve() if args.models_dir else data / "models"
        ckpt_dirs = [models / "Stable-diffusion"]
        if args.ckpt_dir:
            ckpt_dirs.append(Path(args.ckpt_dir).resolve())
        ckpt_files = [Path(args.ckpt).resolve()] if args.ckpt else []
        return cls(
            data_dir=data, models_dir=models, checkpoint_dirs=ckpt_dirs, checkpoint_files=ckpt_files,
            lora_dir=Path(args.lora_dir).resolve() if args.lora_dir else models / "Lora",
            vae_dir=Path(args.vae_dir).resolve() if args.vae_dir else models / "VAE",
            embeddings_dir=Path(args.embeddings_dir).resolve() if args.embeddings_dir else data / "embeddings",
            outputs_dir=data / "outputs",
            config_file=data / "config.json",
            styles_file=Path(args.styles_file).resolve() if args.styles_file else data / "styles.csv",
            cache_file=data / "cache.json",
            text_encoder_dirs=[Path(args.text_encoder_dir).resolve()] if getattr(args, "text_encoder_dir", None)
            else [models / name for name in ("text_encoder", "text_encoders")],
            upscaler_dirs=upscalers.folders_for(models, {kind: getattr(args, flag, None) for kind, flag in (
                ("ESRGAN", "esrgan_models_path"), ("RealESRGAN", "realesrgan_models_path"),
                ("SwinIR", "swinir_models_path"), ("DAT", "dat_models_path"))}),
        )


class Webui:
    """The server's state, built once from the flags and handed to the API and UI builders."""

    def __init__(self, args):
        from modules.core.jobs import JobQueue
        from modules.model_store import checkpoints, hashing, sd_vae
        from modules.prompting.styles import StyleDatabase

        self.args = args
        self.folders = Folders.from_args(args)
        self.folders.data_dir.mkdir(parents=True, exist_ok=True)
        self.hash_cache = hashing.HashCache(self.folders.cache_file)
        self.vaes = sd_vae.VaeRegistry(self.folders.vae_dir, self.hash_cache)
        self.vaes.refresh()
        from modules.model_store.text_encoders import TextEncoderRegistry
        self.text_encoders = TextEncoderRegistry(self.folders.text_encoder_dirs)
        self.text_encoders.refresh()
        specs = default_specs()
        # the VAE setting accepts the files found now (and after /refresh-vae), so a saved choice survives a restart
        specs["sd_vae"] = dataclasses.replace(specs["sd_vae"], choices=self.vaes.choices)
        for kind in ("clip_l", "clip_g", "t5"):  # the text-encoder files found now (and after a rescan)
            key = f"sd_text_encoder_{kind}"
            specs[key] = dataclasses.replace(specs[key], choices=functools.partial(self.text_encoders.choices, kind))
        self.options = Options(self.folders.config_file, specs, frozen=args.freeze_settings)
        if args.demo:
            demo_root = self.demo_models_dir()
            self.folders.checkpoint_dirs.append(demo_root / "Stable-diffusion")
            for kind in ("ESRGAN", "RealESRGAN"):  # the tiny upscalers
                self.folders.upscaler_dirs.setdefault(kind, []).append(demo_root / kind)
            # the tiny FLUX transformer file's text encoders and VAE, and the tiny VAE files
            self.text_encoders.folders.append(demo_root / "text_encoder")
            self.text_encoders.refresh()
            self.vaes.extra_folders.append(demo_root / "VAE")
            self.vaes.refresh()
        self.registry = checkpoints.CheckpointRegistry(self.folders.checkpoint_dirs, self.folders.checkpoint_files,
                                                     self.hash_cache)
        self.registry.refresh()
        self.options.add_listener(self._on_options_changed)
        self.queue = JobQueue(max_queued=self.options.get("queue_max_pending"))  # a setting: 503 beyond it
        self.styles = StyleDatabase(self.folders.styles_file)
        if args.ckpt and not self.options.get("sd_model_checkpoint"):
            info = self.registry.find(Path(args.ckpt).name)
            if info:
                self.options.update({"sd_model_checkpoint": info.name})
        self._ensure_current_checkpoint()
        self._runtime_lock = threading.Lock()
        self._runtime: Runtime | None = None
        self.scripts = self._load_scripts()

    def _load_scripts(self):
        """The studio's scripts and the enabled extensions (A1111's surface: `modules.shared` views these
        settings and flags); their settings are declared (on_ui_settings) before any UI or API reads them."""
        from modules import shared
        from modules.scripting.host import ScriptHost
        shared.bind(self.options, self.args, upscalers=lambda: self.upscalers,
                    lists={"checkpoints": lambda: [c.name for c in self.registry.list()],
                           "vaes": lambda: list(self.vaes.choices()), "styles": self.styles.names})
        host = ScriptHost(self.folders.data_dir, self.folders.config_file, self.args).load()
        host.callbacks.call("ui_settings")
        return host

    # -- the torch side, set up on first use so the server is ready before torch is even imported ----------
    def runtime(self) -> "Runtime":
        with self._runtime_lock:
            if self._runtime is None:
                self._runtime = self._make_runtime()
            return self._runtime

    def _make_runtime(self) -> "Runtime":
        from modules.core import console, devices
        from modules.model_store.model_manager import ModelManager

        console.quiet_libraries()
        args = self.args
        device = devices.resolve_device(args.device if args.device_id is None or args.device != "cuda"
                                        else f"cuda:{args.device_id}")
        attention, attention_message = devices.attention_backend(args.xformers, device)
        if attention_message:
            log.info(attention_message)
        offload = "sequential" if args.lowvram else "model" if args.medvram else None
        if offload and device.type != "cuda":
            log.info("--medvram/--lowvram only apply to CUDA devices; ignored on %s", device)
            offload = None
        vram, ram = devices.default_budgets(device)
        # With offload the checkpoints live in RAM and diffusers' hooks visit the GPU part by part.
        manager = ModelManager("cpu" if offload else device, self._budget("vram_budget_mb", vram),
                               self._budget("ram_budget_mb", ram))
        return Runtime(device=device, dtype=devices.resolve_dtype(args.precision, device),
                    vae_dtype=devices.vae_dtype(args.precision, device, args.no_half_vae),
                    attention=attention, offload=offload, manager=manager)

    @property
    def device(self):
        return self.runtime().device

    @property
    def manager(self):
        return self.runtime().manager

    @property
    def captioning(self):
        """The captioning service (BLIP/BLIP-2 captions, VQA, search), made on first use; torch-free until it runs."""
        if getattr(self, "_captioning", None) is None:
            from modules import captioning
            self._captioning = captioning.for_webui(self)
        return self._captioning

    @property
    def extra_networks(self):
        """LoRA files and textual inversion embeddings (modules/networks/), scanned on first use."""
        if getattr(self, "_extra_networks", None) is None:
            from modules import networks
            self._extra_networks = networks.for_folders(self.folders, demo=self.args.demo)
        return self._extra_networks

    @property
    def upscalers(self):
        """The upscalers by A1111 name (PIL ones and the model files of models/ESRGAN, ...), for the Extras tab,
        its API routes and hires fix (modules/model_store/upscalers.py); torch-free until one runs."""
        if getattr(self, "_upscalers", None) is None:
            from modules.model_store import upscalers
            self._upscalers = upscalers.Upscalers(upscalers.UpscalerRegistry(self.folders.upscaler_dirs),
                                                  manager=lambda: self.manager, settings=self.options.snapshot)
        return self._upscalers

    @property
    def training(self):
        """Training runs (modules/training/runs.py): each one the training CLI in a child process."""
        if getattr(self, "_training", None) is None:
            from modules.training.runs import RunManager

            def park():
                if self._runtime is not None:
                    self.manager.park_all()

            def finished(run):
                if run.outputs:
                    self.extra_networks.loras.refresh()
                    self.extra_networks.embeddings.refresh()
                    self.refresh_checkpoints()

            folders = self.folders
            self._training = RunManager(
                folders.data_dir / "train", folders.models_dir, queue=self.queue, park=park,
                shares_gpu=lambda: bool(self.options.get("training_shares_gpu")), on_finished=finished,
                output_dirs={"lora": folders.lora_dir, "embedding": folders.embeddings_dir,
                             "checkpoint": folders.checkpoint_dirs[0]},
                default_device=self.args.device or "auto")
        return self._training

    def warm_up(self):
        """Right after start-up: import torch/diffusers so the first request is quick (no model is loaded).

        It runs as a job on the one worker thread: diffusers' lazy module is not safe to import from two
        threads at once, and a request that arrives meanwhile simply waits behind it in the queue.
        """
        def run(job):
            from modules.core import import_lock
            self.runtime()
            with import_lock.lock:  # the UI's token counter may import transformers meanwhile
                import diffusers

                from modules.generation import txt2img  # noqa: F401  (imports torch, diffusers and the pipelines)
                diffusers.StableDiffusionPipeline, diffusers.AutoencoderKL  # resolve the lazy attributes now
            from modules.prompting import clip_tokenizer, prompts
            prompts.token_counts("warm up", clip_tokenizer.clip_tokenizer())  # the UI's token counter

        return self.queue.submit(run, kind="warm-up")

    # -- folders and settings ------------------------------------------------------------------------------
    def demo_models_dir(self) -> Path:
        """--demo: a tiny random-weight model set, made once under the data dir."""
        from modules.demo import tiny_models
        root = self.folders.data_dir / "demo-models"
        marker = root / "Stable-diffusion" / "tiny-sd15.safetensors"
        if not marker.exists():
            log.info("--demo: making the tiny random-weight model set in %s (once; a few seconds)", root)
            started = time.perf_counter()
            tiny_models.make_tiny_models(root)
            log.info("--demo: tiny model set ready in %.1f s", time.perf_counter() - started)
        elif not (root / "ESRGAN").is_dir():  # a demo set made before it had upscalers
            from modules.demo import tiny_upscalers
            tiny_upscalers.make_tiny_upscalers(root)
        log.warning("--demo: the demo checkpoints have RANDOM weights; their images are noise, not pictures.")
        return root

    def _budget(self, key: str, automatic: int) -> int:
        mb = self.options.get(key)
        return mb * 2**20 if mb else automatic

    def _on_options_changed(self, changed: dict) -> None:
        if "queue_max_pending" in changed:
            self.queue.max_queued = changed["queue_max_pending"]
        if ("vram_budget_mb" in changed or "ram_budget_mb" in changed) and self._runtime is not None:
            from modules.core import devices
            vram, ram = devices.default_budgets(self.device)
            self.manager.set_budgets(self._budget("vram_budget_mb", vram), self._budget("ram_budget_mb", ram))

    def _ensure_current_checkpoint(self) -> None:
        """Forget a chosen checkpoint whose file is gone (the default applies again); say when there is none.

        Nothing is written when the user has not chosen: the default is "the first checkpoint that loads", worked
        out per request, so one file that cannot load never becomes every request's checkpoint."""
        current = self.options.get("sd_model_checkpoint")
        if current and not self.registry.find(current):
            log.warning("the chosen checkpoint %r is no longer in the model folders; using the first one that loads",
                        current)
            if not self.options.frozen:
                self.options.update({"sd_model_checkpoint": ""})
        if not self.registry.list():
            log.warning("No checkpoint found. Put a .safetensors file in %s (or start with --demo to try the UI "
                        "with tiny random weights).", self.folders.checkpoint_dirs[0])

    def refresh_checkpoints(self) -> None:
        self.registry.refresh()
        self.text_encoders.refresh()
        self._ensure_current_checkpoint()

    def resolve_checkpoint(self, name: str):
        """A title, name, model name, file name or short hash -> CheckpointInfo (as A1111 accepts)."""
        return self.registry.resolve(name)

    def normalize_settings(self, updates: dict[str, Any], *, from_api: bool) -> dict[str, Any]:
        """Validate a settings update; a checkpoint name is resolved to its canonical name."""
        updates = dict(updates)
        if "sd_model_checkpoint" in updates:
            updates["sd_model_checkpoint"] = self.resolve_checkpoint(str(updates["sd_model_checkpoint"])).name
        self.options.validate(updates, from_api=from_api)
        return updates

    def settings_for_request(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        overrides = self.normalize_settings(overrides or {}, from_api=True)
        return self.options.with_overrides(overrides)

    def current_checkpoint(self):
        """The chosen checkpoint, else the first one not known to fail loading (None when there is none)."""
        name = self.options.get("sd_model_checkpoint")
        if name:
            return self.registry.find(name)
        usable = self.registry.usable()
        return usable[0] if usable else None

    # -- work ------------------------------------------------------------------------------------------------
    def generation_context(self):
        from modules.generation import GenerationContext
        rt = self.runtime()
        return GenerationContext(registry=self.registry, manager=rt.manager, styles=self.styles,
                                 outputs_root=self.outputs_root(), dtype=rt.dtype, vae_dtype=rt.vae_dtype,
                                 offload=rt.offload, attention=rt.attention, offload_device=str(rt.device),
                                 networks=self.extra_networks, vaes=self.vaes, text_encoders=self.text_encoders,
                                 events=self.scripts.events,
                                 alignment=self._alignment_scores)

    def _alignment_scores(self, images, texts, model=None):
        """Prompt alignment in Image search's retrieval space (CaptionerNotFoundError without a blip2-itm model)."""
        from modules.captioning.service import alignment_scores
        return alignment_scores(self.captioning.context(), images, texts, model)

    def outputs_root(self) -> Path:
        """The outputs folder of the data dir (images go to its per-tab folders unless `outdir_samples` is set)."""
        return self.folders.outputs_dir

    def submit_txt2img(self, req, *, override_settings: dict | None = None, owner: str | None = None,
                       task_id: str | None = None, scripts=None):
        """Validate and queue a txt2img request; returns the Job at once (raises on bad input). `scripts`: the
        request's scripts (`self.scripts.bind(...)`; None: the always-on ones with their defaults)."""
        from modules import generation
        scripts = self.scripts.bind(False) if scripts is None else scripts
        return self._queue_generation("txt2img", generation.validate(req, upscalers=self.upscalers),
                                      self._scripted("Txt2ImgProcessing", scripts),
                                      override_settings, owner, task_id)

    def submit_img2img(self, req, *, override_settings: dict | None = None, owner: str | None = None,
                       task_id: str | None = None, scripts=None):
        """Validate and queue an img2img/inpaint request; returns the Job at once (raises on bad input)."""
        from modules import generation
        scripts = self.scripts.bind(True) if scripts is None else scripts
        req = dataclasses.replace(req, upscalers=self.upscalers)  # scripts upscale through p.upscalers (SD upscale)
        return self._queue_generation("img2img", generation.validate_img2img(req),
                                      self._scripted("Img2ImgProcessing", scripts), override_settings, owner, task_id)

    @staticmethod
    def _scripted(kind: str, selection):
        """The job's work: the request as a processing object of `kind`, made with its scripts."""
        def run(ctx, req, job, settings):
            from modules import generation, shared
            from modules.scripting.host import run_with_scripts
            p = getattr(generation, kind)(ctx, req, job, settings)
            with shared.request_scope(p.settings, job):
                return run_with_scripts(p, selection)
        return run

    def submit_img2img_batch(self, req, folders, *, owner: str | None = None):
        """Queue img2img's Batch mode (every image of `folders.input_dir` through `req`) as one job."""
        from modules import generation
        folders.images()  # a folder without images is refused now, not in the queue
        generation.validate_img2img(dataclasses.replace(req, init_images=[_placeholder_image()]))
        return self._queue_generation(
            "img2img", req, lambda ctx, r, job, settings: generation.run_img2img_batch(ctx, r, folders, job, settings),
            None, owner, None)

    def _queue_generation(self, kind: str, req, run, override_settings, owner, task_id):
        """What every generation checks before it is queued (its styles exist, its settings are valid, there is a
        checkpoint to run on), then the job: `run(context, req, job, settings)` on the worker."""
        from modules import generation
        self.styles.apply(req.prompt, req.negative_prompt, req.styles)  # unknown style names fail here, not later
        settings = self.settings_for_request(override_settings)  # a named checkpoint is resolved here
        if not settings.get("sd_model_checkpoint") and not self.registry.list():
            raise generation.GenerationError(
                f"no checkpoint found: put a .safetensors file in {self.folders.checkpoint_dirs[0]} "
                "(or start with --demo)")
        return self.queue.submit(lambda job: run(self.generation_context(), req, job, settings), kind=kind,
                                 owner=owner, task_id=task_id)

    def submit_model_comparison(self, req, *, owner: str | None = None):
        """Validate and queue a model comparison report (`generation.ComparisonRequest`); the job's result is the
        report's dict (see `generation.comparison.run_comparison`)."""
        from modules.generation import comparison
        comparison.validate_comparison(self.generation_context(), req)
        settings = self.settings_for_request(None)
        return self.queue.submit(lambda job: comparison.run_comparison(self.generation_context(), req, job, settings),
                                 kind="comparison", owner=owner)

    def extras_save_target(self, folder: str | Path | None = None, *, keep_names: bool = False):
        """Where the Extras tab saves (A1111): `folder` (a batch's output directory), else the `outdir_samples`
        setting, else outputs/extras-images; in the samples format, with the infotext when enable_pnginfo."""
        from modules.core import upscaling
        opts = self.options
        target = Path(folder).expanduser() if folder else (
            Path(opts.get("outdir_samples")).expanduser() if opts.get("outdir_samples")
            else self.outputs_root() / upscaling.EXTRAS_FOLDER)
        return upscaling.SaveTarget(folder=target, extension=opts.get("samples_format"),
                                    jpeg_quality=opts.get("jpeg_quality"), pnginfo=bool(opts.get("enable_pnginfo")),
                                    keep_names=keep_names)

    def submit_extras(self, images, params, *, save=None, owner: str | None = None, keep_images: bool = True):
        """Validate and queue an extras job (`images`: (PIL image or image file, file name or None) pairs,
        upscaled by `params`, an `upscaling.ExtrasParams`; saved to `save`, a SaveTarget, when given) on the one
        queue, so it never races generation on the GPU; returns the Job (its result an `upscaling.ExtrasResult`)."""
        from modules.core import upscaling
        images = list(images)
        if not images:
            raise upscaling.ExtrasError("no image: upload one (or several) first")
        upscaling.validate(params, self.upscalers)
        for image, _name in images:
            upscaling.check_size(upscaling.image_size(image), params)
        return self.queue.submit(lambda job: upscaling.run_extras(images, params, self.upscalers, save=save, job=job,
                                                                  keep_images=keep_images),
                                 kind="extras", owner=owner)

    def load_checkpoint_now(self, name: str | None = None, timeout: float | None = None):
        """Load a checkpoint through the queue (so it never races a running job) and wait for it."""
        info = self.resolve_checkpoint(name) if name else self.current_checkpoint()
        if info is None:
            return None

        def load(job):
            rt = self.runtime()
            with sd_pipelines.use_checkpoint(rt.manager, info, dtype=rt.dtype, vae_dtype=rt.vae_dtype,
                                             attention=rt.attention):
                pass
            return info

        from modules.model_store import sd_pipelines
        return self.queue.submit(load, kind="load-checkpoint").wait(timeout)

    def unload_checkpoints(self) -> None:
        self.manager.unload_all(kind="checkpoint")
