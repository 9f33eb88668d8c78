"""FLUX from the browser: a user picks the FLUX folder in the checkpoint box, sets Distilled CFG Scale, and sees the
image with FLUX's infotext (made with the tab's DPM++ 2M in its flow form); sends it to img2img
and gets a new image; paints a mask in the Inpaint tab and gets the stroke repainted with the rest of the picture
kept; and turns on hires fix, which makes the picture at twice the size."""
from __future__ import annotations

import datetime
import re

import numpy as np
from PIL import Image
from playwright.sync_api import expect

from tests.browser.test_img2img_ui import paint_stroke
from tests.browser.test_ui import GEN_TIMEOUT, infotext, open_ui, set_number, small
from tests.conftest import Server, copy_models


def test_flux_from_the_checkpoint_box_with_distilled_cfg(page, tiny_models, tmp_path):
    models = copy_models(tiny_models, tmp_path / "models", ["tiny-sd15.safetensors", "tiny-flux-diffusers"])
    srv = Server(["--models-dir", str(models)], tmp_path / "data")
    try:
        open_ui(page, srv)
        box = page.locator("#setting_sd_model_checkpoint input")
        expect(box).to_have_value(re.compile(r"^tiny-sd15"))  # the SD model is the default, FLUX is listed
        box.click()
        page.get_by_role("option", name=re.compile(r"^tiny-flux-diffusers")).locator("visible=true").click()
        expect(box).to_have_value(re.compile(r"^tiny-flux-diffusers"), timeout=GEN_TIMEOUT)
        small(page)
        set_number(page, "txt2img_cfg_scale", 1)
        set_number(page, "txt2img_distilled_cfg_scale", 2.5)
        page.locator("#txt2img_prompt textarea").fill("a red house")
        page.click("#txt2img_generate")
        expect(page.locator("#html_info_txt2img .infotext")).to_contain_text("Model: tiny-flux-diffusers",
                                                                             timeout=GEN_TIMEOUT)
        text = infotext(page)
        # the tab's default sampler, DPM++ 2M, runs in its flow-matching form
        assert "Distilled CFG Scale: 2.5" in text and "Sampler: DPM++ 2M" in text and "CFG scale: 1" in text
        expect(page.locator("#txt2img_gallery img").first).to_be_visible()
        # no "not available" notice (the warnings box is not even drawn when there are none)
        assert not any("not available" in t for t in page.locator("#txt2img_network_warnings").all_inner_texts())
        page.screenshot(path=str(tmp_path / "flux.png"), full_page=True)

        page.click("#txt2img_send_to_img2img")
        expect(page.locator("#img2img_image img")).to_be_visible()
        set_number(page, "img2img_steps", 2)
        page.click("#img2img_generate")
        expect(page.locator("#html_info_img2img .infotext")).to_contain_text("Denoising strength: 0.75",
                                                                             timeout=GEN_TIMEOUT)
        assert "Model: tiny-flux-diffusers" in page.locator("#html_info_img2img .infotext").inner_text()
        expect(page.locator("#img2img_gallery img").first).to_be_visible()

        # inpainting: the FLUX picture uploaded, a stroke painted along its top edge, the rest kept
        day = datetime.date.today().isoformat()
        init = sorted((srv.data_dir / "outputs" / "txt2img-images" / day).glob("*.png"))[-1]
        page.locator("#img2img_image input[type=file]").set_input_files(str(init))
        page.click("#img2img_copy_to_inpaint")
        expect(page.locator("#img2maskimg canvas").first).to_be_visible(timeout=GEN_TIMEOUT)
        expect(page.locator("#img2maskimg")).to_contain_text("%")
        set_number(page, "img2img_denoising_strength", 1)
        paint_stroke(page, "img2maskimg", [(4, 2), (32, 2), (60, 2)])
        page.click("#img2img_generate")
        expect(page.locator("#html_info_img2img .infotext")).to_contain_text("Mask blur: 4", timeout=GEN_TIMEOUT)
        text = page.locator("#html_info_img2img .infotext").inner_text()
        assert "Model: tiny-flux-diffusers" in text and "Denoising strength: 1" in text
        expect(page.locator("#img2img_error")).to_have_text("")
        inpainted = sorted((srv.data_dir / "outputs" / "img2img-images" / day).glob("*.png"))[-1]
        with Image.open(init) as a, Image.open(inpainted) as b:
            diff = np.abs(np.asarray(a.convert("RGB"), int) - np.asarray(b.convert("RGB"), int)).max(axis=2)
        assert diff[48:].max() == 0  # far from the stroke: the picture's own pixels
        assert (diff[0:5, 6:58] > 0).mean() > 0.5  # under it: repainted

        page.get_by_role("tab", name="txt2img", exact=True).click()
        page.locator("#txt2img_hr").get_by_text("Hires. fix").first.click()
        page.locator("#txt2img_enable_hr input").check()
        page.click("#txt2img_generate")
        expect(page.locator("#html_info_txt2img .infotext")).to_contain_text("Hires upscale: 2", timeout=GEN_TIMEOUT)
        assert "Model: tiny-flux-diffusers" in infotext(page) and "Hires upscaler: Latent" in infotext(page)
        newest = sorted((srv.data_dir / "outputs" / "txt2img-images" / day).glob("*.png"))[-1]
        with Image.open(newest) as im:
            assert im.size == (128, 128)  # the tab's 64x64 at Upscale by 2
        assert srv.alive() and not page.errors, page.errors
    finally:
        srv.stop()


def test_a_flux_transformer_file_says_what_is_missing_then_makes_an_image(page, tiny_models, tmp_path):
    """A FLUX transformer-only file (fp8) picked in the checkpoint box, with CLIP-L/T5 in models/text_encoder and
    FLUX's VAE in models/VAE but no T5 tokenizer anywhere: the page says what to add; once the tokenizer folder is
    there, the image comes with the VAE named in its infotext."""
    import shutil

    from modules.demo import tiny_flow
    models = copy_models(tiny_models, tmp_path / "models", ["tiny-sd15.safetensors",
                                                            tiny_flow.TINY_FLUX_TRANSFORMER_FILE])
    shutil.copytree(tiny_models / "text_encoder", models / "text_encoder")
    (models / "VAE").mkdir()
    shutil.copy(tiny_models / "VAE" / tiny_flow.TINY_FLUX_VAE_FILE, models / "VAE")
    srv = Server(["--models-dir", str(models)], tmp_path / "data")
    try:
        open_ui(page, srv)
        box = page.locator("#setting_sd_model_checkpoint input")
        expect(box).to_have_value(re.compile(r"^tiny-sd15"))
        box.click()
        page.get_by_role("option", name=re.compile(r"^tiny-flux-transformer-fp8")).locator("visible=true").click()
        expect(box).to_have_value(re.compile(r"^tiny-flux-transformer-fp8"), timeout=GEN_TIMEOUT)
        small(page)
        set_number(page, "txt2img_cfg_scale", 1)
        page.locator("#txt2img_prompt textarea").fill("a red house")
        page.click("#txt2img_generate")
        expect(page.locator("#txt2img_error")).to_contain_text("T5's tokenizer is not shipped with the studio",
                                                               timeout=GEN_TIMEOUT)
        shutil.copytree(tiny_models / "Stable-diffusion" / "tiny-flux-diffusers" / "tokenizer_2",
                        models / "text_encoder" / "t5-tokenizer")
        page.click("#txt2img_generate")
        expect(page.locator("#html_info_txt2img .infotext")).to_contain_text(
            f"VAE: {tiny_flow.TINY_FLUX_VAE_FILE}", timeout=GEN_TIMEOUT)
        assert "Model: tiny-flux-transformer-fp8" in infotext(page)
        expect(page.locator("#txt2img_gallery img").first).to_be_visible()
        expect(page.locator("#txt2img_error")).not_to_contain_text("tokenizer")  # the notice has gone
        page.screenshot(path=str(tmp_path / "flux-file.png"), full_page=True)
        assert srv.alive() and not page.errors, page.errors
    finally:
        srv.stop()
