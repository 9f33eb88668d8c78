"""The PNG Info tab: an image's generation parameters (its `parameters` text and other chunks), and the buttons
that send them (and the image) to txt2img, img2img or inpaint."""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules.core import infotext
from modules.ui.common import NotAnImage, UploadImage, infotext_html, notice_html


@dataclass
class PngInfoTab:
    image: Any
    text: Any  # the raw parameters text (hidden), what the send buttons read
    send_txt2img: Any
    send_img2img: Any
    send_inpaint: Any


def create_tab() -> PngInfoTab:
    with gr.Row():
        with gr.Column():
            image = UploadImage(label="Source", type="pil", format="png", elem_id="pnginfo_image",
                                sources=["upload"], height=420)
        with gr.Column():
            info = gr.HTML(elem_id="pnginfo_html")
            text = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
            send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
            with gr.Row():
                send_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_to_img2img", size="sm")
                send_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_to_inpaint", size="sm")

    def read(img):
        if img is None:
            return "", ""
        if isinstance(img, NotAnImage):  # and nothing of the previous image stays to be sent on
            gr.Warning(img.message)
            return notice_html(img.message), ""
        raw = infotext.read_image_infotext(img)
        items = infotext.png_info_items(img)
        if not raw and not items:
            return '<div class="infotext">No generation parameters found in this image.</div>', ""
        parts = []
        if raw:
            parts.append(f'<p><b>parameters</b></p>{infotext_html(raw)}')
        for k, v in items.items():
            if k != "parameters":
                parts.append(f"<p><b>{html.escape(str(k))}</b></p>{infotext_html(str(v))}")
        return "".join(parts), raw or ""

    image.change(read, inputs=[image], outputs=[info, text])
    return PngInfoTab(image, text, send, send_img2img, send_inpaint)
