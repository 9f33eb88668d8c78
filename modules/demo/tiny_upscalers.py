"""Tiny seeded upscaler files for tests and --demo, in the layouts people download:

- DIR/ESRGAN/tiny-esrgan-4x.safetensors: an ESRGAN RRDBNet x4 (nf=8, nb=1, gc=4) in the original ESRGAN key
  layout (`model.0.weight`, `model.1.sub.0.RDB1.conv1.0.weight`, ...);
- DIR/RealESRGAN/tiny-realesrgan-x2.pth: a Real-ESRGAN x2 RRDBNet (the same widths, pixel-unshuffle input) in
  BasicSR's layout under `params_ema`, as Real-ESRGAN ships its .pth files.

The weights are random but lean on a pass-through (each conv's centre tap carries the image's channels), so a
result looks like the picture, upscaled and speckled, rather than like noise; every layer still has random
weights of its own, so the networks compute something real.
"""
from __future__ import annotations

from pathlib import Path

ESRGAN_SUBDIR, REALESRGAN_SUBDIR = "ESRGAN", "RealESRGAN"
TINY_ESRGAN = "tiny-esrgan-4x"
TINY_REALESRGAN = "tiny-realesrgan-x2"
TINY_UPSCALER_SEED = 20
TINY_WIDTHS = dict(nf=8, nb=1, gc=4)


def build_tiny_rrdbnet(scale: int = 4, seed: int = TINY_UPSCALER_SEED, nf: int = 8, nb: int = 1, gc: int = 4,
                       passthrough: bool = True):
    """A seeded tiny RRDBNet of `scale` 4 (two upsamplings) or 2 (the same over a pixel-unshuffle of 2)."""
    import torch

    from modules.model_store.upscaler_arch import RRDBNet
    torch.manual_seed(seed)
    model = RRDBNet(in_nc=3, out_nc=3, nf=nf, nb=nb, gc=gc, upsamples=2, unshuffle={4: 1, 2: 2, 1: 4}[scale])
    if passthrough:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.1)
            pick = model.unshuffle ** 2  # unshuffled channel c * pick is channel c's top-left pixel of a block
            for c in range(3):
                model.conv_first.weight[c, c * pick, 1, 1] += 1.0
                for name in ("conv_up1", "conv_up2", "conv_hr"):
                    getattr(model, name).weight[c, c, 1, 1] += 1.0
                model.conv_last.weight[c, c, 1, 1] += 1.0
    return model.eval()


def new_to_old_esrgan(state: dict) -> dict:
    """BasicSR's RRDBNet names in the original ESRGAN layout (the inverse of upscaler_arch.old_esrgan_to_new),
    for a network with two upsamplings."""
    import re
    nb = len({k.split(".")[1] for k in state if k.startswith("body.")})
    tail = {"conv_first": "model.0", "conv_body": f"model.1.sub.{nb}", "conv_up1": "model.3", "conv_up2": "model.6",
            "conv_hr": "model.8", "conv_last": "model.10"}
    old = {}
    for key, value in state.items():
        m = re.match(r"^body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$", key)
        if m:
            old[f"model.1.sub.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.0.{m.group(4)}"] = value
        else:
            layer, kind = key.rsplit(".", 1)
            old[f"{tail[layer]}.{kind}"] = value
    return old


def make_tiny_upscalers(dir: str | Path) -> dict[str, Path]:
    """Write the tiny upscaler files under DIR (kept when already written by this recipe version)."""
    import torch

    from modules.demo import tiny_models
    root = Path(dir)
    esrgan = root / ESRGAN_SUBDIR / f"{TINY_ESRGAN}.safetensors"
    realesrgan = root / REALESRGAN_SUBDIR / f"{TINY_REALESRGAN}.pth"
    if not tiny_models._is_current(esrgan):
        state = {k: v.detach().contiguous() for k, v in build_tiny_rrdbnet(4).state_dict().items()}
        tiny_models._write_safetensors(esrgan, new_to_old_esrgan(state), {})
    if not _pth_is_current(realesrgan):
        state = {k: v.detach().clone().contiguous() for k, v in build_tiny_rrdbnet(2, TINY_UPSCALER_SEED + 1)
                 .state_dict().items()}
        realesrgan.parent.mkdir(parents=True, exist_ok=True)
        from modules.core.fileio import atomic_open
        with atomic_open(realesrgan, "wb") as f:
            torch.save({"params_ema": state, tiny_models.VERSION_METADATA_KEY: tiny_models.TINY_MODELS_VERSION}, f)
    return {TINY_ESRGAN: esrgan, TINY_REALESRGAN: realesrgan}


def _pth_is_current(path: Path) -> bool:
    import torch

    from modules.demo import tiny_models
    if not path.is_file():
        return False
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get(tiny_models.VERSION_METADATA_KEY) == tiny_models.TINY_MODELS_VERSION
