"""Typed settings: their specs, validation, per-request overrides, and persistence to config.json."""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from modules.core.fileio import atomic_write_text

log = logging.getLogger("webui.options")


class OptionError(ValueError):
    """A setting name or value that cannot be accepted."""


@dataclass(frozen=True)
class OptionSpec:
    default: Any
    label: str
    section: str = "General"
    type: type | tuple = str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | Callable[[], list] | None = None
    api_writable: bool = True  # paths and other server-side config are read-only over the API
    ui: bool = True  # shown in the Settings tab

    def coerce(self, key: str, value: Any) -> Any:
        t = self.type
        try:
            if t is bool:
                if isinstance(value, str):
                    if value.lower() in ("true", "1", "yes", "on"):
                        value = True
                    elif value.lower() in ("false", "0", "no", "off"):
                        value = False
                    else:
                        raise ValueError(value)
                elif not isinstance(value, (bool, int)):
                    raise ValueError(value)
                value = bool(value)
            elif t is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                value = int(value)
            elif t is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                value = float(value)
            elif t is str:
                if value is None:
                    value = ""
                if not isinstance(value, str):
                    raise ValueError(value)
            elif t is list:
                if not isinstance(value, list):
                    raise ValueError(value)
        except (TypeError, ValueError):
            raise OptionError(f"setting {key!r} expects {getattr(t, '__name__', t)}, got {value!r}") from None
        if self.minimum is not None and value < self.minimum:
            raise OptionError(f"setting {key!r} must be >= {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise OptionError(f"setting {key!r} must be <= {self.maximum}, got {value!r}")
        choices = self.choices() if callable(self.choices) else self.choices
        if choices is not None and value not in choices:
            raise OptionError(f"setting {key!r} must be one of {list(choices)}, got {value!r}")
        return value


def default_specs() -> dict[str, OptionSpec]:
    """Every setting, with A1111's key names where A1111 has the setting."""
    S = OptionSpec
    return {
        # Stable Diffusion
        "sd_model_checkpoint": S("", "Stable Diffusion checkpoint", "Stable Diffusion", ui=False),
        "sd_checkpoint_hash": S("", "Hash of the current checkpoint", "Stable Diffusion", api_writable=False, ui=False),
        "sd_vae": S("Automatic", "SD VAE", "Stable Diffusion", choices=("Automatic", "None")),
        "CLIP_stop_at_last_layers": S(1, "Clip skip", "Stable Diffusion", int, 1, 12),
        "sdxl_clip_l_skip": S(False, "Clip skip SDXL: apply Clip skip to SDXL's CLIP-L encoder (else both SDXL "
                              "encoders always use their penultimate layer)", "Stable Diffusion", bool),
        "sd_prediction_type": S("Automatic", "Prediction type (Automatic: what the checkpoint says or its weights "
                                "show; set epsilon or v_prediction when an SD2 model gives grey or noisy images)",
                                "Stable Diffusion", choices=("Automatic", "epsilon", "v_prediction")),
        "sd_text_encoder_clip_l": S("Automatic", "CLIP-L text encoder for FLUX/SD3 files that ship without one (a "
                                    "file of models/text_encoder; Automatic: the first, full precision before fp8)",
                                    "Stable Diffusion", choices=("Automatic",)),
        "sd_text_encoder_clip_g": S("Automatic", "CLIP-G text encoder for SD3 files that ship without one",
                                    "Stable Diffusion", choices=("Automatic",)),
        "sd_text_encoder_t5": S("Automatic", "T5-XXL text encoder for FLUX/SD3 files that ship without one",
                                "Stable Diffusion", choices=("Automatic",)),
        "flow_shift": S(0.0, "Shift for SD3 and FLUX (the flow-matching timestep shift; 0: the model's own, FLUX.1-dev's "
                        "grows with the image size)", "Stable Diffusion", float, 0.0, 100.0),
        "emphasis": S("Original", "Emphasis mode: (word:1.2) weights, rescaled to the original mean or not",
                      "Stable Diffusion", choices=("Original", "No norm")),
        "comma_padding_backtrack": S(20, "Prompt word wrap length limit (tokens moved to the next chunk after a "
                                     "comma)", "Stable Diffusion", int, 0, 74),
        "use_old_scheduling": S(False, "Use old prompt editing timelines", "Stable Diffusion", bool),
        "eta_noise_seed_delta": S(0, "Eta noise seed delta (ENSD)", "Sampler parameters", int, 0),
        "eta_ddim": S(0.0, "Eta for DDIM", "Sampler parameters", float, 0.0, 1.0),
        "eta_ancestral": S(1.0, "Eta for k-diffusion (ancestral) samplers", "Sampler parameters", float, 0.0, 1.0),
        # Saving images
        "samples_save": S(True, "Always save all generated images", "Saving images", bool),
        "samples_format": S("png", "File format for images", "Saving images", choices=("png", "jpg", "jpeg", "webp")),
        "grid_save": S(True, "Always save all generated image grids", "Saving images", bool),
        "return_grid": S(True, "Show grid in gallery and API results", "Saving images", bool),
        "enable_pnginfo": S(True, "Save text information about generation parameters as chunks to png files",
                            "Saving images", bool),
        "jpeg_quality": S(80, "Quality for saved jpeg and webp images", "Saving images", int, 1, 100),
        "grid_format": S("png", "File format for grids", "Saving images", choices=("png", "jpg", "jpeg", "webp")),
        "grid_background_color": S("#ffffff", "Background colour of image grids (empty cells, legends)",
                                   "Saving images"),
        "grid_text_active_color": S("#000000", "Text colour of grid legends", "Saving images"),
        "grid_text_inactive_color": S("#999999", "Text colour of a grid legend's inactive prompt parts",
                                      "Saving images"),
        "grid_margin": S(0, "Margin between grid cells in pixels (batch grids and Loopback; X/Y/Z plot and "
                         "Prompt matrix have their own)", "Saving images", int, 0, 500),
        "grid_font_size": S(0, "Legend font size in pixels (0: from the image size, as A1111)", "Saving images",
                            int, 0, 200),
        "xyz_record_timing": S(False, "X/Y/Z plot: write seconds per image and peak memory under each cell, and a "
                               "CSV/JSON table beside the grid (model comparison)", "Saving images", bool),
        "outdir_samples": S("", "Output directory for images; if empty, the outputs folder's txt2img-images and "
                            "img2img-images folders", "Paths for saving", api_writable=False),
        # Upscaling (the model upscalers of the Extras tab and hires fix: ESRGAN, Real-ESRGAN)
        "ESRGAN_tile": S(192, "Tile size for ESRGAN upscalers (input pixels; 0 = no tiling)", "Upscaling", int, 0, 512),
        "ESRGAN_tile_overlap": S(8, "Tile overlap for ESRGAN upscalers (pixels; low values give visible seams)",
                                 "Upscaling", int, 0, 48),
        # UI / live previews
        "send_seed": S(True, "Send seed when sending prompt or image to other interface", "User interface", bool),
        "send_size": S(True, "Send size when sending prompt or image to another interface", "User interface", bool),
        "live_previews_enable": S(True, "Show live previews of the created image", "Live previews", bool),
        "show_progress_every_n_steps": S(5, "Live preview display period (in sampling steps; 0 disables)",
                                         "Live previews", int, 0, 100),
        # Memory (this project's model manager)
        "vram_budget_mb": S(0, "VRAM budget for loaded models in MB (0: automatic, total minus a reserve)",
                            "Memory", int, 0),
        "ram_budget_mb": S(0, "RAM budget for models moved off the GPU in MB (0: automatic, half the RAM)",
                           "Memory", int, 0),
        # Extensions (changed in the Extensions tab; applied at the next start)
        "disabled_extensions": S(["example-extension"], "Disabled extensions", "Extensions", list,
                                 api_writable=False, ui=False),
        "disable_all_extensions": S("none", "Disable all extensions (applied at the next start)", "Extensions",
                                    choices=("none", "extra", "all"), api_writable=False, ui=False),
        # Training
        "training_shares_gpu": S(False, "Let generation run while a training run uses the GPU (else requests wait "
                                 "in the queue until the run ends)", "Training", bool, api_writable=False),
        # API and queue (server configuration: the limits protect a shared server, so clients cannot lift them)
        "queue_max_pending": S(100, "Most jobs that may wait in the queue (more are refused with HTTP 503)",
                               "API", int, 1, 100000, api_writable=False),
        "api_enable_requests": S(False, "Allow http(s) URLs as images in API requests (never to loopback or "
                                 "private addresses)", "API", bool, api_writable=False),
        "api_max_request_mb": S(64, "Largest request body in MB (larger ones are refused with HTTP 413)",
                                "API", int, 1, 4096, api_writable=False),
        "api_max_steps": S(0, "Most sampling steps an API request may ask for (0: no limit of its own)",
                           "API", int, 0, 500, api_writable=False),
        "api_max_size": S(0, "Largest width/height in pixels an API request may ask for, hires fix included "
                          "(0: no limit of its own)", "API", int, 0, 8192, api_writable=False),
        "api_max_images": S(0, "Most images one API request may ask for (0: no limit of its own)",
                            "API", int, 0, 1000, api_writable=False),
    }


class Options:
    """The settings store. Reads never see a half-applied update; writes validate everything first."""

    def __init__(self, path: Path | None, specs: Mapping[str, OptionSpec] | None = None, frozen: bool = False):
        self.path = Path(path) if path else None
        self.specs = dict(specs or default_specs())
        self.frozen = frozen
        self._lock = threading.RLock()
        self._values = {k: s.default for k, s in self.specs.items()}
        self._extra: dict[str, Any] = {}  # unknown keys found in an older config.json are kept, not lost
        self._listeners: list[Callable[[dict], None]] = []
        if self.path and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("could not read %s (%s); using defaults and keeping the file as it is", self.path, e)
            return
        for key, value in data.items():
            spec = self.specs.get(key)
            if spec is None:
                self._extra[key] = value
                continue
            try:
                self._values[key] = spec.coerce(key, value)
            except OptionError as e:
                log.warning("config.json: %s; using the default", e)

    def add_spec(self, key: str, spec: OptionSpec) -> None:
        """A setting declared after start-up (an extension's `shared.opts.add_option`): a value config.json
        already holds for it is taken back from the unknown keys; a key the studio itself has is refused."""
        with self._lock:
            if key in self.specs:
                if self.specs[key] == spec:
                    return
                raise OptionError(f"setting {key!r} already exists")
            self.specs[key] = spec
            value = spec.default
            if key in self._extra:
                try:
                    value = spec.coerce(key, self._extra.pop(key))
                except OptionError as e:
                    log.warning("config.json: %s; using the default", e)
            self._values[key] = value

    def add_listener(self, fn: Callable[[dict], None]) -> None:
        """fn(changed) runs after every successful update (e.g. to apply new memory budgets)."""
        self._listeners.append(fn)

    def get(self, key: str) -> Any:
        with self._lock:
            return self._values[key]

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def validate(self, updates: Mapping[str, Any], *, from_api: bool = False) -> dict[str, Any]:
        """Check an update without applying it; returns the coerced values or raises OptionError."""
        out = {}
        errors = []
        for key, value in updates.items():
            spec = self.specs.get(key)
            if spec is None:
                errors.append(f"unknown setting {key!r}")
                continue
            if from_api and not spec.api_writable:
                errors.append(f"setting {key!r} is server configuration and cannot be changed over the API")
                continue
            try:
                out[key] = spec.coerce(key, value)
            except OptionError as e:
                errors.append(str(e))
        if errors:
            raise OptionError("; ".join(errors))
        return out

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """A request's own view of the settings: a copy with its override_settings applied."""
        snap = self.snapshot()
        if overrides:
            snap.update(self.validate(overrides, from_api=True))
        return snap

    def update(self, updates: Mapping[str, Any], *, from_api: bool = False) -> dict[str, Any]:
        if self.frozen and updates:
            raise OptionError("settings are frozen (--freeze-settings)")
        values = self.validate(updates, from_api=from_api)
        with self._lock:
            changed = {k: v for k, v in values.items() if self._values.get(k) != v}
            self._values.update(values)
            self.save()
        for fn in self._listeners:
            fn(changed)
        return changed

    def save(self) -> None:
        if not self.path:
            return
        with self._lock:
            data = {**self._extra, **self._values}
            atomic_write_text(self.path, json.dumps(data, indent=4, ensure_ascii=False))
