"""User stories in a real Chromium against a real `webui.py` server (tiny random-weight models)."""
from __future__ import annotations

import base64
import datetime
import json
import re

import pytest
import requests
from PIL import Image
from playwright.sync_api import Page, expect

from tests.conftest import Server

GEN_TIMEOUT = 60_000  # ms; a 64x64 image of the tiny model takes well under a second
FILE_RE = re.compile(r"^(\d{5})-(\d+)-(.*)\.png$")


# ---------------------------------------------------------------------------------------------- helpers

def open_ui(page: Page, server) -> None:
    page.goto(server.url)
    expect(page.locator("#txt2img_prompt textarea")).to_be_visible()
    # the page-load event fills settings and the checkpoint list; typing before it lands would be overwritten
    expect(page.locator("#ui_ready [data-ready]")).to_be_attached()


def set_number(page: Page, elem_id: str, value) -> None:
    """Type into the number box of a slider (or a gr.Number) and commit it, as a user would."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    expect(box).to_have_value(str(value))


def small(page: Page, steps: int = 3, batch_count: int = 1) -> None:
    set_number(page, "txt2img_width", 64)
    set_number(page, "txt2img_height", 64)
    set_number(page, "txt2img_steps", steps)
    if batch_count != 1:
        set_number(page, "txt2img_batch_count", batch_count)


def infotext(page: Page) -> str:
    return page.locator("#html_info_txt2img .infotext").inner_text()


def outputs_folder(server):
    return server.data_dir / "outputs" / "txt2img-images" / datetime.date.today().isoformat()


def pngs(server) -> set:
    folder = outputs_folder(server)
    return set(folder.glob("*.png")) if folder.exists() else set()


def field(text: str, name: str) -> str:
    m = re.search(rf"(?:^|, |\n){re.escape(name)}: ([^,\n]+)", text)
    assert m, f"{name!r} not in infotext:\n{text}"
    return m.group(1)


def assert_saved_like_shown(page: Page, server, before: set, prompt: str, steps: int) -> str:
    """The infotext under the gallery holds the request, and the one new PNG on disk carries exactly it."""
    info = page.locator("#html_info_txt2img .infotext")
    expect(info).to_contain_text(f"Steps: {steps}, Sampler: DPM++ 2M", timeout=GEN_TIMEOUT)
    text = infotext(page)
    assert text.splitlines()[0] == prompt
    assert "Size: 64x64" in text
    new = sorted(pngs(server) - before)
    assert len(new) == 1, new
    m = FILE_RE.match(new[0].name)
    assert m, new[0].name
    assert m.group(2) == field(text, "Seed") and m.group(3) == prompt
    with Image.open(new[0]) as im:
        assert im.size == (64, 64)
        assert im.info["parameters"] == text
    return text


@pytest.fixture
def server(api_server):
    yield api_server
    assert api_server.alive(), api_server.log()


# ---------------------------------------------------------------------------------------------- stories

def test_generate_shows_the_image_and_its_infotext_and_saves_it(page, server):
    open_ui(page, server)
    small(page, steps=4)
    prompt = "a red fox in the snow"
    page.locator("#txt2img_prompt textarea").fill(prompt)
    before = pngs(server)
    page.click("#txt2img_generate")
    expect(page.locator("#txt2img_gallery img").first).to_be_visible(timeout=GEN_TIMEOUT)
    text = assert_saved_like_shown(page, server, before, prompt, steps=4)
    assert int(field(text, "Seed")) >= 0  # seed -1 in the UI is resolved to a real one
    expect(page.locator("#txt2img_gallery img")).to_have_count(1)
    expect(page.locator("#txt2img_error")).to_have_text("")
    expect(page.locator("#txt2img_progress")).to_have_text("")
    assert not page.errors


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_seed_buttons_and_the_variation_row(page, server, tab):
    """🎲 sets -1; ♻️ brings back the seed of the last image (txt2img); "Extra" shows the variation seed row."""
    open_ui(page, server)
    if tab == "img2img":
        page.get_by_role("tab", name="img2img", exact=True).first.click()
    seed = page.locator(f"#{tab}_seed input")
    variation = page.locator(f"#{tab}_subseed")
    expect(variation).to_be_hidden()
    page.locator(f"#{tab}_subseed_show input").check()
    expect(variation).to_be_visible()
    seed.fill("1234")
    page.click(f"#{tab}_random_seed")
    expect(seed).to_have_value("-1")
    if tab == "txt2img":
        small(page, steps=2)
        page.locator("#txt2img_prompt textarea").fill("a kite")
        page.click("#txt2img_generate")
        expect(page.locator("#txt2img_gallery img").first).to_be_visible(timeout=GEN_TIMEOUT)
        used = field(infotext(page), "Seed")
        page.click("#txt2img_reuse_seed")
        expect(seed).to_have_value(used)


def test_ctrl_enter_in_the_prompt_generates(page, server):
    open_ui(page, server)
    small(page, steps=2)
    prompt = "a lighthouse at dusk"
    box = page.locator("#txt2img_prompt textarea")
    box.fill(prompt)
    before = pngs(server)
    box.press("Control+Enter")
    assert_saved_like_shown(page, server, before, prompt, steps=2)
    expect(box).to_have_value(prompt)  # the key press generated, it did not add a line


def test_token_counter_follows_the_prompt(page, server):
    open_ui(page, server)
    counter = page.locator("#txt2img_token_counter")
    box = page.locator("#txt2img_prompt textarea")
    expect(counter).to_have_text("0/75")
    box.fill("a photo of a cat")
    expect(counter).to_have_text("5/75")
    box.fill(" ".join(["cat"] * 80))
    expect(counter).to_have_text("80/150")
    expect(counter.locator(".token-counter")).to_have_class(re.compile(r"\bover\b"))
    box.fill("")
    expect(counter).to_have_text("0/75")
    expect(page.locator("#txt2img_negative_token_counter")).to_have_text("0/75")
    page.locator("#txt2img_neg_prompt textarea").fill("blurry, low quality")
    expect(page.locator("#txt2img_negative_token_counter")).to_have_text("4/75")


def test_interrupt_stops_a_long_job_and_keeps_what_was_drawn(page, server):
    batch_count, steps = 40, 150  # ~1.5-3 s an image here: the whole job would take minutes
    open_ui(page, server)
    small(page, steps=steps, batch_count=batch_count)
    page.locator("#txt2img_prompt textarea").fill("a long job")
    page.click("#txt2img_generate")
    progress = page.locator("#txt2img_progress")
    expect(progress).to_contain_text("step", timeout=GEN_TIMEOUT)
    expect(progress).to_contain_text(f"/{steps}")
    expect(progress.locator(".progress-bar")).to_be_attached()
    page.click("#txt2img_interrupt")
    # the whole job would take minutes; what was drawn shows once the current step ends
    expect(page.locator("#txt2img_gallery img").first).to_be_visible(timeout=GEN_TIMEOUT)
    expect(progress).to_have_text("")
    expect(page.locator("#html_info_txt2img .infotext")).to_contain_text(f"Steps: {steps},")
    shown = page.locator("#txt2img_gallery img").count()
    # a grid comes first once there are two images or more
    images = shown - 1 if shown > 1 else shown
    assert 1 <= images < batch_count, shown
    expect(page.locator("#txt2img_error")).to_have_text("")
    assert server.alive(), server.log()

    # the server is free again: a small job right after goes through
    set_number(page, "txt2img_steps", 3)
    set_number(page, "txt2img_batch_count", 1)
    page.locator("#txt2img_prompt textarea").fill("after the interrupt")
    page.click("#txt2img_generate")
    info = page.locator("#html_info_txt2img .infotext")
    expect(info).to_contain_text("after the interrupt\nSteps: 3,", timeout=GEN_TIMEOUT)
    expect(page.locator("#txt2img_gallery img")).to_have_count(1)


def test_png_info_reads_an_image_and_sends_it_to_txt2img(page, server, tmp_path):
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={
        "prompt": "a castle on a hill, (detailed)", "negative_prompt": "fog", "seed": 4242, "steps": 7,
        "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5.5}, timeout=120)
    assert r.status_code == 200, r.text
    path = tmp_path / "castle.png"
    path.write_bytes(base64.b64decode(r.json()["images"][0]))
    expected = json.loads(r.json()["info"])["infotexts"][0]

    open_ui(page, server)
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
    html_box = page.locator("#pnginfo_html")
    expect(html_box).to_contain_text("parameters", timeout=GEN_TIMEOUT)
    expect(html_box.locator(".infotext").first).to_have_text(expected)

    page.click("#pnginfo_send_txt2img")
    expect(page.locator("#txt2img_prompt textarea")).to_be_visible()
    expect(page.get_by_role("tab", name="txt2img")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("a castle on a hill, (detailed)")
    expect(page.locator("#txt2img_neg_prompt textarea")).to_have_value("fog")
    expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("7")
    expect(page.locator("#txt2img_seed input")).to_have_value("4242")
    expect(page.locator("#txt2img_cfg_scale input[type=number]")).to_have_value("5.5")
    expect(page.locator("#txt2img_width input[type=number]")).to_have_value("64")
    expect(page.locator("#txt2img_sampling input")).to_have_value("Euler")

    # and generating from there reproduces the picture's parameters
    before = pngs(server)
    page.click("#txt2img_generate")
    info = page.locator("#html_info_txt2img .infotext")
    expect(info).to_have_text(expected, timeout=GEN_TIMEOUT)
    assert len(pngs(server) - before) == 1


def test_send_seed_and_send_size_settings_decide_what_is_sent(page, server, tmp_path):
    """A1111's send_seed / send_size: with both off, "Send to txt2img" fills the prompt and steps but leaves the
    seed and the size boxes as they were."""
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={
        "prompt": "a quiet harbour", "seed": 5151, "steps": 6, "width": 64, "height": 128}, timeout=120)
    assert r.status_code == 200, r.text
    path = tmp_path / "harbour.png"
    path.write_bytes(base64.b64decode(r.json()["images"][0]))
    options = server.url + "/sdapi/v1/options"
    assert requests.post(options, json={"send_seed": False, "send_size": False}).status_code == 200
    try:
        open_ui(page, server)
        page.get_by_role("tab", name="PNG Info").click()
        page.locator("#pnginfo_image input[type=file]").set_input_files(str(path))
        expect(page.locator("#pnginfo_html")).to_contain_text("a quiet harbour", timeout=GEN_TIMEOUT)
        page.click("#pnginfo_send_txt2img")
        expect(page.locator("#txt2img_prompt textarea")).to_have_value("a quiet harbour")
        expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("6")
        expect(page.locator("#txt2img_seed input")).to_have_value("-1")
        expect(page.locator("#txt2img_width input[type=number]")).to_have_value("512")
        expect(page.locator("#txt2img_height input[type=number]")).to_have_value("512")
    finally:
        requests.post(options, json={"send_seed": True, "send_size": True})


def test_settings_apply_persist_and_take_effect(page, tiny_models, tmp_path):
    srv = Server(["--api", "--models-dir", str(tiny_models)], tmp_path / "data")
    try:
        open_ui(page, srv)
        page.get_by_role("tab", name="Settings").click()
        clip = page.locator("#setting_CLIP_stop_at_last_layers input[type=number]")
        expect(clip).to_have_value("1")
        clip.fill("2")
        clip.press("Enter")
        page.click("#settings_submit")
        expect(page.locator("#settings_result")).to_have_text(
            "1 settings changed: CLIP_stop_at_last_layers.", timeout=GEN_TIMEOUT)
        config = json.loads((srv.data_dir / "config.json").read_text())
        assert config["CLIP_stop_at_last_layers"] == 2

        # the new value is used by the next generation...
        page.get_by_role("tab", name="txt2img").click()
        small(page, steps=2)
        page.locator("#txt2img_prompt textarea").fill("clip skip two")
        page.click("#txt2img_generate")
        expect(page.locator("#html_info_txt2img .infotext")).to_contain_text("Clip skip: 2", timeout=GEN_TIMEOUT)

        # ...and a reloaded page shows it, so applying again does not undo it
        page.reload()
        expect(page.locator("#ui_ready [data-ready]")).to_be_attached()
        page.get_by_role("tab", name="Settings").click()
        expect(clip).to_have_value("2")
        period = page.locator("#setting_show_progress_every_n_steps input[type=number]")
        period.fill("3")
        period.press("Enter")
        page.click("#settings_submit")
        expect(page.locator("#settings_result")).to_have_text(
            "1 settings changed: show_progress_every_n_steps.", timeout=GEN_TIMEOUT)
        config = json.loads((srv.data_dir / "config.json").read_text())
        assert config["CLIP_stop_at_last_layers"] == 2 and config["show_progress_every_n_steps"] == 3
        assert srv.alive(), srv.log()
    finally:
        page.close()  # the open tab's streaming connection would hold up the server's graceful shutdown
        srv.stop()


def test_no_checkpoint_gives_a_clear_notice(page, tmp_path):
    (tmp_path / "empty").mkdir()
    srv = Server(["--models-dir", str(tmp_path / "empty")], tmp_path / "data")
    try:
        open_ui(page, srv)
        banner = page.locator("#banner_notice")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("No checkpoint found")
        expect(banner).to_contain_text(str(tmp_path / "empty" / "Stable-diffusion"))
        page.locator("#txt2img_prompt textarea").fill("anything")
        page.click("#txt2img_generate")
        toast = page.locator(".toast-body")
        expect(toast.first).to_be_visible(timeout=GEN_TIMEOUT)
        expect(toast.first).to_contain_text(re.compile(r"no checkpoint", re.I))
        expect(page.locator("#txt2img_error")).to_contain_text(re.compile(r"no checkpoint", re.I))
        expect(page.locator("#txt2img_error")).to_contain_text("Stable-diffusion")
        expect(page.locator("#txt2img_gallery img")).to_have_count(0)
        assert srv.alive(), srv.log()
        # the page still answers after the error
        page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
        expect(page.locator("#txt2img_token_counter")).to_have_text("5/75")
    finally:
        page.close()
        srv.stop()


def test_server_stops_promptly_with_a_tab_open(page, tmp_path):
    """SIGTERM (a service manager's stop, Ctrl+C) must not hang on the open tab's streaming connection."""
    (tmp_path / "empty").mkdir()
    srv = Server(["--models-dir", str(tmp_path / "empty")], tmp_path / "data")
    try:
        open_ui(page, srv)
        page.locator("#txt2img_prompt textarea").fill("a photo of a cat")
        # the first count may wait for the start-up warm-up (torch, transformers) on a busy machine
        expect(page.locator("#txt2img_token_counter")).to_have_text("5/75", timeout=30000)
        srv.proc.terminate()
        # a hang here is the bug (uvicorn waiting forever for the tab's stream); a slow machine is not
        srv.proc.wait(timeout=60)
        assert srv.proc.returncode is not None
    finally:
        if srv.alive():
            srv.proc.kill()
        srv.stop()
