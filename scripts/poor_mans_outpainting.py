"""Poor man's outpainting (img2img): grow the canvas on the chosen sides, fill the new border, inpaint it.
script_args (A1111's order): [pixels=128, mask_blur=4, masked_content="fill" (or its index 0..3), directions]."""
import gradio as gr

from modules import processing, scripts
from modules.generation import MASKED_CONTENT, outpainting


class Script(scripts.Script):
    def title(self):
        return outpainting.POOR_MANS

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        pixels = gr.Slider(8, 256, value=128, step=8, label="Pixels to expand", elem_id=self.elem_id("pixels"))
        mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id=self.elem_id("mask_blur"))
        fill = gr.Radio(list(MASKED_CONTENT), value="fill", label="Masked content", elem_id=self.elem_id("fill"))
        direction = gr.CheckboxGroup(list(outpainting.DIRECTIONS), value=list(outpainting.DIRECTIONS),
                                     label="Outpainting direction", elem_id=self.elem_id("direction"))
        return [pixels, mask_blur, fill, direction]

    def validate_args(self, args):
        outpainting.parse_args(self.title(), args)

    def run(self, p, *args):
        return processing.process_images(outpainting.grow(p, self.title(), args))
