"""The img2img tab (img2img, sketch, inpaint, inpaint sketch, inpaint upload, batch) with the shared prompt tools
and output panel, its Interrogate button, and the "Send to img2img / inpaint" wiring. Thin: editor values ->
init image + mask (plain PIL) -> a job -> the result. No torch here."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from modules.generation.img2img_params import (
    INPAINT_AREAS,
    MASK_MODES,
    MASKED_CONTENT,
    RESIZE_MODES,
    Img2ImgRequest,
)
from modules.ui import common
from modules.ui import scripts as scripts_ui
from modules.ui.common import NotAnImage, UploadEditor, UploadImage, notice_html

log = logging.getLogger("webui.ui")

MODES = ("img2img", "sketch", "inpaint", "inpaint sketch", "inpaint upload", "batch")
MODE_IDS = ("img2img_img2img_tab", "img2img_img2img_sketch_tab", "img2img_inpaint_tab",
            "img2img_inpaint_sketch_tab", "img2img_inpaint_upload_tab", "img2img_batch_tab")
# the fields "Send to img2img / inpaint" copies from an image's infotext (A1111's paste of the generation params)
SEND_FIELDS = ("prompt", "negative_prompt", "steps", "sampler_name", "scheduler", "cfg_scale", "seed", "width",
               "height", "subseed", "subseed_strength", "batch_size", "styles")


# ------------------------------------------------------------------------------------ editor value -> images

def _as_pil(value) -> Image.Image | None:
    """A PIL image from whatever Gradio hands over (PIL, numpy array, file path, (image, caption) pair)."""
    if value is None:
        return None
    if isinstance(value, NotAnImage):
        raise ValueError(value.message)
    if isinstance(value, (tuple, list)) and value:
        return _as_pil(value[0])
    if isinstance(value, dict):
        return _as_pil(value.get("image") or value.get("path") or value.get("url"))
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        with Image.open(value) as im:
            im.load()
            return im.copy()
    if hasattr(value, "shape"):
        return Image.fromarray(value)
    return None


def layers_alpha(layers, size: tuple[int, int]) -> Image.Image:
    """The painted pixels of the editor's layers as one L image (max alpha over the layers), `size` big."""
    mask = Image.new("L", size, 0)
    for layer in layers or []:
        layer = _as_pil(layer)
        if layer is None:
            continue
        alpha = layer.getchannel("A") if layer.mode in ("RGBA", "LA", "PA") else layer.convert("L")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        mask = Image.fromarray(np.maximum(np.asarray(mask), np.asarray(alpha)))
    return mask


def binary_mask(alpha: Image.Image) -> Image.Image:
    """A1111's create_binary_mask: painted (alpha above half) -> 255, the rest -> 0."""
    return alpha.point(lambda v: 255 if v > 128 else 0)


def editor_background(value) -> Image.Image | None:
    """The image under the strokes of an ImageEditor value (its background), or None when nothing is loaded."""
    if not isinstance(value, dict):
        return _as_pil(value)
    return _as_pil(value.get("background"))


def editor_composite(value) -> Image.Image | None:
    if not isinstance(value, dict):
        return _as_pil(value)
    return _as_pil(value.get("composite")) or editor_background(value)


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        out = Image.new("RGB", image.size, (0, 0, 0))
        out.paste(image, mask=image.getchannel("A"))
        return out
    return image.convert("RGB")


def init_and_mask(mode: int, img2img_image, sketch, inpaint, inpaint_sketch, upload_image, upload_mask):
    """The init image and mask (L, white = repaint, or None) of a UI mode; ValueError with a notice when missing."""
    name = MODES[mode]
    if mode == 0:
        image = _as_pil(img2img_image)
        if image is None:
            raise ValueError("No image: upload an image in the img2img tab first.")
        return _rgb(image), None
    if mode in (1, 2, 3):
        value = (sketch, inpaint, inpaint_sketch)[mode - 1]
        background = editor_background(value)
        if background is None:
            raise ValueError(f"No image: upload an image in the {name} tab first.")
        if mode == 1:
            return _rgb(editor_composite(value)), None
        alpha = layers_alpha(value.get("layers") if isinstance(value, dict) else None, background.size)
        if alpha.getextrema()[1] <= 128:
            raise ValueError(f"No mask: paint over the part of the image to {'repaint' if mode == 2 else 'sketch'} "
                             f"in the {name} tab.")
        init = _rgb(background) if mode == 2 else _rgb(editor_composite(value))
        return init, binary_mask(alpha)
    if mode == 4:
        image, mask = _as_pil(upload_image), _as_pil(upload_mask)
        if image is None:
            raise ValueError("No image: upload an image in the inpaint upload tab first.")
        if mask is None:
            raise ValueError("No mask: upload a mask image (white = repaint) in the inpaint upload tab.")
        return _rgb(image), mask
    raise ValueError(f"unknown img2img mode {mode}")


def _editor_value(image: Image.Image | None):
    if image is None:
        return None
    return {"background": image, "layers": [], "composite": image}


# ------------------------------------------------------------------------------------------------ the tab

@dataclass
class Img2ImgTab:
    """What create_ui needs to wire the send buttons: the sub-tab switch and the components to fill."""
    mode_tabs: gr.Tabs
    mode: gr.State
    inpaint_controls: gr.Group
    image: gr.Image
    inpaint: gr.ImageEditor
    components: dict
    tools: common.PromptTools
    panel: common.OutputPanel


def create_tab(webui) -> Img2ImgTab:
    """The contents of the img2img tab (built inside its gr.Tab)."""
    from modules.ui.txt2img import batch_controls, sampler_controls

    hide_dirs = bool(getattr(webui.args, "hide_ui_dir_config", False))
    tools = common.prompt_tools(webui, "img2img")
    with tools.side:
        interrogate = gr.Button("Interrogate", elem_id="img2img_interrogate", size="sm")
    mode = gr.State(0)
    with gr.Row():
        with gr.Column():
            with gr.Tabs(elem_id="mode_img2img") as mode_tabs:
                with gr.Tab("img2img", id="img2img_tab", elem_id=MODE_IDS[0]) as t0:
                    init_img = UploadImage(label="Image for img2img", type="pil", format="png", image_mode="RGBA",
                                           sources=["upload", "clipboard"], elem_id="img2img_image", height=384)
                    with gr.Row():
                        gr.HTML("<span>Copy image to:</span>", padding=False)
                        copy_sketch = gr.Button("sketch", size="sm", elem_id="img2img_copy_to_sketch")
                        copy_inpaint = gr.Button("inpaint", size="sm", elem_id="img2img_copy_to_inpaint")
                        copy_isketch = gr.Button("inpaint sketch", size="sm", elem_id="img2img_copy_to_inpaint_sketch")
                with gr.Tab("Sketch", id="sketch_tab", elem_id=MODE_IDS[1]) as t1:
                    sketch = UploadEditor(label="Image for img2img", type="pil", format="png", image_mode="RGBA",
                                          sources=["upload", "clipboard"], brush=gr.Brush(color_mode="defaults"),
                                          elem_id="img2img_sketch", height=384)
                with gr.Tab("Inpaint", id="inpaint_tab", elem_id=MODE_IDS[2]) as t2:
                    inpaint = UploadEditor(label="Image for inpainting with mask", type="pil", format="png",
                                           image_mode="RGBA", sources=["upload", "clipboard"],
                                           brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff",
                                                          color_mode="fixed"),
                                           layers=gr.LayerOptions(allow_additional_layers=False, layers=["Mask"]),
                                           transforms=(), elem_id="img2maskimg", height=384)
                with gr.Tab("Inpaint sketch", id="inpaint_sketch_tab", elem_id=MODE_IDS[3]) as t3:
                    inpaint_sketch = UploadEditor(label="Color sketch inpainting", type="pil", format="png",
                                                  image_mode="RGBA", sources=["upload", "clipboard"],
                                                  brush=gr.Brush(color_mode="defaults"), transforms=(),
                                                  elem_id="inpaint_sketch", height=384)
                with gr.Tab("Inpaint upload", id="inpaint_upload_tab", elem_id=MODE_IDS[4]) as t4:
                    up_image = UploadImage(label="Image", type="pil", format="png", image_mode="RGBA",
                                           sources=["upload"], elem_id="img_inpaint_base", height=320)
                    up_mask = UploadImage(label="Mask (white = repaint)", type="pil", format="png",
                                          image_mode="RGBA", sources=["upload"], elem_id="img_inpaint_mask",
                                          height=320)
                with gr.Tab("Batch", id="batch_tab", elem_id=MODE_IDS[5], visible=not hide_dirs) as t5:
                    gr.Markdown("Process the images of a folder on the server. An empty output folder saves to "
                                "the usual outputs folder. With a mask folder, each image's mask is the file "
                                "of the same name there.")
                    b_input = gr.Textbox(label="Input directory", elem_id="img2img_batch_input_dir")
                    b_output = gr.Textbox(label="Output directory", elem_id="img2img_batch_output_dir")
                    b_mask = gr.Textbox(label="Inpaint batch mask directory (required for inpaint batch)",
                                        elem_id="img2img_batch_inpaint_mask_dir")

            resize_mode = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], type="index", label="Resize mode",
                                   elem_id="resize_mode")
            with gr.Group(visible=False) as inpaint_controls:
                mask_blur = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id="img2img_mask_blur")
                mask_mode = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], type="index", label="Mask mode",
                                     elem_id="img2img_mask_mode")
                fill = gr.Radio(list(MASKED_CONTENT), value="original", type="index", label="Masked content",
                                elem_id="img2img_inpainting_fill")
                with gr.Row():
                    full_res = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], type="index",
                                        label="Inpaint area", elem_id="img2img_inpaint_full_res")
                    padding = gr.Slider(0, 256, value=32, step=4, label="Only masked padding, pixels",
                                        elem_id="img2img_inpaint_full_res_padding")
            for i, tab in enumerate((t0, t1, t2, t3, t4, t5)):
                tab.select(lambda i=i: _mode_updates(i), outputs=[mode, inpaint_controls], queue=False,
                           show_progress="hidden")
            sampler, scheduler, steps = sampler_controls("img2img")
            size_by = gr.State(0)
            with gr.Tabs(elem_id="img2img_tabs_resize"):
                with gr.Tab("Resize to", elem_id="img2img_tab_resize_to") as rt:
                    width, height = common.size_sliders("img2img")
                with gr.Tab("Resize by", elem_id="img2img_tab_resize_by") as rb:
                    scale = gr.Slider(0.05, 4, value=1, step=0.05, label="Scale", elem_id="img2img_scale")
            rt.select(lambda: 0, outputs=[size_by], queue=False, show_progress="hidden")
            rb.select(lambda: 1, outputs=[size_by], queue=False, show_progress="hidden")
            batch_count, batch_size = batch_controls("img2img")
            cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="img2img_cfg_scale")
            denoise = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                elem_id="img2img_denoising_strength")
            noise_mult = gr.Slider(0, 1.5, value=1.0, step=0.01, label="Initial noise multiplier",
                                   elem_id="img2img_initial_noise_multiplier")
            seeds = common.seed_controls("img2img")
            script_ui = scripts_ui.script_controls(webui, is_img2img=True)
        with gr.Column():
            panel = common.output_panel("img2img")

    seeds.wire(panel)
    for component in (init_img, sketch, inpaint, inpaint_sketch, up_image, up_mask):
        common.refuse_non_images(component, panel.notice)

    def copy_to(tab_id, m):
        def copy(image):
            if image is None or isinstance(image, NotAnImage):
                gr.Warning("No image: upload an image in the img2img tab first.")
                return (gr.update(), gr.update(), gr.update(), gr.update())
            return (_editor_value(_rgb(image)), gr.Tabs(selected=tab_id)) + _mode_updates(m)
        return copy

    # a tab switched by the server does not fire its .select: the handlers set the mode themselves
    copy_sketch.click(copy_to("sketch_tab", 1), inputs=[init_img], outputs=[sketch, mode_tabs, mode, inpaint_controls])
    copy_inpaint.click(copy_to("inpaint_tab", 2), inputs=[init_img], outputs=[inpaint, mode_tabs, mode, inpaint_controls])
    copy_isketch.click(copy_to("inpaint_sketch_tab", 3), inputs=[init_img], outputs=[inpaint_sketch, mode_tabs, mode, inpaint_controls])

    images_in = [init_img, sketch, inpaint, inpaint_sketch, up_image, up_mask]
    names = ["mode", "img2img", "sketch", "inpaint", "inpaint_sketch", "up_image", "up_mask", "b_input", "b_output",
             "b_mask", "prompt", "negative", "styles", "sampler", "scheduler", "steps", "size_by", "width", "height",
             "scale", "batch_count", "batch_size", "cfg", "denoise", "noise_mult", "seed", "extra", "subseed",
             "subseed_strength", "resize_mode", "mask_blur", "mask_mode", "fill", "full_res", "padding"]
    inputs = [mode, *images_in, b_input, b_output, b_mask, tools.prompt, tools.negative, tools.styles.dropdown,
              sampler, scheduler, steps, size_by, width, height, scale, batch_count, batch_size, cfg, denoise,
              noise_mult, seeds.seed, seeds.extra, seeds.subseed, seeds.subseed_strength, resize_mode, mask_blur,
              mask_mode, fill, full_res, padding, *script_ui.inputs]

    def make_request(v, init, mask) -> Img2ImgRequest:
        w = common.snap(v["width"], common.SIZE_STEP, common.MIN_SIZE, common.MAX_SIZE)
        h = common.snap(v["height"], common.SIZE_STEP, common.MIN_SIZE, common.MAX_SIZE)
        if v["size_by"] == 1 and init is not None:  # resize by: the init image's size times the scale (A1111)
            w = max(64, int(init.width * float(v["scale"])) // 8 * 8)
            h = max(64, int(init.height * float(v["scale"])) // 8 * 8)
        sd, ss = v["seed"], v["subseed"]
        return Img2ImgRequest(
            prompt=v["prompt"] or "", negative_prompt=v["negative"] or "", styles=list(v["styles"] or []),
            sampler_name=v["sampler"], scheduler=v["scheduler"], steps=int(v["steps"]), width=w, height=h,
            n_iter=int(v["batch_count"]), batch_size=int(v["batch_size"]), cfg_scale=float(v["cfg"]),
            seed=int(sd if sd is not None else -1), subseed=int(ss if (v["extra"] and ss is not None) else -1),
            subseed_strength=float(v["subseed_strength"]) if v["extra"] else 0.0, save_images=True,
            init_images=[init] if init is not None else [], mask=mask, resize_mode=int(v["resize_mode"] or 0),
            denoising_strength=float(v["denoise"]), initial_noise_multiplier=float(v["noise_mult"]),
            mask_blur_x=int(v["mask_blur"]), mask_blur_y=int(v["mask_blur"]),
            inpainting_fill=int(v["fill"] if v["fill"] is not None else 1),
            inpaint_full_res=bool(v["full_res"]), inpaint_full_res_padding=int(v["padding"]),
            inpainting_mask_invert=int(v["mask_mode"] or 0))

    def run(request: gr.Request, *values):
        from modules.generation import BatchFolders
        from modules.ui.extra_networks import warnings_html
        v = dict(zip(names, values))
        script_values = values[len(names):]
        owner = common.owner_of(request)
        try:
            if v["mode"] == 5:
                if hide_dirs:
                    raise ValueError("Batch processing from server folders is disabled (--hide-ui-dir-config).")
                folders = BatchFolders.from_text(v["b_input"], v["b_output"], v["b_mask"])
                req = make_request(v, None, None)
                job = webui.submit_img2img_batch(req, folders, owner=owner)
                size, label = (req.width, req.height), "batch"
            else:
                init, mask = init_and_mask(v["mode"], *(v[n] for n in names[1:7]))
                req = make_request(v, init, mask)
                selection = script_ui.selection(webui, script_values)
                if selection.title:
                    req = dataclasses.replace(req, script_name=selection.title, script_args=selection.script[1])
                job = webui.submit_img2img(req, owner=owner, scripts=selection)
                size, label = (req.width, req.height), ""
        except ValueError as e:
            yield panel.failed(str(e))
            return
        yield panel.started(job)
        yield from panel.follow(job, size, label and job.textinfo)
        try:
            result = job.wait()
        except Exception as e:
            yield panel.failed(common.job_error_message(e))
            return
        yield panel.finished(result, warnings_html(result.info.get("warnings"), "img2img"))

    common.wire_job_controls(webui, run, inputs, tools, panel)

    def on_interrogate(m, *images, request: gr.Request = None):
        from modules import captioning
        try:
            if m == 5:
                raise ValueError("Interrogate works on one image: pick the img2img, sketch or inpaint tab.")
            image = init_and_mask(m, *images)[0] if m != 4 else _as_pil(images[4])
            if image is None:
                raise ValueError("No image: upload an image in the inpaint upload tab first.")
            service = webui.captioning
            try:
                service.registry.refresh()
                service.registry.resolve(None, purpose="caption")
            except captioning.CaptionerError:
                raise ValueError(f"No captioner installed: put a BLIP captioner folder in "
                                 f"{webui.folders.models_dir / 'BLIP'} to use Interrogate.") from None
            job = service.submit_caption(captioning.CaptionRequest(image=_rgb(image), model=None),
                                         common.owner_of(request))
            caption = job.wait()
        except Exception as e:  # a failing model must not take the UI down
            message = common.job_error_message(e)
            gr.Warning(message)
            return gr.update(), notice_html(message)
        return common.clean_text(caption), ""

    interrogate.click(on_interrogate, inputs=[mode, *images_in], outputs=[tools.prompt, panel.notice],
                      concurrency_limit=None)

    components = dict(prompt=tools.prompt, negative_prompt=tools.negative, steps=steps, sampler_name=sampler,
                      scheduler=scheduler, cfg_scale=cfg, seed=seeds.seed, width=width, height=height,
                      subseed=seeds.subseed, subseed_strength=seeds.subseed_strength, batch_size=batch_size,
                      styles=tools.styles.dropdown)
    return Img2ImgTab(mode_tabs=mode_tabs, mode=mode, inpaint_controls=inpaint_controls, image=init_img,
                      inpaint=inpaint, components=components, tools=tools, panel=panel)


def _mode_updates(m: int):
    """The mode state and the inpaint controls' visibility (shown for the masked modes and batch) for mode `m`."""
    return m, gr.update(visible=m in (2, 3, 4, 5))


def wire_send(webui, tabs: gr.Tabs, tab: Img2ImgTab, buttons, image, text, selected=None) -> None:
    """Make a pair of send buttons send `image` (an image or a gallery; `selected` holds the picked index) and
    the generation parameters of `text` (an infotext, or a list of infotexts for a gallery) to img2img /
    inpaint; `tabs` is the top-level tab strip to switch."""
    to_img2img, to_inpaint = buttons
    targets = [tab.components[n] for n in SEND_FIELDS]

    def pick(value, texts, index):
        if isinstance(value, list):  # a gallery: the selected image, else the first (A1111 sends the first)
            if not value:
                raise ValueError("No image to send: generate one first.")
            i = index if isinstance(index, int) and 0 <= index < len(value) else 0
            texts = texts or []
            return _as_pil(value[i]), texts[i] if i < len(texts) else ""
        if value is None:
            raise ValueError("No image to send: open an image first.")
        return _as_pil(value), texts or ""

    def send(to_inpaint_tab):
        def handler(value, texts, index=None):
            try:
                img, txt = pick(value, texts, index)
            except ValueError as e:
                gr.Warning(str(e))
                return [gr.update()] * (6 + len(targets))
            img = _rgb(img)
            fields = common.pasted_fields(webui, txt) if txt else {}
            values = [gr.update(value=fields[n]) if n in fields else gr.update() for n in SEND_FIELDS]
            if to_inpaint_tab:
                return [gr.Tabs(selected="img2img"), gr.Tabs(selected="inpaint_tab"), *_mode_updates(2), gr.update(),
                        _editor_value(img)] + values
            return [gr.Tabs(selected="img2img"), gr.Tabs(selected="img2img_tab"), *_mode_updates(0), img,
                    gr.update()] + values
        return handler

    inputs = [image, text] + ([selected] if selected is not None else [])
    outputs_ = [tabs, tab.mode_tabs, tab.mode, tab.inpaint_controls, tab.image, tab.inpaint] + targets
    to_img2img.click(send(False), inputs=inputs, outputs=outputs_)
    to_inpaint.click(send(True), inputs=inputs, outputs=outputs_)
