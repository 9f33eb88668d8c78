"""The training dataset (kohya folders, buckets, data order, captions, latent cache) and the run options (TOML)."""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from modules.training import config, dataset


def cfg(tmp: Path, **kw):
    return replace(config.TrainConfig(train_data_dir=str(tmp), resolution=256, enable_bucket=True,
                                      min_bucket_reso=64, max_bucket_reso=1024, bucket_reso_steps=64), **kw)


def write(path: Path, size, caption: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


@pytest.mark.parametrize("size", [(300, 200), (517, 389), (1000, 250), (256, 256), (199, 601)])
def test_buckets_never_crop_a_bucket_step_or_more(tmp_path, size):
    c = cfg(tmp_path)
    write(tmp_path / "1_x" / "a.png", size)
    item = dataset.scan(c).items[0]
    image, (top, left), (h, w) = dataset.load_image(item)
    assert image.size == item.bucket and (h, w) == (size[1], size[0])
    bw, bh = item.bucket
    assert bw % 64 == 0 and bh % 64 == 0
    scale = max(bw / w, bh / h)
    assert round(w * scale) - bw < 64 and round(h * scale) - bh < 64, (item.bucket, size)
    assert top * 2 <= round(h * scale) - bh + 1 and left * 2 <= round(w * scale) - bw + 1  # centred


def test_same_aspect_same_bucket_and_wide_differs_from_tall(tmp_path):
    c = cfg(tmp_path)
    assert dataset.bucket_for((300, 200), c) == dataset.bucket_for((600, 400), c)
    assert dataset.bucket_for((300, 200), c) != dataset.bucket_for((200, 300), c)
    square = replace(c, enable_bucket=False)
    assert dataset.bucket_for((300, 200), square) == (256, 256)


def test_folders_captions_and_warnings(tmp_path):
    write(tmp_path / "3_sks dog" / "a.png", (64, 64), "a dog, grass")
    write(tmp_path / "3_sks dog" / "b.png", (64, 64))  # no caption file: the folder's words
    write(tmp_path / "3_sks dog" / "c.png", (64, 64), "")  # empty caption file: the folder's words too
    write(tmp_path / "d.png", (64, 64))  # in the root: repeats 1, no caption
    write(tmp_path / "other" / "e.png", (64, 64))
    plan = dataset.scan(cfg(tmp_path))
    by = {i.path.name: i for i in plan.items}
    assert (by["a.png"].caption, by["a.png"].caption_source, by["a.png"].repeats) == ("a dog, grass", "file", 3)
    assert (by["b.png"].caption, by["b.png"].caption_source) == ("sks dog", "folder")
    assert by["c.png"].caption_source == "folder"
    assert (by["d.png"].repeats, by["d.png"].caption_source) == (1, "missing")
    assert "e.png" not in by and any("other" in w for w in plan.warnings)
    assert plan.num_train_images == 10
    assert plan.dataset_dirs()["3_sks dog"] == {"n_repeats": 3, "img_count": 3}
    assert plan.tag_frequency()["3_sks dog"] == {"a dog": 1, "grass": 1, "sks dog": 2}


def test_epoch_batches_are_deterministic_one_bucket_each_and_balance_reg(tmp_path):
    for i in range(3):
        write(tmp_path / "data" / "2_x" / f"w{i}.png", (300, 200))
        write(tmp_path / "data" / "2_x" / f"t{i}.png", (200, 300))
    write(tmp_path / "reg" / "1_y" / "r.png", (300, 200))
    plan = dataset.scan(cfg(tmp_path / "data", reg_data_dir=str(tmp_path / "reg")))
    a, b = plan.epoch_batches(4, 0, 7), plan.epoch_batches(4, 0, 7)
    assert a == b and a != plan.epoch_batches(4, 1, 7)
    for batch in a:
        assert len({plan.items[i].bucket for i in batch}) == 1
    counts = Counter(i for batch in a for i in batch)
    assert all(counts[i] == 2 for i, item in enumerate(plan.items) if not item.is_reg)
    reg = sum(c for i, c in counts.items() if plan.items[i].is_reg)
    assert reg == plan.num_train_images  # regularisation entries as many as training entries
    assert plan.steps_per_epoch(4) == len(a)


def test_process_caption_keeps_tokens_shuffles_and_drops():
    rng = random.Random(1)
    text = "sks, dog, grass, sun, tree, red"
    out = dataset.process_caption(text, shuffle=True, keep_tokens=2, dropout_rate=0, rng=rng)
    assert out.startswith("sks, dog, ") and sorted(out.split(", ")) == sorted(text.split(", "))
    assert dataset.process_caption(text, shuffle=False, keep_tokens=0, dropout_rate=0, rng=rng) == text
    dropped = [dataset.process_caption(text, shuffle=False, keep_tokens=0, dropout_rate=0.5,
                                       rng=random.Random(s)) for s in range(200)]
    assert 40 < dropped.count("") < 160


def test_missing_captions_written_never_over_a_file(tmp_path):
    write(tmp_path / "a.png", (64, 64))
    write(tmp_path / "b.png", (64, 64), "mine")
    plan = dataset.scan(cfg(tmp_path))
    written = dataset.write_missing_captions(plan, lambda p: f"caption of {p.stem}", ".txt")
    assert [p.name for p in written] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text().strip() == "caption of a" and (tmp_path / "b.txt").read_text() == "mine"


def test_latent_cache_on_disk_is_reused_and_survives_damage(tmp_path):
    import torch
    write(tmp_path / "data" / "a.png", (64, 64))
    item = dataset.scan(cfg(tmp_path / "data")).items[0]
    key = dataset.latent_key(item, "vae1")
    assert key != dataset.latent_key(item, "vae2")
    cache = dataset.LatentCache(tmp_path / "cache")
    assert cache.get(key) is None
    cache.put(key, torch.ones(4, 8, 8))
    again = dataset.LatentCache(tmp_path / "cache")
    assert torch.equal(again.get(key), torch.ones(4, 8, 8)) and again.hits == 1
    (tmp_path / "cache" / f"{key}.safetensors").write_bytes(b"broken")
    assert dataset.LatentCache(tmp_path / "cache").get(key) is None


def test_errors_name_the_folder(tmp_path):
    with pytest.raises(dataset.DatasetError, match="does not exist"):
        dataset.scan(cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(dataset.DatasetError, match="no images in"):
        dataset.scan(cfg(tmp_path / "empty"))
    write(tmp_path / "one" / "a.png", (64, 64))
    with pytest.raises(dataset.DatasetError, match="larger than the dataset"):
        dataset.scan(cfg(tmp_path / "one")).validate_batch(2)


def test_config_toml_round_trip(tmp_path):
    c = config.from_dict({"pretrained_model_name_or_path": 'my "model"', "train_data_dir": "d", "output_name": "x",
                          "max_train_steps": 5, "learning_rate": 3e-4, "shuffle_caption": True})
    (tmp_path / "c.toml").write_text(c.to_toml())
    again = config.parse_args(["lora", "--config_file", str(tmp_path / "c.toml"), "--max_train_steps", "9"])
    assert again.pretrained_model_name_or_path == 'my "model"' and again.learning_rate == 3e-4
    assert again.shuffle_caption is True and again.max_train_steps == 9  # a flag wins over the file
