"""The Train tab's Captioner sub-tab in a real Chromium: a dataset preview, a tiny BLIP run started from the form,
its evaluation plot (CIDEr and BLEU-4 lines) and example captions, and the new captioner in the Caption tab's list
without a restart; a folder without caption files shows a notice."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.browser.test_train_ui import fill, open_train
from tests.conftest import Server, copy_models
from tests.integration.test_captioner_training import make_captioned


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    models = copy_models(tiny_models, tmp_path_factory.mktemp("cap-ui-models"), ["tiny-sd15.safetensors"])
    for sub in ("BLIP2", "BLIP"):
        shutil.copytree(tiny_models / sub, models / sub)
    s = Server(["--models-dir", str(models), "--device", "cpu"], tmp_path_factory.mktemp("cap-ui-data"))
    yield s
    s.stop()


def open_captioner(page: Page, server) -> None:
    open_train(page, server)
    page.locator("button[role='tab']", has_text="Captioner").first.click()
    expect(page.locator("#train_captioner_start")).to_be_visible()


def pick(page: Page, dropdown_id: str, option: str) -> None:
    page.keyboard.press("Escape")
    page.locator(f"#{dropdown_id} input").click()
    page.locator(f"#{dropdown_id}").get_by_role("option", name=option, exact=True).click()
    expect(page.locator(f"#{dropdown_id} input")).to_have_value(option)


def color_pixels(image_bytes: bytes, rgb) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB")).astype(int)
    return int((np.abs(pixels - list(rgb)).sum(axis=2) < 60).sum())


def test_a_captioner_run_from_the_train_tab(page, server, tmp_path):
    data = make_captioned(tmp_path / "data")
    open_captioner(page, server)
    pick(page, "train_captioner_pretrained_model_name_or_path", "tiny-blip")
    fill(page, "train_captioner_train_data_dir", data)
    fill(page, "train_captioner_val_data_dir", data / "2_things")
    fill(page, "train_captioner_output_name", "ui-cap")
    fill(page, "train_captioner_max_train_steps", 16)
    fill(page, "train_captioner_learning_rate", 0.005)
    page.locator("#train_captioner_preview").click()
    summary = page.locator("#train_preview_summary")
    expect(summary).to_contain_text("4 captioned images (8 with repeats), 4 held out")
    expect(summary).to_contain_text("16 steps")
    page.locator("#train_captioner_start").click()
    status = page.locator("#train_status_text")
    expect(status).to_contain_text("ui-cap", timeout=60_000)
    expect(status.locator(".train-state")).to_have_text("done", timeout=300_000)
    expect(status).to_contain_text("step 16/16")
    evals = page.locator("#train_eval_text")
    expect(evals).to_contain_text("before training")
    expect(evals.locator(".train-eval-table tr")).to_have_count(4)  # header, before, epoch 1, epoch 2 (the last step)
    plot = page.locator("#train_eval_plot")
    expect(plot.locator("canvas, svg").first).to_be_visible(timeout=30_000)
    page.wait_for_timeout(1000)  # the plot's own transition
    shot = plot.screenshot()
    green, red = color_pixels(shot, (44, 160, 44)), color_pixels(shot, (214, 39, 40))
    assert green > 40 and red > 20, (green, red)  # the CIDEr and BLEU-4 lines
    page.screenshot(path=str(tmp_path / "captioner-train-tab.png"), full_page=True)
    # the new captioner is offered by the Caption tab (and its batch captioning) at once
    page.get_by_role("tab", name="Caption", exact=True).click()
    pick(page, "caption_model", "ui-cap")
    assert not page.errors, page.errors


def test_a_folder_without_caption_files_shows_a_notice(page, server, tmp_path):
    data = make_captioned(tmp_path / "bare", captions=[None, None])
    open_captioner(page, server)
    fill(page, "train_captioner_train_data_dir", data)
    fill(page, "train_captioner_output_name", "x")
    fill(page, "train_captioner_max_train_steps", 3)
    page.locator("#train_captioner_start").click()
    expect(page.locator("#train_notice")).to_contain_text("no caption files")
    expect(page.locator("#train_notice")).not_to_contain_text("Traceback")
