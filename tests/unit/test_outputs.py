"""Saved files get A1111's names, appear atomically, never overwrite; grids and base64 behave."""
from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib
from datetime import date
from pathlib import Path

import pytest
from PIL import Image

from modules.core import outputs
from modules.core.infotext import parse_infotext, read_image_infotext
from modules.core.outputs import (
    InvalidImageError,
    decode_image_base64,
    encode_image_base64,
    make_grid,
    save_image,
)

INFOTEXT = "a cat, 日本語: ✓\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 1234, Size: 16x8"


def _image(color="red", size=(16, 8), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --- folders and counters --------------------------------------------------------------------------


def test_dated_folder(tmp_path):
    assert outputs.dated_folder(tmp_path, "txt2img-images", date(2024, 5, 1)) == tmp_path / "txt2img-images" / "2024-05-01"
    assert outputs.dated_folder(tmp_path, "img2img-grids").parent == tmp_path / "img2img-grids"
    assert outputs.dated_folder(tmp_path, "img2img-grids").name == date.today().isoformat()
    for bad in ("../up", "a/b", "", ".hidden", "x\\y"):
        with pytest.raises(ValueError):
            outputs.dated_folder(tmp_path, bad)


def test_next_sequence_number(tmp_path):
    assert outputs.next_sequence_number(tmp_path / "missing") == 0
    assert outputs.next_sequence_number(tmp_path) == 0
    for name in ("00005-1-a.png", "00012-2-b.jpg", "notes.txt", ".abc.tmp", "x-00099.png"):
        (tmp_path / name).write_bytes(b"")
    assert outputs.next_sequence_number(tmp_path) == 13


def test_first_save_names_and_counts_up(tmp_path):
    first = save_image(_image(), tmp_path, seed=1234, prompt="a cat", infotext=INFOTEXT)
    second = save_image(_image(), tmp_path, seed=1235, prompt="a cat", infotext=INFOTEXT)
    assert first.name == "00000-1234-a cat.png"
    assert second.name == "00001-1235-a cat.png"


def test_counter_continues_after_the_highest(tmp_path):
    (tmp_path / "00005-1-a.png").write_bytes(b"x")
    (tmp_path / "00012-2-b.png").write_bytes(b"y")
    saved = save_image(_image(), tmp_path, seed=7, prompt="next", infotext=None)
    assert saved.name == "00013-7-next.png"


def test_missing_folders_are_created(tmp_path):
    folder = outputs.dated_folder(tmp_path / "outputs", "txt2img-images", date(2024, 1, 2))
    saved = save_image(_image(), folder, seed=1, prompt="p", infotext=None)
    assert saved.parent == folder and saved.is_file()


# --- awkward prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("(masterpiece:1.2), a <lora:x:0.8> cat?", "00000-5-(masterpiece_1.2), a _lora_x_0.8_ cat.png"),
        ("line one\nline\ttwo   spaced", "00000-5-line one line two spaced.png"),
        ('a/b\\c|d*e"f#g', "00000-5-a_b_c_d_e_f_g.png"),
        ("ends with dots...", "00000-5-ends with dots.png"),
        ("   leading spaces", "00000-5-leading spaces.png"),
        ("", "00000-5.png"),
        ("bell\x07char", "00000-5-bellchar.png"),
        ("日本語の猫", "00000-5-日本語の猫.png"),
    ],
)
def test_awkward_prompts_make_safe_names(tmp_path, prompt, expected):
    saved = save_image(_image(), tmp_path, seed=5, prompt=prompt, infotext=None)
    assert saved.name == expected
    assert saved.is_file()


def test_long_prompts_are_cut_at_a_word_end(tmp_path):
    prompt = " ".join(f"word{i:03d}" for i in range(100))
    saved = save_image(_image(), tmp_path, seed=123456789, prompt=prompt, infotext=None)
    name = saved.name
    assert len(name) <= outputs.MAX_FILENAME_CHARS
    assert name.startswith("00000-123456789-word000 word001")
    stem = name[: -len(".png")]
    assert stem.split(" ")[-1].startswith("word") and len(stem.split(" ")[-1]) == 7  # a whole word


def test_long_unicode_prompts_stay_within_the_byte_limit(tmp_path):
    prompt = "猫" * 300
    saved = save_image(_image(), tmp_path, seed=1, prompt=prompt, infotext=None)
    assert len(saved.name.encode("utf-8")) <= outputs.MAX_FILENAME_BYTES
    assert saved.name.startswith("00000-1-猫")


def test_patterns(tmp_path):
    saved = save_image(_image(), tmp_path, seed=9, prompt="a big, red cat!", infotext=None, pattern="[prompt]-[seed]")
    assert saved.name == "00000-a_big,_red_cat!-9.png"
    words = save_image(_image(), tmp_path, seed=9, prompt="a big, red cat!", infotext=None, pattern="[prompt_words]")
    assert words.name == "00001-a big red cat.png"
    dated = save_image(_image(), tmp_path, seed=9, prompt="p", infotext=None, pattern="[date]-[unknown]")
    assert dated.name == f"00002-{date.today().isoformat()}-[unknown].png"


# --- infotext inside the files ---------------------------------------------------------------------


@pytest.mark.parametrize("extension", ["png", "jpg", "jpeg", "webp"])
def test_infotext_reads_back_from_each_format(tmp_path, extension):
    saved = save_image(_image(), tmp_path, seed=1234, prompt="a cat", infotext=INFOTEXT, extension=extension)
    assert saved.suffix == f".{extension}"
    with Image.open(saved) as reopened:
        assert reopened.format == outputs.image_format(extension)
        assert reopened.size == (16, 8)
        assert read_image_infotext(reopened) == INFOTEXT
    assert parse_infotext(INFOTEXT)["Prompt"] == "a cat, 日本語: ✓"


def test_no_infotext_means_none_written(tmp_path):
    saved = save_image(_image(), tmp_path, seed=1, prompt="p", infotext=None)
    with Image.open(saved) as reopened:
        assert read_image_infotext(reopened) is None


def test_rgba_images_save_as_jpeg_and_webp(tmp_path):
    rgba = _image((255, 0, 0, 128), mode="RGBA")
    jpg = save_image(rgba, tmp_path, seed=1, prompt="p", infotext=INFOTEXT, extension="jpg")
    webp = save_image(rgba, tmp_path, seed=1, prompt="p", infotext=INFOTEXT, extension="webp")
    with Image.open(jpg) as a, Image.open(webp) as b:
        assert a.mode == "RGB" and b.mode == "RGBA"


def test_jpeg_quality_is_used(tmp_path):
    noisy = Image.effect_noise((128, 128), 64).convert("RGB")
    low = save_image(noisy, tmp_path, seed=1, prompt="p", infotext=None, extension="jpg", jpeg_quality=10)
    high = save_image(noisy, tmp_path, seed=1, prompt="p", infotext=None, extension="jpg", jpeg_quality=95)
    assert low.stat().st_size < high.stat().st_size


def test_an_infotext_too_long_for_jpeg_is_shortened_not_fatal(tmp_path):
    huge = "x" * 40_000
    saved = save_image(_image(), tmp_path, seed=1, prompt="p", infotext=huge, extension="jpg")
    with Image.open(saved) as reopened:
        text = read_image_infotext(reopened)
    assert text and huge.startswith(text) and len(text) > 30_000


def test_unknown_extension_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unsupported image format"):
        save_image(_image(), tmp_path, seed=1, prompt="p", infotext=None, extension="bmp")
    assert _names(tmp_path) == []


# --- atomicity and concurrency ---------------------------------------------------------------------


def test_no_temp_files_are_left(tmp_path):
    for i in range(3):
        save_image(_image(), tmp_path, seed=i, prompt="p", infotext=INFOTEXT)
    assert all(not name.startswith(".") for name in _names(tmp_path))
    assert len(_names(tmp_path)) == 3


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_image(_image(), tmp_path, seed=1, prompt="p", infotext=None)
    assert _names(tmp_path) == []


def test_an_existing_file_is_never_overwritten(tmp_path, monkeypatch):
    existing = tmp_path / "00000-1-p.png"
    existing.write_bytes(b"precious")
    # Pretend the counter scan missed it, as it would if another process created it just now.
    monkeypatch.setattr(outputs, "next_sequence_number", lambda folder: 0)
    saved = save_image(_image(), tmp_path, seed=1, prompt="p", infotext=None)
    assert saved.name == "00001-1-p.png"
    assert existing.read_bytes() == b"precious"


def test_without_hard_links_the_fallback_still_never_overwrites(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(95, "Operation not supported")

    existing = tmp_path / "00000-1-p.png"
    existing.write_bytes(b"precious")
    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(outputs, "next_sequence_number", lambda folder: 0)
    saved = save_image(_image(), tmp_path, seed=1, prompt="p", infotext=INFOTEXT)
    assert saved.name == "00001-1-p.png"
    assert existing.read_bytes() == b"precious"
    with Image.open(saved) as reopened:
        assert read_image_infotext(reopened) == INFOTEXT
    assert len(_names(tmp_path)) == 2


def test_concurrent_saves_get_distinct_numbers(tmp_path):
    threads_count, per_thread = 6, 5
    results: list[Path] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads_count)

    def worker(index: int):
        try:
            start.wait()
            for j in range(per_thread):
                results.append(save_image(_image(), tmp_path, seed=index * 100 + j, prompt="same prompt", infotext=INFOTEXT))
        except BaseException as exc:  # surfaced below; a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    total = threads_count * per_thread
    assert len(results) == total == len(set(results))
    counters = sorted(int(path.name[:5]) for path in results)
    assert counters == list(range(total))
    assert sorted(p.name for p in results) == _names(tmp_path)
    for path in results:
        with Image.open(path) as reopened:
            assert read_image_infotext(reopened) == INFOTEXT


# --- grids -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "shape"),
    [(1, (1, 1)), (2, (1, 2)), (3, (2, 2)), (4, (2, 2)), (5, (2, 3)), (6, (2, 3)), (7, (3, 3)), (8, (3, 3)), (9, (3, 3)), (10, (3, 4)), (16, (4, 4))],
)
def test_grid_shape_matches_a1111_defaults(count, shape):
    assert outputs.grid_shape(count) == shape
    rows, cols = shape
    grid = make_grid([_image(size=(10, 6)) for _ in range(count)])
    assert grid.size == (cols * 10, rows * 6)


def test_grid_rows_can_be_given():
    assert outputs.grid_shape(6, rows=1) == (1, 6)
    assert outputs.grid_shape(6, rows=3) == (3, 2)
    assert outputs.grid_shape(2, rows=5) == (2, 1)
    assert make_grid([_image(size=(4, 4))] * 6, rows=3).size == (8, 12)


def test_grid_blank_cells_are_black_and_images_in_order():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    grid = make_grid([_image(c, size=(4, 4)) for c in colors])
    assert grid.mode == "RGB" and grid.size == (8, 8)
    assert grid.getpixel((1, 1)) == colors[0]
    assert grid.getpixel((5, 1)) == colors[1]
    assert grid.getpixel((1, 5)) == colors[2]
    assert grid.getpixel((5, 5)) == (0, 0, 0)
    assert make_grid([_image(size=(4, 4))] * 3, background="#ffffff").getpixel((5, 5)) == (255, 255, 255)


def test_grid_centres_smaller_images():
    grid = make_grid([_image("red", size=(8, 8)), _image("blue", size=(4, 4))])
    assert grid.size == (16, 8)
    assert grid.getpixel((9, 1)) == (0, 0, 0)
    assert grid.getpixel((12, 4)) == (0, 0, 255)


def test_empty_grid_is_an_error():
    with pytest.raises(ValueError):
        make_grid([])


# --- base64 ----------------------------------------------------------------------------------------


def test_base64_round_trip_keeps_pixels_and_infotext():
    original = Image.effect_noise((32, 24), 50).convert("RGB")
    encoded = encode_image_base64(original, infotext=INFOTEXT)
    assert not encoded.startswith("data:")
    decoded = decode_image_base64(encoded)
    assert decoded.size == (32, 24)
    assert list(decoded.getdata()) == list(original.getdata())
    assert read_image_infotext(decoded) == INFOTEXT
    assert read_image_infotext(decode_image_base64(encode_image_base64(original))) is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "jpg"])
def test_base64_other_formats_carry_infotext(fmt):
    decoded = decode_image_base64(encode_image_base64(_image(), fmt=fmt, infotext=INFOTEXT))
    assert read_image_infotext(decoded) == INFOTEXT


def test_decode_accepts_data_uris_whitespace_urlsafe_and_missing_padding():
    encoded = encode_image_base64(_image("blue", size=(5, 3)))
    raw = base64.b64decode(encoded)
    variants = [
        f"data:image/png;base64,{encoded}",
        "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60)),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        encoded.encode("ascii"),
        f"  {encoded}  ",
    ]
    for variant in variants:
        image = decode_image_base64(variant)
        assert image.size == (5, 3) and image.getpixel((0, 0)) == (0, 0, 255)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 10)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("not base64 at all!!", "not valid base64"),
        ("data:image/png,abcd", "not base64-encoded"),
        ("data:image/png;base64", "no ','"),
        (base64.b64encode(b"hello, this is plain text not an image").decode(), "not an image"),
        (base64.b64encode(_png_header_only(7000, 7000)).decode(), "megapixels"),
        (base64.b64encode(_png_header_only(30000, 30000)).decode(), "too large"),
        (base64.b64encode(_png_header_only(64, 64)).decode(), "truncated or corrupt"),
    ],
)
def test_bad_images_raise_readable_errors(data, message):
    with pytest.raises(InvalidImageError, match=message):
        decode_image_base64(data)


def test_pixel_limit_is_configurable_and_errors_are_value_errors():
    encoded = encode_image_base64(_image(size=(100, 100)))
    with pytest.raises(ValueError, match="100x100"):
        decode_image_base64(encoded, max_pixels=5_000)
    assert decode_image_base64(encoded, max_pixels=10_000).size == (100, 100)


def test_truncated_real_png_is_rejected():
    raw = base64.b64decode(encode_image_base64(Image.effect_noise((64, 64), 80).convert("RGB")))
    cut = base64.b64encode(raw[: len(raw) // 2]).decode()
    with pytest.raises(InvalidImageError):
        decode_image_base64(cut)


def test_encode_image_bytes_match_the_format():
    assert outputs.encode_image(_image(), "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs.encode_image(_image(), "JPEG")[:2] == b"\xff\xd8"
    assert outputs.encode_image(_image(), "webp")[8:12] == b"WEBP"
    with Image.open(io.BytesIO(outputs.encode_image(_image(mode="L"), "jpg"))) as grey:
        assert grey.mode == "L"
