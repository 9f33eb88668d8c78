"""The Script API through a real server: /scripts and /script-info, X/Y/Z plot (A1111's positional args, ranges,
labels or indices, values checked first, checkpoints loaded once, timing table), prompt matrix, prompts from
file (a bad line names its number), loopback, always-on scripts, and script errors as 4xx answers."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from modules.scripting import xyz
from tests.images import assert_pixels_close

SMALL = {"prompt": "a red house", "steps": 2, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}


def xyz_args(x_type, x_values, y_type="Nothing", y_values="", z_type="Nothing", z_values="", **flags):
    """X/Y/Z plot's script_args in A1111's order (18 of them)."""
    f = dict(draw_legend=True, include_lone_images=False, include_sub_grids=False, no_fixed_seeds=False,
             vary_seeds_x=False, vary_seeds_y=False, vary_seeds_z=False, margin_size=0, csv_mode=False)
    f.update(flags)
    return [x_type, x_values, [], y_type, y_values, [], z_type, z_values, []] + list(f.values())


def unb64(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def post(api, path="/txt2img", **body):
    r = api.post(api.base + path, json={**SMALL, **body})
    assert r.status_code == 200, r.text
    out = r.json()
    return out, json.loads(out["info"])


# -- value parsing (A1111's ranges) ----------------------------------------------------------------------------

@pytest.mark.parametrize("label, text, expected", [
    ("Steps", "1-5", [1, 2, 3, 4, 5]),
    ("Steps", "1-10 (+2)", [1, 3, 5, 7, 9]),
    ("Steps", "10-1 (-3)", [10, 7, 4]),
    ("Steps", "1-9 [3]", [1, 5, 9]),
    ("Steps", "3, 8, 12", [3, 8, 12]),
    ("CFG Scale", "0-1 [5]", [0.0, 0.25, 0.5, 0.75, 1.0]),
    ("CFG Scale", "1-2 (+0.5)", [1.0, 1.5, 2.0]),
    ("Sampler", 'Euler a, "DPM++ 2M"', ["Euler a", "DPM++ 2M"]),
])
def test_axis_values_follow_a1111_ranges(label, text, expected):
    axis = xyz.find_axis(xyz.axes_for(False), label)
    assert xyz.parse_values(axis, text) == expected


def test_axes_keep_a1111_indices_per_tab_and_accept_labels():
    t2i, i2i = xyz.axes_for(False), xyz.axes_for(True)
    assert [a.label for a in t2i[:12]] == ["Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps",
                                           "CFG Scale", "Prompt S/R", "Prompt order", "Sampler", "Hires sampler",
                                           "Checkpoint name"]
    assert "Hires steps" not in [a.label for a in i2i] and "Denoising" in [a.label for a in i2i]
    assert xyz.find_axis(t2i, 4) is xyz.find_axis(t2i, "steps") is xyz.find_axis(t2i, "4")
    with pytest.raises(xyz.AxisError, match="Warp speed"):
        xyz.find_axis(t2i, "Warp speed")
    with pytest.raises(xyz.AxisError, match="not a whole number"):
        xyz.parse_values(xyz.find_axis(t2i, "Steps"), "3, lots")


# -- the lists clients read ------------------------------------------------------------------------------------

def test_scripts_and_script_info_list_every_builtin_in_a1111_shape(api):
    scripts = api.get(api.base + "/scripts").json()
    for title in ("x/y/z plot", "prompt matrix", "prompts from file or textbox"):
        assert title in scripts["txt2img"] and title in scripts["img2img"]
    for title in ("sd upscale", "loopback", "outpainting mk2", "poor man's outpainting"):
        assert title in scripts["img2img"] and title not in scripts["txt2img"]
    info = api.get(api.base + "/script-info").json()
    plot = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    assert plot["is_alwayson"] is False and len(plot["args"]) == 18
    labels = [a["label"] for a in plot["args"]]
    assert labels[:3] == ["X type", "X values", "X values"] and labels[-1] == "Use text inputs instead of dropdowns"
    assert "Checkpoint name" in plot["args"][0]["choices"] and plot["args"][0]["value"] == "Seed"
    upscale = next(s for s in info if s["name"] == "sd upscale")
    assert [a["label"] for a in upscale["args"]][1:] == ["Tile overlap", "Upscaler", "Scale Factor"]


# -- X/Y/Z plot ------------------------------------------------------------------------------------------------

def test_xyz_plot_makes_a_labelled_grid_whose_cells_are_the_plain_images(api):
    out, info = post(api, script_name="X/Y/Z plot",
                     script_args=xyz_args("Steps", "1-2", "Sampler", "Euler, DDIM", include_lone_images=True))
    assert info["index_of_first_image"] == 1 and len(out["images"]) == 5
    grid, cells = unb64(out["images"][0]), [unb64(t) for t in out["images"][1:]]
    assert all(c.size == (64, 64) for c in cells)
    # two columns and two rows of cells, plus the legends' margins above and to the left
    assert grid.width > 128 and grid.height > 128
    a = np.asarray(grid.convert("L"), np.int16)
    top = a[: grid.height - 128, grid.width - 128:]
    assert (top < 128).any() and (top > 250).mean() > 0.5, "a legend: dark text on the white margin"
    # each cell is the image a plain request with that cell's values gives (same process, same seed)
    plain, _ = post(api, steps=2, sampler_name="DDIM")
    assert_pixels_close(cells[3], unb64(plain["images"][0]), levels=1)
    texts = info["infotexts"]
    assert "Steps: 2" in texts[4] and "Sampler: DDIM" in texts[4] and "Seed: 11" in texts[4]
    assert [r["x"] for r in info["xyz_timing"]] == ["Steps: 1", "Steps: 2", "Steps: 1", "Steps: 2"]
    assert all(r["seconds_per_image"] > 0 and r["peak_memory_mb"] > 0 for r in info["xyz_timing"])


def test_xyz_axis_types_by_index_equal_by_label(api):
    by_label, _ = post(api, script_name="x/y/z plot", script_args=xyz_args("CFG Scale", "3, 9"))
    by_index, _ = post(api, script_name="x/y/z plot", script_args=xyz_args(6, "3, 9"))
    assert_pixels_close(unb64(by_label["images"][0]), unb64(by_index["images"][0]), levels=1)


def test_xyz_z_axis_gives_sub_grids_and_prompt_sr_replaces_text(api):
    out, info = post(api, script_name="X/Y/Z plot", script_args=xyz_args(
        "Prompt S/R", "red, blue", "Nothing", "", "Seed", "1, 2", include_sub_grids=True, include_lone_images=True))
    assert info["index_of_first_image"] == 3  # the main grid, then one sub-grid per Z value
    prompts = [t.split("\n")[0] for t in info["infotexts"][3:]]
    assert prompts == ["a red house", "a blue house", "a red house", "a blue house"]


@pytest.mark.parametrize("args, words", [
    (xyz_args("Sampler", "Euler, Warp Drive"), "Unknown sampler: Warp Drive"),
    (xyz_args("Checkpoint name", "no-such-model"), "Unknown checkpoint: no-such-model"),
    (xyz_args("Prompt S/R", "purple, green"), "did not find purple"),
    (xyz_args("Steps", "2, many"), "not a whole number"),
    (xyz_args("Sigma Churn", "0.5"), "not available"),
    (xyz_args("Size", "64x64, big"), "WIDTHxHEIGHT"),
    (xyz_args(99, "1"), "out of range"),
])
def test_xyz_bad_values_are_refused_before_any_image(api, api_server, args, words):
    folder = api_server.data_dir / "outputs"
    before = set(folder.rglob("*.png"))
    r = api.post(api.base + "/txt2img", json={**SMALL, "save_images": True, "script_name": "X/Y/Z plot",
                                              "script_args": args})
    assert r.status_code == 422, r.text
    assert words in r.json()["detail"] and "X/Y/Z plot" in r.json()["detail"]
    assert set(folder.rglob("*.png")) == before


def _loads(api) -> dict[str, int]:
    return {m["name"]: m["loads"] for m in api.get(api.base + "/memory").json()["models"] if m["kind"] == "checkpoint"}


def test_xyz_checkpoint_axis_loads_each_checkpoint_once_and_writes_the_timing_table(api, api_server):
    names = [m["model_name"] for m in api.get(api.base + "/sd-models").json()]
    picked = [n for n in names if n in ("tiny-sd15", "tiny-sd15-inpainting")]
    assert len(picked) == 2
    before = _loads(api)
    out, info = post(api, save_images=True, override_settings={"xyz_record_timing": True},
                     script_name="X/Y/Z plot",
                     script_args=xyz_args("Seed", "1, 2, 3", "Checkpoint name", ", ".join(picked)))
    after = _loads(api)
    for key, count in after.items():
        if any(n in key for n in picked):
            assert count - before.get(key, 0) <= 1, (key, before, after)
    # the checkpoint (the costlier axis) varies slowest: all cells of one, then all of the other
    order = [r["y"] for r in info["xyz_timing"]]
    assert order == [picked[0]] * 3 + [picked[1]] * 3
    tables = sorted((api_server.data_dir / "outputs" / "txt2img-grids").rglob("*.json"), key=lambda p: p.stat().st_mtime)
    grid = tables[-1].with_suffix(".png")  # the grid, with its table beside it under the same name
    assert Image.open(grid).width > 3 * 64 and "Seed: 1" in Image.open(grid).info["parameters"]
    assert [r["y"] for r in json.loads(tables[-1].read_text())] == order
    assert grid.with_suffix(".csv").read_text().startswith("x,y,z,images,seconds")
    assert "Model: " in info["infotexts"][0]


# -- the other built-ins ---------------------------------------------------------------------------------------

def test_prompt_matrix_makes_every_combination_and_a_grid(api):
    out, info = post(api, prompt="a house|red|at night", script_name="Prompt matrix",
                     script_args=[False, False, "positive", "comma", 0])
    assert info["index_of_first_image"] == 1 and len(out["images"]) == 5
    assert info["all_prompts"] == ["a house", "a house, red", "a house, at night", "a house, red, at night"]
    assert len(set(info["all_seeds"])) == 1  # one seed unless "different seeds" is on
    grid = unb64(out["images"][0])
    assert grid.width >= 128 and grid.height > 128


def test_prompts_from_file_runs_each_line_with_its_options(api):
    text = 'a cat\n--prompt "a dog" --steps 3 --seed 5 --cfg_scale 4 --sampler_name "DDIM" --width 64 --height 64\n'
    out, info = post(api, prompt="", script_name="Prompts from file or textbox", script_args=[False, False, "start", text])
    assert len(out["images"]) == 2
    first, second = info["infotexts"]
    assert first.startswith("a cat") and second.startswith("a dog")
    assert "Steps: 3" in second and "Seed: 5" in second and "Sampler: DDIM" in second and "CFG scale: 4" in second


def test_prompts_from_file_reports_a_bad_line_by_number(api):
    text = "a cat\n--prompt \"a dog\" --stepz 3\n--steps lots\n"
    r = api.post(api.base + "/txt2img", json={**SMALL, "script_name": "Prompts from file or textbox",
                                              "script_args": [False, False, "start", text]})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "line 2: unknown option --stepz" in detail and "line 3: --steps" in detail


def _picture(w=64, h=64) -> str:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 2] = np.linspace(0, 255, h)[:, None]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_loopback_feeds_each_output_back_and_answers_a_grid(api):
    out, info = post(api, "/img2img", init_images=[_picture()], denoising_strength=0.6, script_name="Loopback",
                     script_args=[3, 0.2, "Linear", "None"])
    assert info["index_of_first_image"] == 1 and len(out["images"]) == 4
    assert unb64(out["images"][0]).size == (192, 64)  # the three loops side by side
    strengths = [float(t.split("Denoising strength: ")[1].split(",")[0]) for t in info["infotexts"][1:]]
    assert strengths == pytest.approx([0.6, 0.4, 0.2])
    assert "Denoising curve: Linear" in info["infotexts"][1]


def test_script_errors_are_4xx_naming_the_script(api):
    r = api.post(api.base + "/txt2img", json={**SMALL, "script_name": "Loopback"})
    assert r.status_code == 400 and "unknown script 'Loopback' for txt2img" in r.json()["detail"]
    r = api.post(api.base + "/txt2img", json={**SMALL, "script_name": "Prompt matrix", "script_args": [1, 2, 3, 4, 5, 6]})
    assert r.status_code == 422 and "takes 5 arguments" in r.json()["detail"]
    r = api.post(api.base + "/txt2img", json={**SMALL, "alwayson_scripts": {"No such thing": {"args": []}}})
    assert r.status_code == 400 and "unknown alwayson script" in r.json()["detail"]
    r = api.post(api.base + "/txt2img", json={**SMALL, "script_name": "Prompt matrix",
                                              "script_args": [False, False, "sideways", "comma", 0]})
    assert r.status_code == 422 and "prompt_type" in r.json()["detail"]
    assert api.post(api.base + "/txt2img", json=SMALL).status_code == 200  # and the worker still serves


def test_sd_upscale_upscales_then_redraws_tiles_blended(api):
    out, info = post(api, "/img2img", init_images=[_picture()], denoising_strength=0.3, width=64, height=64,
                     script_name="SD upscale", script_args=["", 16, "Lanczos", 2.0])
    assert len(out["images"]) == 1
    image = unb64(out["images"][0])
    assert image.size == (128, 128)
    assert "SD upscale upscaler: Lanczos" in info["infotexts"][0] and "SD upscale overlap: 16" in info["infotexts"][0]
    by_index, _ = post(api, "/img2img", init_images=[_picture()], denoising_strength=0.3, width=64, height=64,
                       script_name="SD upscale", script_args=["", 16, 1, 2.0])  # 1: Lanczos in /upscalers
    assert_pixels_close(image, unb64(by_index["images"][0]), levels=1)
    r = api.post(api.base + "/img2img", json={**SMALL, "init_images": [_picture()], "script_name": "SD upscale",
                                              "script_args": ["", 16, "Bicubic dreams", 2.0]})
    assert r.status_code == 422 and "unknown upscaler 'Bicubic dreams'" in r.json()["detail"]


def test_tiles_split_and_combine_back_to_the_same_picture():
    from modules.core import grids
    a = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    image = Image.fromarray(a)
    tiles = grids.split_tiles(image, 64, 64, 16)
    assert all(t.size == (64, 64) for _, _, t in tiles) and len(tiles) == 3 * 2
    assert np.array_equal(np.asarray(grids.combine_tiles(image.size, tiles)), a)
