"""Sample images during a run, through the studio's own generation service (its samplers and prompt language),
over the very modules being trained. Prompts come from a file in kohya's format: one prompt per line, with
options `--n` negative prompt, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps, `--ss` sampler
(kohya's names such as `euler_a` or the studio's own such as `Euler a`); `#` starts a comment line.
Class images for DreamBooth's prior preservation are made the same way, by the base model, once."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from modules.core import samplers
from modules.core.fileio import atomic_write_text
from modules.training.config import TrainConfigError

KOHYA_SAMPLERS = {
    "ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
    "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver": "DPM++ 2M", "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2M",
}


@dataclass
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int = -1
    cfg_scale: float = 7.0
    steps: int = 20
    sampler: str = "Euler a"


def _sampler(name: str) -> str:
    mapped = KOHYA_SAMPLERS.get(name.lower(), name)
    known = {s.lower(): s for s in samplers.sampler_names()}
    if mapped.lower() not in known:
        raise TrainConfigError(f"sample_prompts: unknown sampler {name!r} (kohya names such as euler_a, or the "
                               f"studio's: {', '.join(sorted(known.values()))})")
    return known[mapped.lower()]


# kohya's per-line option -> (SamplePrompt field, how its text is read)
PROMPT_OPTIONS = {"n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
                  "l": ("cfg_scale", float), "s": ("steps", int), "ss": ("sampler", lambda v: _sampler(v))}


def parse_prompts(text: str, resolution: int) -> list[SamplePrompt]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s--(?=[a-z]+\s)", " " + line)
        sp = SamplePrompt(prompt=parts[0].strip(), width=resolution, height=resolution)
        for part in parts[1:]:
            key, _, value = part.partition(" ")
            value = value.strip()
            if key not in PROMPT_OPTIONS:
                raise TrainConfigError(f"sample_prompts line {number}: unknown option --{key}")
            attr, parse = PROMPT_OPTIONS[key]
            try:
                setattr(sp, attr, parse(value))
            except ValueError:
                raise TrainConfigError(f"sample_prompts line {number}: --{key} needs a number, got {value!r}") from None
        out.append(sp)
    return out


def read_prompts(path: str, resolution: int) -> list[SamplePrompt]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TrainConfigError(f"sample_prompts: cannot read {path}: {e.strerror}") from None
    prompts = parse_prompts(text, resolution)
    if not prompts:
        raise TrainConfigError(f"sample_prompts: {path} holds no prompt")
    for sp in prompts:
        _request(sp)
    return prompts


def _request(sp: SamplePrompt):
    from modules.generation import GenerationError, Txt2ImgRequest, validate

    req = Txt2ImgRequest(prompt=sp.prompt, negative_prompt=sp.negative_prompt, width=sp.width, height=sp.height,
                         seed=sp.seed, cfg_scale=sp.cfg_scale, steps=sp.steps, sampler_name=sp.sampler,
                         save_images=False)
    try:
        return validate(req)
    except GenerationError as e:
        raise TrainConfigError(f"sample prompt {sp.prompt[:40]!r}: {e}") from None


def _context(info, manager, outputs_root: Path, dtype):
    from modules.generation import GenerationContext
    from modules.model_store.checkpoints import CheckpointRegistry
    from modules.prompting.styles import StyleDatabase

    registry = CheckpointRegistry([], [Path(info.filename)])
    registry.refresh()
    return GenerationContext(registry=registry, manager=manager, styles=StyleDatabase(outputs_root / "styles.csv"),
                             outputs_root=outputs_root, dtype=dtype)


def _generate(ctx, sp: SamplePrompt, name: str):
    req = _request(sp)
    from modules.generation import run_txt2img

    result = run_txt2img(ctx, req, settings={"sd_model_checkpoint": name})
    return result.images[0], result.infotexts[0]


def _save(image, infotext: str, path: Path) -> Path:
    from modules.core.fileio import atomic_open
    from modules.core.outputs import encode_image

    with atomic_open(path, "wb") as f:
        f.write(encode_image(image, "PNG", infotext=infotext))
    return path


class Sampler:
    """Samples over the trainer's live modules: a model manager of its own holds a bundle of them under the base
    checkpoint's key, so the generation service finds them 'loaded' and never reads the file."""

    def __init__(self, prompts: list[SamplePrompt], folder: Path):
        self.prompts, self.folder = prompts, folder

    def __call__(self, trainer, step: int) -> list[Path]:
        import torch

        from modules.model_store import checkpoint_files, loading, sd_pipelines
        from modules.model_store.model_manager import ModelManager

        base = trainer.base
        comps = dict(base.components)
        for name, model in trainer.trainee.models.items():
            comps[name] = trainer.accelerator.unwrap_model(model)
        dtype = comps["unet"].dtype
        arch = checkpoint_files.detect_architecture(base.info.filename)
        bundle = sd_pipelines.CheckpointBundle(loading.LoadedCheckpoint(info=base.info, arch=arch, components=comps,
                                                                        config_dir=base.config_dir))
        manager = ModelManager(str(trainer.device), vram_budget=2**62, ram_budget=2**62)
        key = sd_pipelines.checkpoint_key(base.info, dtype)
        paths = []
        with manager.use(key, lambda: bundle, kind="checkpoint", name=base.info.name), torch.no_grad():
            ctx = _context(base.info, manager, self.folder, dtype)
            for i, sp in enumerate(self.prompts):
                image, infotext = _generate(ctx, sp, base.info.name)
                paths.append(_save(image, infotext, self.folder / f"step{step:06d}-{i:02d}.png"))
        return paths


# ------------------------------------------------------------------------------- prior preservation

def class_folder(root: Path, base_info, class_prompt: str, resolution: int) -> Path:
    """Where the class images of (base model, class prompt, resolution) live: shared by every run asking for them."""
    key = hashlib.sha256(f"{base_info.sha256}|{class_prompt}|{resolution}".encode()).hexdigest()[:16]
    return root / key


def ensure_class_images(root: Path, base_info, class_prompt: str, count: int, resolution: int, seed: int,
                        device: str, progress) -> Path:
    """The folder of `count` class images made by the base model itself; only missing ones are generated (a later
    run with the same model and prompt generates none). Returns the reg data folder to train with."""
    folder = class_folder(root, base_info, class_prompt, resolution)
    images = folder / f"1_{_folder_words(class_prompt)}"
    images.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "class.txt", f"{class_prompt}\n{base_info.name}\n{resolution}\n")
    have = sorted(images.glob("*.png"))
    missing = [i for i in range(count) if not (images / f"{i:05d}.png").exists()]
    progress.emit("class_images", have=len(have), generating=len(missing), folder=str(images))
    if not missing:
        return folder
    import torch

    from modules.model_store.model_manager import ModelManager

    manager = ModelManager(device, vram_budget=2**62, ram_budget=2**62)
    ctx = _context(base_info, manager, folder, torch.float32)
    for i in missing:
        sp = SamplePrompt(prompt=class_prompt, width=resolution, height=resolution, seed=seed + i, steps=20)
        image, infotext = _generate(ctx, sp, base_info.name)
        _save(image, infotext, images / f"{i:05d}.png")
        atomic_write_text(images / f"{i:05d}.txt", class_prompt)
    manager.unload_all()
    progress.emit("class_images", have=count, generating=0, folder=str(images))
    return folder


def _folder_words(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9 ,_-]+", "", text)[:60].strip() or "class"


