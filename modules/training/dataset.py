"""A run's images, in kohya's folder layout, and the order they are trained in.

Layout: `train_data_dir` holds `N_words` sub-folders (N = repeats: each image counts N times per epoch; the
words are the caption of an image that has no caption file), and may hold images directly (repeats 1). A caption
file is the image's name with `caption_extension` beside it; an empty one counts as missing. Other sub-folders
are ignored (and named in the warnings), as are hidden ones such as the latent cache. `reg_data_dir` (the
regularisation / class images) has the same layout.

Buckets: without `enable_bucket` every image is resized so its shorter side is the resolution, then
centre-cropped square. With it, each image gets the bucket of its own aspect ratio: scaled to about
resolution**2 pixels, each side rounded down to a multiple of `bucket_reso_steps` (within the min/max sides),
then the image is resized to cover the bucket and centre-cropped -- so less than one bucket step is ever cut
from a side, and images of one aspect ratio share a bucket.

Order: deterministic for (seed, epoch), from a `random.Random` of its own (never the global RNG): each image
repeats N times, regularisation images are cycled to as many entries as the training images have (kohya's
balance), entries are grouped by bucket, shuffled within it, cut into batches of one bucket each, and the
batches shuffled.

Scanning is torch-free (PIL only): the server and the UI preview a dataset without loading torch.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from modules.core.fileio import atomic_write_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEATS_RE = re.compile(r"^(\d+)_(.*)$")


class DatasetError(ValueError):
    """A data folder a run cannot start with."""


@dataclass
class ImageItem:
    path: Path
    folder: str
    repeats: int
    caption: str
    caption_source: str  # "file" | "folder" | "missing"
    is_reg: bool
    size: tuple[int, int]
    bucket: tuple[int, int]
    content_hash: str


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bucket_for(size: tuple[int, int], cfg) -> tuple[int, int]:
    if not cfg.enable_bucket:
        return cfg.resolution, cfg.resolution
    w, h = size
    step = cfg.bucket_reso_steps
    scale = math.sqrt(cfg.resolution * cfg.resolution / (w * h))
    lo = math.ceil(cfg.min_bucket_reso / step) * step
    hi = max(lo, cfg.max_bucket_reso // step * step)

    def side(v: float) -> int:
        return min(hi, max(lo, int(v // step) * step))
    return side(w * scale), side(h * scale)


def load_image(item: ImageItem):
    """(RGB image of exactly the bucket size, (top, left) of the crop in resized pixels, original (h, w))."""
    bw, bh = item.bucket
    with Image.open(item.path) as im:
        im = im.convert("RGB")
    w, h = im.size
    rw, rh = _covering_size(im.size, item.bucket)
    im = im.resize((rw, rh), Image.Resampling.LANCZOS)
    top, left = crop_for((w, h), item.bucket)
    return im.crop((left, top, left + bw, top + bh)), (top, left), (h, w)


def _covering_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to so that it covers the bucket."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    return max(bw, round(w * scale)), max(bh, round(h * scale))


def crop_for(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centre crop of an image of `size` (w, h) into `bucket`, in resized pixels."""
    rw, rh = _covering_size(size, bucket)
    return (rh - bucket[1]) // 2, (rw - bucket[0]) // 2


def _read_caption(path: Path, extension: str) -> str:
    file = path.with_name(path.stem + extension)
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return ""
    return ""


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def _scan_folder(root: Path, cfg, is_reg: bool, items: list, skipped: list, warnings: list) -> int:
    """Adds the items of one data folder; returns how many N_words sub-folders it has."""
    groups: list[tuple[Path, str, int, str]] = [(root, "", 1, "")]
    subfolders = 0
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name.startswith("."):
            continue
        m = REPEATS_RE.match(sub.name)
        if not m or int(m.group(1)) < 1:
            warnings.append(f"ignored folder {sub}: name it N_words (N repeats, e.g. '5_sks dog')")
            continue
        subfolders += 1
        groups.append((sub, sub.name, int(m.group(1)), m.group(2).strip()))
    for folder, name, repeats, words in groups:
        for path in _images_in(folder):
            try:
                with Image.open(path) as im:
                    im.verify()
                with Image.open(path) as im:
                    size = im.size
            except Exception as e:  # any unreadable file is skipped and named
                skipped.append((str(path), f"not a readable image ({type(e).__name__})"))
                continue
            caption = _read_caption(path, cfg.caption_extension)
            source = "file" if caption else ("folder" if words else "missing")
            items.append(ImageItem(path=path, folder=name, repeats=repeats, caption=caption or words,
                                   caption_source=source, is_reg=is_reg, size=size, bucket=bucket_for(size, cfg),
                                   content_hash=_sha256(path)))
    return subfolders


def _check_dir(text: str, what: str) -> Path:
    if not text:
        raise DatasetError(f"{what}: name the folder of images")
    path = Path(text).expanduser()
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is not a folder")
    return path


def scan(cfg) -> "DatasetPlan":
    train = _check_dir(cfg.train_data_dir, "train_data_dir")
    items: list[ImageItem] = []
    skipped: list[tuple[str, str]] = []
    warnings: list[str] = []
    subfolders = _scan_folder(train, cfg, False, items, skipped, warnings)
    if not items:
        what = f"; skipped {len(skipped)} unreadable file(s)" if skipped else ""
        raise DatasetError(f"no images in {train} (looked in {subfolders} sub-folder(s) named N_words and the folder "
                           f"itself{what})")
    if cfg.reg_data_dir:
        reg = _check_dir(cfg.reg_data_dir, "reg_data_dir")
        before = len(items)
        _scan_folder(reg, cfg, True, items, skipped, warnings)
        if len(items) == before:
            raise DatasetError(f"no images in reg_data_dir {reg}")
    return DatasetPlan(items=items, skipped=skipped, warnings=warnings)


@dataclass
class DatasetPlan:
    items: list[ImageItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def train_items(self) -> list[ImageItem]:
        return [i for i in self.items if not i.is_reg]

    @property
    def reg_items(self) -> list[ImageItem]:
        return [i for i in self.items if i.is_reg]

    @property
    def num_train_images(self) -> int:
        return sum(i.repeats for i in self.train_items)

    @property
    def num_reg_images(self) -> int:
        return sum(i.repeats for i in self.reg_items)

    def buckets(self) -> dict[tuple[int, int], int]:
        counts: Counter = Counter()
        for item in self.train_items:
            counts[item.bucket] += item.repeats
        return dict(counts)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = defaultdict(dict)
        for item in self.train_items:
            tags = out[item.folder]
            for tag in {t.strip() for t in item.caption.split(",") if t.strip()}:
                tags[tag] = tags.get(tag, 0) + 1
        return dict(out)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for item in self.train_items:
            entry = out.setdefault(item.folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    def _entries(self, rng: random.Random) -> list[int]:
        entries = [i for i, item in enumerate(self.items) if not item.is_reg for _ in range(item.repeats)]
        reg = [i for i, item in enumerate(self.items) if item.is_reg for _ in range(item.repeats)]
        if reg:
            rng.shuffle(reg)
            count = len(entries)
            entries += [reg[k % len(reg)] for k in range(count)]
        return entries

    def epoch_batches(self, global_batch_size: int, epoch: int, seed: int) -> list[list[int]]:
        rng = random.Random(f"{seed}-{epoch}")
        by_bucket: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index in self._entries(rng):
            by_bucket[self.items[index].bucket].append(index)
        batches = []
        for bucket in sorted(by_bucket):
            entries = by_bucket[bucket]
            rng.shuffle(entries)
            batches += [entries[k:k + global_batch_size] for k in range(0, len(entries), global_batch_size)]
        rng.shuffle(batches)
        return batches

    def steps_per_epoch(self, global_batch_size: int) -> int:
        counts: Counter = Counter()
        for index in self._entries(random.Random(0)):
            counts[self.items[index].bucket] += 1
        return sum(math.ceil(c / global_batch_size) for c in counts.values())

    def validate_batch(self, global_batch_size: int) -> None:
        if global_batch_size > self.num_train_images:
            raise DatasetError(f"train_batch_size {global_batch_size} is larger than the dataset "
                               f"({self.num_train_images} images with repeats)")

    def missing_captions(self) -> list[ImageItem]:
        return [i for i in self.train_items if i.caption_source == "missing"]

    def preview(self) -> list[dict]:
        return [{"path": str(i.path), "folder": i.folder, "repeats": i.repeats, "caption": i.caption,
                 "caption_source": i.caption_source, "size": list(i.size), "bucket": list(i.bucket),
                 "is_reg": i.is_reg} for i in self.items]


def summary(plan: DatasetPlan, global_batch: int) -> dict:
    return {"images": len(plan.train_items), "repeats_total": plan.num_train_images,
            "reg_images": len(plan.reg_items),
            "buckets": [{"size": list(k), "count": v} for k, v in sorted(plan.buckets().items())],
            "steps_per_epoch": plan.steps_per_epoch(global_batch), "skipped": [list(s) for s in plan.skipped],
            "warnings": list(plan.warnings), "missing_captions": len(plan.missing_captions())}


def process_caption(caption: str, *, shuffle: bool, keep_tokens: int, dropout_rate: float,
                    rng: random.Random) -> str:
    """A caption as one step trains on it: dropped (empty) with `dropout_rate`, else with its comma-separated tags
    shuffled after the first `keep_tokens`."""
    if dropout_rate and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def write_missing_captions(plan: DatasetPlan, caption_fn: Callable[[Path], str], extension: str) -> list[Path]:
    """Caption the training images that have none (never overwriting a caption file); returns the files written."""
    written = []
    for item in plan.missing_captions():
        target = item.path.with_name(item.path.stem + extension)
        if target.exists():
            continue
        text = caption_fn(item.path).strip()
        atomic_write_text(target, text + "\n")
        item.caption, item.caption_source = text, "file"
        written.append(target)
    return written


# ------------------------------------------------------------------------------------------ latent cache

def latent_key(item: ImageItem, vae_id: str) -> str:
    return hashlib.sha256(f"{item.content_hash}|{item.bucket}|{vae_id}".encode()).hexdigest()


class LatentCache:
    """Latents by key (image content, bucket, VAE): in memory, and on disk in `folder` when given (so later runs
    on the same images and VAE reuse them)."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder else None
        self._memory: dict = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._memory)

    def get(self, key: str):
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        if self.folder is not None:
            path = self.folder / f"{key}.safetensors"
            if path.is_file():
                try:
                    from safetensors.torch import load_file
                    tensor = load_file(str(path))["latent"]
                except Exception:  # a damaged cache file is dropped and made again
                    path.unlink(missing_ok=True)
                else:
                    self._memory[key] = tensor
                    self.hits += 1
                    return tensor
        self.misses += 1
        return None

    def put(self, key: str, tensor) -> None:
        self._memory[key] = tensor
        if self.folder is not None:
            from safetensors.torch import save_file
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{os.getpid()}.tmp"
            save_file({"latent": tensor.contiguous()}, str(tmp))
            os.replace(tmp, self.folder / f"{key}.safetensors")
