"""The Extras service and the upscalers: PIL upscalers against PIL itself, the tiny ESRGAN / Real-ESRGAN files
against a plain PyTorch forward of the same network on the same weights, tiling against no tiling, the
architectures we refuse (and why), saving with A1111's postprocessing infotext, the model manager leases; then
through a real server: /upscalers, /extra-single-image and /extra-batch-images with model upscalers, unknown
names as 400s, and hires fix through a model upscaler.

Tolerances: PIL upscalers are compared exactly (the same PIL calls on the same machine). Float network outputs
are compared within FLOAT_ATOL = 1e-5 (float32 convolutions of a tiny network; summation order is the only
difference); 8-bit results within one level (a float difference on a rounding boundary flips one level).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from modules.core import upscaling
from modules.core.upscaling import (
    ExtrasParams,
    SaveTarget,
    UnknownUpscalerError,
    UpscalerUnavailableError,
)
from modules.demo import tiny_upscalers
from modules.model_store import upscaler_arch, upscalers
from modules.model_store.model_manager import ModelManager
from tests.images import assert_pixels_close, gradient

FLOAT_ATOL = 1e-5


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255).permute(2, 0, 1)[None]


def to_8bit(t: torch.Tensor) -> np.ndarray:
    return (t[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def service(models_dir: Path, **settings) -> tuple[upscalers.Upscalers, ModelManager]:
    manager = ModelManager("cpu", 0, 2**30)
    return upscalers.Upscalers(upscalers.UpscalerRegistry(upscalers.folders_for(models_dir)), lambda: manager,
                               lambda: settings), manager


def small_receptive_field(net: upscaler_arch.RRDBNet) -> upscaler_arch.RRDBNet:
    """Every RRDB made the identity (conv5 of each dense block zero): what is left sees 4 input pixels around."""
    with torch.no_grad():
        for block in net.body:
            for rdb in (block.rdb1, block.rdb2, block.rdb3):
                rdb.conv5.weight.zero_()
                rdb.conv5.bias.zero_()
    return net


# -------------------------------------------------------------------------------------------- PIL upscalers

@pytest.mark.parametrize("scale", [2, 1.5])
def test_lanczos_is_pil_resize(scale):
    """Exact: A1111's rule is PIL's resize by the scale, then Lanczos to the size rounded down to 8."""
    src = gradient()
    out = upscaling.run(src, ExtrasParams(upscaler_1="Lanczos", upscaling_resize=scale))
    w, h = int(src.width * scale), int(src.height * scale)
    expected = src.resize((w, h), Image.Resampling.LANCZOS)
    if (w // 8 * 8, h // 8 * 8) != (w, h):
        expected = expected.resize((w // 8 * 8, h // 8 * 8), Image.Resampling.LANCZOS)
    assert out.size == expected.size
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_pil_upscalers_need_no_models_and_unknown_names_are_named():
    ups, _ = service(Path("/nonexistent"))
    assert ups.names() == ["None", "Lanczos", "Nearest"]
    with pytest.raises(UnknownUpscalerError, match="'R-ESRGAN 4x\\+'"):
        upscaling.validate(ExtrasParams(upscaler_1="R-ESRGAN 4x+"), ups)


# ------------------------------------------------------------------------------------- the tiny model files

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("upscalers")
    tiny_upscalers.make_tiny_upscalers(root)
    return root


def plain_reference(scale: int, tiny_dir: Path) -> torch.nn.Module:
    """The network each tiny file holds, built without any of the loading code: the ESRGAN file's is the maker's
    own network (the file is its weights in the old layout); the Real-ESRGAN file's state dict is loaded
    straight into an RRDBNet of the published x2 shape."""
    if scale == 4:
        return tiny_upscalers.build_tiny_rrdbnet(4)
    net = upscaler_arch.RRDBNet(in_nc=3, out_nc=3, nf=8, nb=1, gc=4, upsamples=2, unshuffle=2)
    state = torch.load(tiny_dir / "RealESRGAN" / "tiny-realesrgan-x2.pth", weights_only=True)["params_ema"]
    net.load_state_dict(state, strict=True)
    return net.eval()


@pytest.mark.parametrize("name, scale", [("tiny-esrgan-4x", 4), ("tiny-realesrgan-x2", 2)])
def test_tiny_file_is_its_network(tiny_dir, name, scale):
    """Loaded through the registry, the network equals the plain forward within FLOAT_ATOL; the upscaled image
    is x4 / x2 and equals the plain forward's 8-bit image within one level."""
    ups, manager = service(tiny_dir, ESRGAN_tile=0)
    info = ups.find(name)
    assert info.folder == ("ESRGAN" if scale == 4 else "RealESRGAN") and info.scale == scale
    src = gradient(36, 28)
    x = to_tensor(src)
    with torch.inference_mode():
        plain = plain_reference(scale, tiny_dir)(x)
        loaded = upscalers.load_upscaler(info)
        assert loaded.scale == scale
        assert torch.allclose(loaded(x), plain, atol=FLOAT_ATOL, rtol=0)
    out = ups.upscale_image(src, name, scale)
    assert out.size == (36 * scale, 28 * scale)
    assert_pixels_close(out, to_8bit(plain))
    assert np.asarray(out).std() > 5  # a picture, not a flat field
    # one lease per use, one load in all, reported under kind "upscaler"
    ups.upscale_image(src, name, scale)
    assert manager.loads(info.key) == 1
    assert [(r["kind"], r["name"], r["pinned"]) for r in manager.report()] == [("upscaler", name, False)]


def test_a1111_scale_rules_for_a_model(tiny_dir):
    """Scale 2 with a 4x model: one pass, Lanczos down to x2; scale 8 with a 2x model: three passes; a scale
    whose size is no multiple of 8 ends at the size rounded down to 8, as A1111's Upscaler.upscale does."""
    ups, _ = service(tiny_dir, ESRGAN_tile=0)
    src = gradient(20, 12)
    x4 = ups.upscale_image(src, "tiny-esrgan-4x", 4)
    assert ups.upscale_image(src, "tiny-esrgan-4x", 2) == x4.resize((40, 24), Image.Resampling.LANCZOS)
    assert ups.upscale_image(src, "tiny-realesrgan-x2", 8).size == (160, 96)
    assert ups.upscale_image(src, "tiny-esrgan-4x", 2.5).size == (48, 24)  # 50x30 rounded down to 8


def test_every_esrgan_key_layout_loads_the_same_network(tmp_path):
    """BasicSR's layout, the original ESRGAN one (`model.N`) and the later `RRDB_trunk` one are one network."""
    net = tiny_upscalers.build_tiny_rrdbnet(4, seed=5, passthrough=False)
    new = {k: v.contiguous() for k, v in net.state_dict().items()}
    old = tiny_upscalers.new_to_old_esrgan(new)
    mid = {k.replace("conv_body", "trunk_conv").replace("body.", "RRDB_trunk.").replace(".rdb", ".RDB")
           .replace("conv_up", "upconv").replace("conv_hr", "HRconv"): v for k, v in new.items()}
    from safetensors.torch import save_file
    (tmp_path / "ESRGAN").mkdir()
    for label, state in (("new", new), ("old", old), ("mid", mid)):
        save_file(state, str(tmp_path / "ESRGAN" / f"{label}.safetensors"))
    ups, _ = service(tmp_path)
    x = to_tensor(gradient(20, 16))
    with torch.inference_mode():
        expected = net(x)
        for label in ("new", "old", "mid"):
            model = upscalers.load_upscaler(ups.find(label))
            assert (model.nf, model.nb, model.gc, model.scale) == (8, 1, 4, 4), label
            assert torch.allclose(model(x), expected, atol=FLOAT_ATOL, rtol=0), label


def test_real_esrgan_compact_model(tmp_path):
    """SRVGGNetCompact (realesr-general-x4v3's network) loads from a Real-ESRGAN .pth (`params`), x4."""
    torch.manual_seed(3)
    net = upscaler_arch.SRVGGNetCompact(nf=8, num_conv=2, scale=4).eval()
    (tmp_path / "RealESRGAN").mkdir()
    torch.save({"params": net.state_dict()}, tmp_path / "RealESRGAN" / "realesr-general-x4v3.pth")
    ups, _ = service(tmp_path, ESRGAN_tile=0)
    src = gradient(20, 16)
    assert ups.upscale_image(src, "realesr-general-x4v3", 4).size == (80, 64)
    assert ups.upscale_image(src, "R-ESRGAN General 4xV3", 4).size == (80, 64)  # A1111's name for the file
    with torch.inference_mode():
        model = upscalers.load_upscaler(ups.find("realesr-general-x4v3"))
        assert isinstance(model, upscaler_arch.SRVGGNetCompact) and model.num_conv == 2
        assert torch.allclose(model(to_tensor(src)), net(to_tensor(src)), atol=FLOAT_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------- tiling

@pytest.mark.parametrize("scale, tile, overlap", [(4, 32, 16), (2, 64, 32)])
def test_tiled_equals_untiled_for_a_small_receptive_field(scale, tile, overlap):
    """A tile's result counts only overlap/4 input pixels or more from a seam edge; a network that sees no
    farther (RRDBs made the identity: 4 input pixels at x4; the x2 network works at half size, so twice that
    in input pixels) gives the untiled result within FLOAT_ATOL, with seams in both directions and a short
    last tile (75 x 101 input)."""
    net = small_receptive_field(tiny_upscalers.build_tiny_rrdbnet(scale, passthrough=False))
    torch.manual_seed(0)
    x = torch.rand(1, 3, 75, 101)
    with torch.inference_mode():
        whole = upscaler_arch.forward_padded(net, x)
        tiled = upscaler_arch.tiled_forward(net, x, tile, overlap)
    assert tiled.shape == whole.shape == (1, 3, 75 * scale, 101 * scale)
    assert (tiled - whole).abs().max() <= FLOAT_ATOL


def test_seams_are_blended():
    """A full network sees farther than any overlap: without overlap the tile edges show (seams of several
    levels), blending over the default 8 pixels makes them far smaller. The weights of tiles sum to 1."""
    net = tiny_upscalers.build_tiny_rrdbnet(4, passthrough=False)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 70, 70)
    with torch.inference_mode():
        whole = upscaler_arch.forward_padded(net, x)
        hard = (upscaler_arch.tiled_forward(net, x, 32, 0) - whole).abs().max()
        blended = (upscaler_arch.tiled_forward(net, x, 32, 8) - whole).abs().max()
    assert hard > 0.01 and blended < hard / 10, (hard, blended)
    length, tile, overlap = 70 * 4, 32 * 4, 8 * 4
    starts = upscaler_arch.tile_starts(length, tile, overlap)
    total = torch.zeros(length, dtype=torch.float64)
    for s in starts:
        e = min(s + tile, length)
        total[s:e] += upscaler_arch.seam_weights(length, s, e, length, overlap)
    assert torch.allclose(total, torch.ones(length, dtype=torch.float64))


def test_tiles_come_from_the_setting(tiny_dir):
    """ESRGAN_tile 16 / overlap 8 on a 40x24 image: more than one tile (each a progress step of the job)."""
    steps = []

    class Job:
        def step(self, done, total):
            steps.append((done, total))

    ups, _ = service(tiny_dir, ESRGAN_tile=16, ESRGAN_tile_overlap=8)
    ups.upscale_image(gradient(), "tiny-esrgan-4x", 4, job=Job())
    assert steps[-1][0] == steps[-1][1] > 1


# ---------------------------------------------------------------------------------- what cannot be used

def test_swinir_and_dat_are_listed_but_refused_with_the_reason(tmp_path):
    swinir = {"layers.0.residual_group.blocks.0.attn.relative_position_bias_table": torch.zeros(4, 2),
              "conv_first.weight": torch.zeros(8, 3, 3, 3)}
    from safetensors.torch import save_file
    for folder, name, state in (("SwinIR", "SwinIR_4x", swinir), ("DAT", "DAT_x4", {"before_RG.1.weight": torch.zeros(2)}),
                                ("ESRGAN", "misplaced-swinir", swinir)):
        (tmp_path / folder).mkdir(exist_ok=True)
        save_file(state, str(tmp_path / folder / f"{name}.safetensors"))
    (tmp_path / "ESRGAN" / "broken.pth").write_bytes(b"not a model")
    torch.save({"model": NotATensor()}, tmp_path / "ESRGAN" / "unsafe.pth")
    ups, _ = service(tmp_path)
    assert ups.names() == ["None", "Lanczos", "Nearest", "broken", "misplaced-swinir", "unsafe", "SwinIR_4x",
                           "DAT_x4"]
    for name in ("SwinIR_4x", "DAT_x4"):
        assert "spandrel" in ups.problem(name) and "torchvision" in ups.problem(name)
        with pytest.raises(UpscalerUnavailableError, match="torchvision"):
            upscaling.validate(ExtrasParams(upscaler_1=name), ups)
    # an ESRGAN-folder file is read to know: a SwinIR is named as one, a broken file says it cannot be read
    with pytest.raises(UpscalerUnavailableError, match="a SwinIR model"):
        ups.upscale_image(gradient(), "misplaced-swinir", 2)
    with pytest.raises(UpscalerUnavailableError, match="cannot be read"):
        ups.upscale_image(gradient(), "broken", 2)
    with pytest.raises(UpscalerUnavailableError, match="refused: a pickle holding more than tensors"):
        ups.upscale_image(gradient(), "unsafe", 2)  # safe loading only: its class is never built
    # ...and remembered, so the next request is refused before it is queued
    assert "a SwinIR model" in ups.problem("misplaced-swinir")
    with pytest.raises(UpscalerUnavailableError):
        upscaling.validate(ExtrasParams(upscaler_1="broken"), ups)
    upscaling.validate(ExtrasParams(upscaler_1="Lanczos", upscaler_2="broken"), ups)  # visibility 0: unused


class NotATensor:
    """What a malicious pickle would build (it never is: upscaler pickles load with weights_only)."""


# ------------------------------------------------------------------------------------------------- saving

def test_extras_job_saves_with_the_postprocessing_infotext(tiny_dir, tmp_path):
    """As A1111: outputs/extras-images/NNNNN.png with an `extras` chunk "Postprocess upscale by: 2,
    Postprocess upscaler: ...", the source's own `parameters` kept; a batch keeps its file names."""
    ups, _ = service(tiny_dir, ESRGAN_tile=0)
    src = gradient()
    src.info["parameters"] = "a cat\nSteps: 3, Sampler: Euler, Seed: 1"
    params = ExtrasParams(upscaler_1="tiny-esrgan-4x", upscaling_resize=2, upscaler_2="Lanczos",
                          extras_upscaler_2_visibility=0.25)
    folder = tmp_path / "extras-images"
    res = upscaling.run_extras([(src, None), (src, None)], params, ups, save=SaveTarget(folder))
    assert [p.name for p in res.paths] == ["00000.png", "00001.png"]
    text = "Postprocess upscale by: 2, Postprocess upscaler: tiny-esrgan-4x, Postprocess upscaler 2: Lanczos"
    assert res.infotexts == [text, text] and res.html_info == f"<p>{text}</p>"
    with Image.open(res.paths[0]) as im:
        assert im.size == (80, 48)
        assert im.info["extras"] == text and im.info["parameters"] == src.info["parameters"]
    files = tmp_path / "in"
    files.mkdir()
    gradient().save(files / "photo.png")
    res = upscaling.run_extras([(files / "photo.png", "photo.png")], ExtrasParams(upscaler_1="Nearest", resize_mode=1,
                               upscaling_resize_w=64, upscaling_resize_h=64), ups,
                               save=SaveTarget(tmp_path / "out", keep_names=True), keep_images=False)
    assert res.images == [] and [p.name for p in res.paths] == ["photo.png"]
    with Image.open(res.paths[0]) as im:
        assert im.size == (64, 64)
        assert im.info["extras"] == ("Postprocess upscale to: 64x64, Postprocess crop to fit: True, "
                                     "Postprocess upscaler: Nearest")


# ------------------------------------------------------------------------------------- through the server

def test_upscalers_route_lists_the_model_files(api):
    r = api.get(api.base + "/upscalers")
    assert r.status_code == 200, r.text
    items = {u["name"]: u for u in r.json()}
    assert list(items) == ["None", "Lanczos", "Nearest", "tiny-esrgan-4x", "tiny-realesrgan-x2"]
    assert items["tiny-esrgan-4x"]["scale"] == 4 and items["tiny-realesrgan-x2"]["scale"] == 2
    assert items["tiny-esrgan-4x"]["model_path"].endswith("ESRGAN/tiny-esrgan-4x.safetensors")
    assert set(items["None"]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert [m["name"] for m in api.get(api.base + "/realesrgan-models").json()] == ["tiny-realesrgan-x2"]


def test_extra_single_image_with_a_model_upscaler(api, tiny_models):
    """The answer is the in-process upscale of the same file with the server's default tiling (192/8), through
    the queue (X-Task-Id), with A1111's html_info and a `postprocessing` chunk."""
    src = gradient()
    r = api.post(api.base + "/extra-single-image",
                 json={"image": png_b64(src), "upscaler_1": "tiny-esrgan-4x", "upscaling_resize": 4})
    assert r.status_code == 200, r.text
    assert r.headers.get("X-Task-Id")
    out = b64_image(r.json()["image"])
    assert out.size == (160, 96)
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 4, Postprocess upscaler: tiny-esrgan-4x</p>"
    assert out.info["postprocessing"] == "Postprocess upscale by: 4, Postprocess upscaler: tiny-esrgan-4x"
    ups, _ = service(tiny_models)
    assert_pixels_close(out.convert("RGB"), ups.upscale_image(src, "tiny-esrgan-4x", 4))


def test_extra_batch_images_with_model_upscalers(api):
    src = gradient()
    r = api.post(api.base + "/extra-batch-images",
                 json={"imageList": [{"data": png_b64(src), "name": "a.png"},
                                     {"data": png_b64(src.rotate(90, expand=True)), "name": "b.png"}],
                       "upscaler_1": "tiny-realesrgan-x2", "upscaling_resize": 2, "upscaler_2": "tiny-esrgan-4x",
                       "extras_upscaler_2_visibility": 0.5})
    assert r.status_code == 200, r.text
    assert [b64_image(x).size for x in r.json()["images"]] == [(80, 48), (48, 80)]
    assert api.post(api.base + "/extra-batch-images", json={"imageList": []}).json()["images"] == []


def test_unknown_upscalers_are_400s_naming_them(api):
    src = png_b64(gradient())
    for fields in ({"upscaler_1": "4x-UltraSharp"}, {"upscaler_1": "Lanczos", "upscaler_2": "4x-UltraSharp"}):
        r = api.post(api.base + "/extra-single-image", json={"image": src, **fields})
        assert r.status_code == 400 and "'4x-UltraSharp'" in r.json()["detail"], r.text
        assert "tiny-esrgan-4x" in r.json()["detail"]  # the names that do exist
    r = api.post(api.base + "/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                              "enable_hr": True, "hr_upscaler": "4x-UltraSharp"})
    assert r.status_code == 400 and "'4x-UltraSharp'" in r.json()["detail"], r.text


@pytest.mark.parametrize("denoise", [0, 0.5])
def test_hires_fix_through_a_model_upscaler(api, denoise):
    """txt2img 64x64 with hires fix x2 through the tiny ESRGAN: a 128x128 image, the upscaler in the infotext
    (denoising strength 0: the model's upscale alone)."""
    r = api.post(api.base + "/txt2img", json={
        "prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 3, "enable_hr": True,
        "hr_upscaler": "tiny-esrgan-4x", "hr_scale": 2, "denoising_strength": denoise, "hr_second_pass_steps": 1,
        "save_images": False})
    assert r.status_code == 200, r.text
    image = b64_image(r.json()["images"][0])
    assert image.size == (128, 128)
    assert "Hires upscaler: tiny-esrgan-4x" in r.json()["info"]


def test_tiling_settings_are_settings(api):
    opts = api.get(api.base + "/options").json()
    assert (opts["ESRGAN_tile"], opts["ESRGAN_tile_overlap"]) == (192, 8)


def test_the_extras_tab_is_served(api_server):
    page = requests.get(api_server.url + "/", timeout=30).text
    assert "tab_extras" in page and "extras_upscaler_1" in page
