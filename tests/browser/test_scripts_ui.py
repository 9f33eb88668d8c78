"""Scripts and extensions in a real Chromium: the Script dropdown shows the picked script's controls and X/Y/Z
plot's labelled grid appears in the gallery; a server with extensions in its data dir shows an extension's
always-on accordion, its tab and its setting, reports the broken ones in the Extensions tab, and refuses
installing under --listen."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
from playwright.sync_api import Page, expect

from tests.browser.test_ui import GEN_TIMEOUT, open_ui, small
from tests.conftest import Server


@pytest.fixture
def server(api_server):
    yield api_server
    assert api_server.alive(), api_server.log()


def pick(page: Page, dropdown: str, option: str) -> None:
    page.locator(f"#{dropdown} input").click()
    page.locator(f"#{dropdown}").get_by_role("option", name=option, exact=True).click()


def shown_image(page: Page, selector: str) -> np.ndarray:
    """The pixels of the image element the user sees (read back through a canvas), as H x W x 3."""
    data = page.evaluate("""(sel) => new Promise((done) => {
        const img = document.querySelector(sel);
        const load = () => { const c = document.createElement('canvas'); c.width = img.naturalWidth;
            c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            done({w: c.width, h: c.height, px: Array.from(g.getImageData(0, 0, c.width, c.height).data)}); };
        if (img.complete && img.naturalWidth) load(); else img.onload = load; })""", selector)
    return np.array(data["px"], np.uint8).reshape(data["h"], data["w"], 4)[..., :3]


def test_xyz_plot_grid_with_its_legend_appears_in_the_gallery(page, server):
    open_ui(page, server)
    small(page, steps=2)
    expect(page.locator("#script_txt2img_xyz_plot_x_type")).to_be_hidden()
    pick(page, "txt2img_script", "X/Y/Z plot")
    expect(page.locator("#script_txt2img_xyz_plot_x_type")).to_be_visible()
    pick(page, "script_txt2img_xyz_plot_x_type", "Steps")
    page.locator("#script_txt2img_xyz_plot_x_values").locator("textarea, input").first.fill("1-3")
    page.click("#txt2img_generate")
    expect(page.locator("#txt2img_gallery img").first).to_be_visible(timeout=GEN_TIMEOUT)
    expect(page.locator("#html_info_txt2img .infotext")).to_contain_text("Steps: 1", timeout=GEN_TIMEOUT)
    grid = shown_image(page, "#txt2img_gallery img")
    h, w = grid.shape[:2]
    assert w == 3 * 64 and h > 64, grid.shape  # three cells in a row, the legend above them
    band = grid[: h - 64].mean(axis=2)
    assert (band > 250).mean() > 0.5 and (band < 100).any(), "the legend: dark text on white above the cells"
    assert not page.errors, page.errors


def test_model_comparison_report_from_the_script_dropdown(page, server):
    """A user picks "Model comparison", chooses two checkpoints of different families, and sees the report's grid
    (a column per checkpoint under their names) in the gallery and the report's path under it."""
    open_ui(page, server)
    small(page, steps=2)
    page.locator("#txt2img_prompt textarea").fill("a small red boat")
    pick(page, "txt2img_script", "Model comparison")
    box = page.locator("#script_txt2img_model_comparison_checkpoints input")
    expect(box).to_be_visible()
    for name in ("tiny-sd15.safetensors", "tiny-sd2-v.safetensors"):
        box.click()
        page.locator("#script_txt2img_model_comparison_checkpoints").get_by_role("option", name=name).click()
    page.locator("#script_txt2img_model_comparison_seeds input, #script_txt2img_model_comparison_seeds textarea") \
        .first.fill("5")
    page.locator("#script_txt2img_model_comparison_alignment input").uncheck()
    page.click("#txt2img_generate")
    info = page.locator("#html_info_txt2img")
    expect(info).to_contain_text("Model comparison report:", timeout=GEN_TIMEOUT)
    expect(info).to_contain_text("report.html")
    grid = shown_image(page, "#txt2img_gallery img")
    h, w = grid.shape[:2]
    assert w >= 2 * 64 and h > 64, grid.shape  # two cells side by side, their legends above and beside them
    band = grid[: h - 64].mean(axis=2)
    assert (band > 250).mean() > 0.5 and (band < 100).any(), "the legend: dark text on white above the cells"
    assert not page.errors, page.errors


GOOD = '''
import gradio as gr
from modules import script_callbacks, scripts, shared

class Stamp(scripts.Script):
    def title(self):
        return "Stamp"
    def show(self, is_img2img):
        return scripts.AlwaysVisible
    def ui(self, is_img2img):
        return [gr.Checkbox(label="Stamp it", value=False, elem_id=self.elem_id("on"))]
    def process(self, p, on):
        if on:
            p.extra_generation_params["Stamp"] = shared.opts.stamp_text

def settings():
    shared.opts.add_option("stamp_text", shared.OptionInfo("hello", "Stamp text", section=("stamp", "Stamp")))

def tab():
    with gr.Blocks() as ui:
        gr.Markdown("the stamp tab", elem_id="stamp_tab_text")
    return [(ui, "Stamp", "stamp")]

script_callbacks.on_ui_settings(settings)
script_callbacks.on_ui_tabs(tab)
'''
BROKEN = "def oops(:\n"
BAD_UI = '''
from modules import scripts
class BadUi(scripts.Script):
    def title(self):
        return "Bad UI"
    def ui(self, is_img2img):
        raise RuntimeError("no controls today")
'''


def make_extensions(root):
    for name, code in (("good", GOOD), ("broken", BROKEN), ("bad-ui", BAD_UI)):
        folder = root / "extensions" / name / "scripts"
        folder.mkdir(parents=True)
        (folder / f"{name.replace('-', '_')}.py").write_text(textwrap.dedent(code))


def test_extensions_load_report_the_broken_ones_and_show_their_parts(page, tiny_models, tmp_path):
    data = tmp_path / "data"
    make_extensions(data)
    srv = Server(["--api", "--models-dir", str(tiny_models)], data)
    try:
        open_ui(page, srv)
        page.locator("#txt2img_script_stamp").click()  # the always-on script's accordion
        page.locator("#script_txt2img_stamp_on input").check()
        small(page, steps=2)
        page.click("#txt2img_generate")
        expect(page.locator("#html_info_txt2img .infotext")).to_contain_text("Stamp: hello", timeout=GEN_TIMEOUT)
        # its tab (on_ui_tabs) and its setting (on_ui_settings)
        page.locator("#tab_stamp-button").click()
        expect(page.locator("#stamp_tab_text")).to_contain_text("the stamp tab")
        page.locator("#tab_settings-button").click()
        expect(page.locator("#setting_stamp_text input, #setting_stamp_text textarea").first).to_have_value("hello")
        # the broken ones are named in the Extensions tab, and skipped
        page.locator("#tab_extensions-button").click()
        problems = page.locator("#extensions_problems")
        expect(problems).to_contain_text("broken")
        expect(problems).to_contain_text("SyntaxError")
        expect(problems).to_contain_text("no controls today")
        expect(page.locator("#extensions_table")).to_contain_text("good")
        assert "no controls today" in srv.log() and "SyntaxError" in srv.log()
        # disabling is saved for the next start
        page.locator("#extensions_enabled label", has_text="good").locator("input").uncheck()
        page.click("#extensions_apply")
        expect(page.locator("#extensions_applied")).to_contain_text("Restart the server")
        assert '"good"' in (data / "config.json").read_text()
    finally:
        srv.stop()
    assert not page.errors, page.errors


def test_install_is_locked_when_the_server_listens_on_the_network(page, tiny_models, tmp_path):
    srv = Server(["--listen", "--models-dir", str(tiny_models)], tmp_path / "data")
    try:
        open_ui(page, srv)
        page.locator("#tab_extensions-button").click()
        page.get_by_role("tab", name="Install from URL").click()
        expect(page.locator("#extensions_install_locked")).to_contain_text("--enable-insecure-extension-access")
        expect(page.locator("#extensions_install_button")).to_be_disabled()
        expect(page.locator("#extensions_check")).to_be_disabled()
    finally:
        srv.stop()


def gallery_sizes(page: Page, tab: str) -> list[tuple[int, int]]:
    return page.evaluate("""(sel) => Array.from(document.querySelectorAll(sel)).map(
        (img) => [img.naturalWidth, img.naturalHeight])""", f"#{tab}_gallery img")


@pytest.mark.parametrize("tab, title, fill, expected", [
    ("txt2img", "Prompt matrix", {}, [(128, None), (64, 64), (64, 64)]),
    ("txt2img", "Prompts from file or textbox", {"prompt_txt": "a cat\n--prompt \"a dog\" --steps 2"},
     [(64, 64), (64, 64)]),
    ("img2img", "SD upscale", {"overlap": 16, "scale_factor": 2}, [(128, 128)]),
    ("img2img", "Loopback", {"loops": 2}, [(128, 64), (64, 64), (64, 64)]),
    ("img2img", "Poor man's outpainting", {"pixels": 32}, [(128, 128)]),
], ids=["prompt-matrix", "prompts-from-file", "sd-upscale", "loopback", "poor-mans-outpainting"])
def test_each_builtin_script_runs_from_its_dropdown(page, server, tmp_path, tab, title, fill, expected):
    import re

    from PIL import Image
    open_ui(page, server)
    if tab == "img2img":
        picture = tmp_path / "in.png"
        Image.new("RGB", (64, 64), (200, 40, 40)).save(picture)
        page.get_by_role("tab", name="img2img", exact=True).first.click()
        page.locator("#img2img_image input[type=file]").set_input_files(str(picture))
        expect(page.locator("#img2img_image img")).to_be_visible()
    from tests.browser.test_ui import set_number
    for name, value in (("width", 64), ("height", 64), ("steps", 2)):
        set_number(page, f"{tab}_{name}", value)
    page.locator(f"#{tab}_prompt textarea").fill("a house|red" if title == "Prompt matrix" else "a house")
    pick(page, f"{tab}_script", title)
    slug = re.sub(r"[^a-z_0-9]", "", title.lower().replace(" ", "_"))
    for item, value in fill.items():
        box = page.locator(f"#script_{tab}_{slug}_{item}")
        expect(box).to_be_visible()
        if isinstance(value, str):
            box.locator("textarea").fill(value)
        else:
            set_number(page, f"script_{tab}_{slug}_{item}", value)
    page.click(f"#{tab}_generate")
    expect(page.locator(f"#{tab}_gallery img")).to_have_count(len(expected), timeout=GEN_TIMEOUT)
    page.wait_for_function(f"""() => Array.from(document.querySelectorAll('#{tab}_gallery img'))
        .every((img) => img.complete && img.naturalWidth > 0)""")
    sizes = gallery_sizes(page, tab)
    for (w, h), (want_w, want_h) in zip(sizes, expected):
        assert w == want_w and (want_h is None or h == want_h), (sizes, expected)
    assert not page.errors, page.errors
