"""Outpainting mk2 (img2img): grow the canvas, fill the new area with the edge colours and fall-off noise,
inpaint it. script_args (A1111's order): [info (ignored), pixels=128, mask_blur=8, directions,
fall_off_exponent=1.0, color_variation=0.05]."""
import gradio as gr

from modules import processing, scripts
from modules.generation import outpainting


class Script(scripts.Script):
    def title(self):
        return outpainting.MK2

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        info = gr.HTML("<p>Recommended settings: Sampling Steps: 80-100, Sampler: Euler a, Denoising strength: "
                       "0.8</p>")
        pixels = gr.Slider(8, 256, value=128, step=8, label="Pixels to expand", elem_id=self.elem_id("pixels"))
        mask_blur = gr.Slider(0, 64, value=8, step=1, label="Mask blur", elem_id=self.elem_id("mask_blur"))
        direction = gr.CheckboxGroup(list(outpainting.DIRECTIONS), value=list(outpainting.DIRECTIONS),
                                     label="Outpainting direction", elem_id=self.elem_id("direction"))
        falloff = gr.Slider(0, 4, value=1.0, step=0.01, label="Fall-off exponent (lower=higher detail)",
                            elem_id=self.elem_id("falloff"))
        color = gr.Slider(0, 1, value=0.05, step=0.01, label="Color variation", elem_id=self.elem_id("color"))
        return [info, pixels, mask_blur, direction, falloff, color]

    def validate_args(self, args):
        outpainting.parse_args(self.title(), args)

    def run(self, p, *args):
        return processing.process_images(outpainting.grow(p, self.title(), args))
