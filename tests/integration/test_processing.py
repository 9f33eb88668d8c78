"""The one processing loop and its hook points (A1111's always-on script hooks), for txt2img and img2img alike."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modules import generation
from tests.images import assert_pixels_close


@pytest.fixture(scope="module")
def context(tiny_models, tmp_path_factory):
    return generation.local_context([tiny_models / "Stable-diffusion"], tmp_path_factory.mktemp("processing-out"))


class Recorder:
    """An always-on script: records each hook with what it was given, adds an infotext entry and tints the
    images of postprocess_image."""

    def __init__(self):
        self.calls = []

    def process(self, p):
        self.calls.append(("process", p.kind, p.sd_model_name, list(p.all_seeds)))
        p.extra_generation_params["Recorder"] = "on"

    def before_process_batch(self, p, batch_number, prompts, seeds, subseeds):
        self.calls.append(("before_process_batch", batch_number, list(prompts), list(seeds)))

    def process_batch(self, p, batch_number, prompts, seeds, subseeds):
        self.calls.append(("process_batch", batch_number))

    def postprocess_batch(self, p, images, batch_number):
        self.calls.append(("postprocess_batch", batch_number, len(images)))

    def postprocess_image(self, p, pp):
        self.calls.append(("postprocess_image", p.iteration))
        pp.image = Image.new("RGB", pp.image.size, (10, 200, 30))

    def postprocess(self, p, processed):
        self.calls.append(("postprocess", len(processed.images), processed.grid_count))


def test_txt2img_hooks_run_in_a1111_order_with_the_request_only(context):
    recorder = Recorder()
    req = generation.validate(generation.Txt2ImgRequest(prompt="a cat", steps=2, width=64, height=64, seed=5,
                                                        batch_size=2, n_iter=2, save_images=False))
    res = generation.run_txt2img(context, req, None, {}, scripts=[recorder])
    names = [c[0] for c in recorder.calls]
    assert names == ["process"] + ["before_process_batch", "process_batch", "postprocess_batch",
                                   "postprocess_image", "postprocess_image"] * 2 + ["postprocess"]
    assert recorder.calls[0][1] == "txt2img" and recorder.calls[0][3] == [5, 6, 7, 8]
    assert recorder.calls[1] == ("before_process_batch", 0, ["a cat", "a cat"], [5, 6])
    assert recorder.calls[-1] == ("postprocess", 5, 1)  # the grid first, then 4 images
    assert all("Recorder: on" in text for text in res.infotexts)
    assert res.info["extra_generation_params"]["Recorder"] == "on"
    for image in res.images[1:]:  # what postprocess_image made is what is answered (and saved)
        assert_pixels_close(image, Image.new("RGB", (64, 64), (10, 200, 30)))
    # nothing of this request's scripts reaches the next request
    plain = generation.run_txt2img(context, req, None, {})
    assert not any("Recorder" in text for text in plain.infotexts)


def test_img2img_runs_the_same_loop_and_a_script_can_change_the_prompts(context):
    class Prompts:
        def process(self, p):
            p.all_prompts = [f"{p.prompt}, number {i}" for i in range(len(p.all_seeds))]

    recorder = Recorder()
    init = Image.new("RGB", (64, 64), (120, 80, 40))
    req = generation.validate_img2img(generation.Img2ImgRequest(
        prompt="a house", steps=2, width=64, height=64, seed=1, n_iter=2, init_images=[init],
        denoising_strength=0.5, save_images=False))
    res = generation.run_img2img(context, req, None, {"return_grid": False}, scripts=[Prompts(), recorder])
    assert recorder.calls[0][1] == "img2img"
    assert [c[2] for c in recorder.calls if c[0] == "before_process_batch"] == [["a house, number 0"],
                                                                                 ["a house, number 1"]]
    assert [t.splitlines()[0] for t in res.infotexts] == ["a house, number 0", "a house, number 1"]
    assert res.info["all_prompts"] == ["a house, number 0", "a house, number 1"]
    plain = generation.run_img2img(context, req, None, {"return_grid": False})
    assert np.abs(np.asarray(plain.images[0], float) - np.asarray(res.images[0], float)).mean() > 0.5  # encoded
