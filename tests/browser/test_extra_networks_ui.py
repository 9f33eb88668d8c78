"""The txt2img extra-networks panel and the styles controls, in a real Chromium against a real server."""
from __future__ import annotations

import csv
import re

import pytest
from playwright.sync_api import Page, expect

from tests.browser.test_ui import GEN_TIMEOUT, infotext, open_ui, small
from tests.conftest import Server


@pytest.fixture
def server(api_server):
    yield api_server
    assert api_server.alive(), api_server.log()


def open_panel(page: Page, tab: str = "txt2img"):
    page.locator(f"#{tab}_extra_networks").get_by_text("Extra networks (LoRA, embeddings)").click()
    cards = page.locator(f"#{tab}_extra_cards")
    expect(cards).to_be_visible()
    return cards


def card(page: Page, name: str, tab: str = "txt2img"):
    return page.locator(f"#{tab}_extra_cards .extra-card[data-name='{name}']")


def pick(page: Page, dropdown_id: str, option: str) -> None:
    """Open a dropdown and click one of its options, as a user would."""
    page.keyboard.press("Escape")  # close any other open dropdown list first
    page.locator(f"#{dropdown_id} input").click()
    # this dropdown's own list: another one closing at the same moment may still show the same option
    page.locator(f"#{dropdown_id}").get_by_role("option", name=option, exact=True).click()


def style_rows(path) -> dict[str, tuple[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        return {r["name"]: (r["prompt"], r["negative_prompt"]) for r in csv.DictReader(handle)}


def test_panel_shows_cards_for_the_checkpoint_and_a_click_toggles_the_tag(page, server):
    """Cards with names (and the picture beside the file when there is one) for what applies to the checkpoint;
    SDXL LoRAs and embeddings are left out for an SD1 checkpoint and the panel says so; a click adds the tag,
    a second click takes it out again (A1111)."""
    open_ui(page, server)
    cards = open_panel(page)
    expect(card(page, "tiny-lora")).to_have_count(1)
    expect(card(page, "tiny-lora")).to_contain_text("LoRA")
    expect(card(page, "tiny-emb")).to_contain_text("Embedding")
    expect(card(page, "tiny-lora").locator(".preview img")).to_have_count(1)  # tiny-lora.png lies beside it
    expect(card(page, "tiny-xl-lora")).to_have_count(0)  # the selected checkpoint is SD1
    expect(card(page, "tiny-emb-xl")).to_have_count(0)
    expect(card(page, "tiny-sd2-lora")).to_have_count(0)  # SD2's text encoder is 40 wide, SD1's 32
    expect(cards).to_contain_text("3 not shown: made for another kind of checkpoint")

    search = page.locator("#txt2img_extra_search textarea, #txt2img_extra_search input").first
    search.fill("lora")
    expect(card(page, "tiny-emb")).to_have_count(0)
    expect(card(page, "tiny-lora")).to_have_count(1)
    search.fill("no such network")
    expect(cards).to_contain_text("(nothing matches)")
    expect(card(page, "tiny-lora")).to_have_count(0)
    search.fill("")
    expect(card(page, "tiny-emb")).to_be_visible()

    box = page.locator("#txt2img_prompt textarea")
    box.fill("a cat")
    card(page, "tiny-lora").click()
    expect(box).to_have_value("a cat, <lora:tiny-lora:1>")
    expect(page.locator("#txt2img_token_counter")).to_have_text("3/75")  # "a", "cat", ","; the tag not counted
    card(page, "tiny-emb").click()
    expect(box).to_have_value("a cat, <lora:tiny-lora:1>, tiny-emb")
    card(page, "tiny-lora").click()  # a second click takes it out again
    expect(box).to_have_value("a cat, tiny-emb")
    card(page, "tiny-emb").click()
    expect(box).to_have_value("a cat")
    card(page, "tiny-lora").click()

    small(page, steps=2)
    page.click("#txt2img_generate")
    info = page.locator("#html_info_txt2img .infotext")
    expect(info).to_contain_text("Lora hashes: ", timeout=GEN_TIMEOUT)
    text = infotext(page)
    assert text.splitlines()[0] == "a cat, <lora:tiny-lora:1>"
    assert 'Lora hashes: "tiny-lora: ' in text
    expect(page.locator("#txt2img_network_warnings")).to_have_count(0)
    assert not page.errors


def test_img2img_has_the_same_prompt_tools(page, server):
    """img2img has what txt2img has: token counters, styles with their editor, and the extra-networks cards
    (whose click writes into img2img's own prompt)."""
    open_ui(page, server)
    page.get_by_role("tab", name="img2img", exact=True).click()
    box = page.locator("#img2img_prompt textarea")
    box.fill("a red house")
    expect(page.locator("#img2img_token_counter")).to_have_text("3/75")
    page.locator("#img2img_neg_prompt textarea").fill("blurry")
    expect(page.locator("#img2img_negative_token_counter")).to_have_text("1/75")
    expect(page.locator("#img2img_styles")).to_be_visible()
    page.click("#img2img_style_edit")
    expect(page.locator("#img2img_style_prompt textarea")).to_be_visible()
    open_panel(page, "img2img")
    card(page, "tiny-lora", "img2img").click()
    expect(box).to_have_value("a red house, <lora:tiny-lora:1>")
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("")
    for button in ("img2img_send_to_img2img", "img2img_send_to_inpaint"):
        expect(page.locator(f"#{button}")).to_be_visible()
    assert not page.errors


def test_a_missing_lora_still_generates_and_names_the_ignored_tag(page, server):
    open_ui(page, server)
    small(page, steps=2)
    page.locator("#txt2img_prompt textarea").fill("a cat <lora:missing:1>")
    page.click("#txt2img_generate")
    expect(page.locator("#txt2img_gallery img").first).to_be_visible(timeout=GEN_TIMEOUT)
    notice = page.locator("#txt2img_network_warnings")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text("<lora:missing:1>")
    expect(notice).to_contain_text("ignored")
    assert "Lora hashes" not in infotext(page)
    assert server.alive(), server.log()


def test_style_editor_saves_applies_generates_and_deletes(page, tiny_models, tmp_path):
    srv = Server(["--api", "--models-dir", str(tiny_models)], tmp_path / "data")
    styles_csv = srv.data_dir / "styles.csv"
    try:
        open_ui(page, srv)
        page.locator("#txt2img_style_editor").get_by_text("Edit styles").click()
        notice = page.locator("#txt2img_styles_notice")

        # bad input: no name
        page.click("#txt2img_style_save")
        expect(notice).to_contain_text("Not saved")
        assert not styles_csv.exists()

        name_box = page.locator("#txt2img_style_name input")
        name_box.fill("watercolour")
        name_box.press("Enter")
        page.locator("#txt2img_style_prompt textarea").fill("watercolour painting, soft light")
        page.locator("#txt2img_style_neg_prompt textarea").fill("photo")
        page.click("#txt2img_style_save")
        expect(notice).to_contain_text("Saved style 'watercolour'")
        assert style_rows(styles_csv) == {"watercolour": ("watercolour painting, soft light", "photo")}
        assert not list(styles_csv.parent.glob(".styles.csv.*.tmp"))  # written atomically, nothing left over

        # a reloaded page offers it too (the page config was built before the style existed), and choosing
        # its name in the editor loads it
        page.reload()
        expect(page.locator("#ui_ready [data-ready]")).to_be_attached()
        page.locator("#txt2img_style_editor").get_by_text("Edit styles").click()
        style_prompt = page.locator("#txt2img_style_prompt textarea")
        expect(style_prompt).to_have_value("")
        pick(page, "txt2img_style_name", "watercolour")
        expect(style_prompt).to_have_value("watercolour painting, soft light")
        expect(page.locator("#txt2img_style_neg_prompt textarea")).to_have_value("photo")

        # the Styles dropdown offers it; applying writes it into the boxes and clears the selection
        box = page.locator("#txt2img_prompt textarea")
        neg = page.locator("#txt2img_neg_prompt textarea")
        box.fill("a cat")
        neg.fill("blurry")
        pick(page, "txt2img_styles", "watercolour")
        expect(page.locator("#txt2img_styles .token")).to_have_count(1)
        expect(page.locator("#txt2img_styles .token")).to_contain_text("watercolour")
        page.click("#txt2img_style_apply")
        expect(box).to_have_value("a cat, watercolour painting, soft light")
        expect(neg).to_have_value("blurry, photo")
        expect(page.locator("#txt2img_styles .token")).to_have_count(0)
        expect(notice).to_have_text("")

        # generating with a selected style puts the styled prompt in the infotext
        box.fill("a dog")
        neg.fill("")
        pick(page, "txt2img_styles", "watercolour")
        small(page, steps=2)
        page.click("#txt2img_generate")
        info = page.locator("#html_info_txt2img .infotext")
        expect(info).to_contain_text("Steps: 2", timeout=GEN_TIMEOUT)
        text = infotext(page)
        assert text.splitlines()[0] == "a dog, watercolour painting, soft light"
        assert text.splitlines()[1] == "Negative prompt: photo"
        expect(box).to_have_value("a dog")  # the selection was applied, the box left alone

        # choosing the name shown again reloads the style; delete removes it from the file and the choices
        style_prompt.fill("")
        pick(page, "txt2img_style_name", "watercolour")
        expect(style_prompt).to_have_value("watercolour painting, soft light")
        page.click("#txt2img_style_delete")
        expect(notice).to_contain_text("Deleted style 'watercolour'")
        assert style_rows(styles_csv) == {}
        expect(page.locator("#txt2img_styles .token")).to_have_count(0)
        page.locator("#txt2img_styles input").click()
        expect(page.get_by_role("option", name="watercolour", exact=True)).to_have_count(0)
        assert not page.errors
        assert srv.alive(), srv.log()
    finally:
        page.close()  # the open tab's streaming connection would hold up the server's graceful shutdown
        srv.stop()


def test_sdxl_checkpoint_with_its_lora_and_embedding_from_the_ui(page, tiny_models, tmp_path):
    """A user picks the SDXL checkpoint in the dropdown, clicks its LoRA card and writes its embedding:
    the image comes with both hashes in the infotext and no warning. Its own server: the pick is saved."""
    srv = Server(["--models-dir", str(tiny_models)], tmp_path / "data")
    try:
        open_ui(page, srv)
        page.locator("#setting_sd_model_checkpoint input").click()
        page.get_by_role("option", name=re.compile(r"^tiny-sdxl\.safetensors")).locator("visible=true").click()
        expect(page.locator("#setting_sd_model_checkpoint input")).to_have_value(re.compile(r"^tiny-sdxl\.safetensors"))
        small(page)
        page.locator("#txt2img_prompt textarea").fill("a tiny-emb-xl cat ")
        open_panel(page)
        card(page, "tiny-xl-lora").click()
        expect(page.locator("#txt2img_prompt textarea")).to_have_value(re.compile(r"<lora:tiny-xl-lora:1>"))
        page.click("#txt2img_generate")
        expect(page.locator("#html_info_txt2img .infotext")).to_contain_text("Model: tiny-sdxl", timeout=GEN_TIMEOUT)
        text = infotext(page)
        assert 'Lora hashes: "tiny-xl-lora: ' in text and 'TI hashes: "tiny-emb-xl: ' in text
        expect(page.locator("#txt2img_gallery img").first).to_be_visible()
        assert "ignored" not in page.locator("#txt2img_error").inner_text()
        assert srv.alive(), srv.log()
    finally:
        page.close()
        srv.stop()


def test_hires_prompt_with_its_own_lora_from_the_ui(page, server):
    """The hires fix section has A1111's Hires prompt box; a LoRA tag written there applies to the hires pass
    (its hash in the infotext) and the prompt is kept in the infotext."""
    open_ui(page, server)
    small(page, steps=2)
    page.locator("#txt2img_prompt textarea").fill("a cat")
    page.locator("#txt2img_hr").get_by_text("Hires. fix").first.click()
    page.locator("#txt2img_enable_hr input").check()
    page.locator("#txt2img_hr_scale input[type=number]").fill("1.5")
    page.locator("#txt2img_hr_scale input[type=number]").press("Enter")
    page.locator("#hires_prompt textarea").fill("a cat, sharp <lora:tiny-lora:0.7>")
    page.click("#txt2img_generate")
    expect(page.locator("#html_info_txt2img .infotext")).to_contain_text("Hires prompt", timeout=GEN_TIMEOUT)
    text = infotext(page)
    assert 'Hires prompt: "a cat, sharp <lora:tiny-lora:0.7>"' in text or \
        "Hires prompt: a cat, sharp <lora:tiny-lora:0.7>" in text, text
    assert 'Lora hashes: "tiny-lora: ' in text
    assert "Hires upscale: 1.5" in text and "Size: 64x64" in text  # A1111: Size is the first pass's


def test_token_counter_counts_an_embedding_as_its_vectors(page, server):
    """As A1111: tiny-emb (2 vectors, usable by the current SD1 checkpoint) counts 2; the SDXL-only
    tiny-emb-xl is not loaded for it, so its name counts as the words it is."""
    open_ui(page, server)
    box = page.locator("#txt2img_prompt textarea")
    box.fill("tiny-emb")
    expect(page.locator("#txt2img_token_counter")).to_contain_text("2/75")  # its words alone would be 4
    box.fill("tiny-emb-xl")
    expect(page.locator("#txt2img_token_counter")).to_contain_text("6/75")  # the tokens of its words
