"""The Extras tab (A1111's): upscale a single image, a batch of uploaded images, or a folder of images, by a
factor ("Scale by") or to a size ("Scale to", optionally cropped to fit), with Upscaler 1 and a second upscaler
blended in at its visibility. The work is a job on the one queue (`webui.submit_extras`); results go to
outputs/extras-images (a batch folder's output directory when given) with A1111's postprocessing infotext.
No torch here."""
from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from modules.ui.common import (
    NotAnImage,
    UploadImage,
    icon_button,
    job_error_message,
    notice_html,
    owner_of,
    progress_html,
)

MODES = ("Single Image", "Batch Process", "Batch from Directory")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
POLL_SECONDS = 0.25


def folder_images(text: str) -> list[Path]:
    """The images of a server folder, by name; ValueError (a notice) when there are none."""
    if not text or not text.strip():
        raise ValueError("Batch from Directory needs an input directory.")
    folder = Path(text.strip()).expanduser()
    if not folder.is_dir():
        raise ValueError(f"Input directory not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"No images in {folder} ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def _file_path(item) -> Path:
    return Path(getattr(item, "name", None) or getattr(item, "path", None) or str(item))


def _info_html(texts: list[str]) -> str:
    return f'<div class="infotext">{html.escape(texts[-1])}</div>' if texts and texts[-1] else ""


def create_tab(webui) -> None:
    """Add the Extras tab to the enclosing gr.Tabs."""
    from modules.core import upscaling

    hide_dirs = bool(getattr(webui.args, "hide_ui_dir_config", False))

    def names():
        return webui.upscalers.names()

    with gr.Tab("Extras", id="extras", elem_id="tab_extras"):
        with gr.Row(equal_height=False):
            with gr.Column(variant="compact"):
                mode = gr.State(0)
                resize_mode = gr.State(0)
                with gr.Tabs(elem_id="mode_extras"):
                    with gr.Tab("Single Image", id="single_image", elem_id="extras_single_tab") as t0:
                        image = UploadImage(label="Source", type="pil", format="png", image_mode=None,
                                            sources=["upload", "clipboard"], elem_id="extras_image", height=360)
                    with gr.Tab("Batch Process", id="batch_process", elem_id="extras_batch_process_tab") as t1:
                        files = gr.File(label="Batch Process", file_count="multiple", file_types=["image"],
                                        elem_id="extras_image_batch")
                    with gr.Tab("Batch from Directory", id="batch_from_directory",
                                elem_id="extras_batch_directory_tab", visible=not hide_dirs) as t2:
                        input_dir = gr.Textbox(label="Input directory", elem_id="extras_batch_input_dir",
                                               placeholder="A directory on the same machine where the server is "
                                                           "running.")
                        output_dir = gr.Textbox(label="Output directory", elem_id="extras_batch_output_dir",
                                                placeholder="Leave blank to save images to the default path.")
                        show_results = gr.Checkbox(label="Show result images", value=True,
                                                   elem_id="extras_show_extras_results")
                for i, tab in enumerate((t0, t1, t2)):
                    tab.select(lambda i=i: i, outputs=[mode], queue=False, show_progress="hidden")
                generate = gr.Button("Generate", variant="primary", elem_id="extras_generate")
                with gr.Tabs(elem_id="extras_resize_mode"):
                    with gr.Tab("Scale by", id="scale_by", elem_id="extras_scale_by_tab") as by:
                        resize = gr.Slider(1.0, 8.0, value=4.0, step=0.05, label="Resize",
                                           elem_id="extras_upscaling_resize")
                    with gr.Tab("Scale to", id="scale_to", elem_id="extras_scale_to_tab") as to:
                        with gr.Row():
                            width = gr.Slider(64, upscaling.MAX_OUTPUT_SIDE, value=512, step=8, label="Width",
                                              elem_id="extras_upscaling_resize_w")
                            height = gr.Slider(64, upscaling.MAX_OUTPUT_SIDE, value=512, step=8, label="Height",
                                               elem_id="extras_upscaling_resize_h")
                        crop = gr.Checkbox(label="Crop to fit", value=True, elem_id="extras_upscaling_crop")
                by.select(lambda: 0, outputs=[resize_mode], queue=False, show_progress="hidden")
                to.select(lambda: 1, outputs=[resize_mode], queue=False, show_progress="hidden")
                with gr.Row():
                    upscaler_1 = gr.Dropdown(label="Upscaler 1", choices=names(), value="None",
                                             elem_id="extras_upscaler_1", allow_custom_value=True)
                    refresh = icon_button("extras_refresh_upscalers", "refresh",
                                          "Rescan the upscaler folders (models/ESRGAN, models/RealESRGAN, ...)")
                with gr.Row():
                    upscaler_2 = gr.Dropdown(label="Upscaler 2", choices=names(), value="None",
                                             elem_id="extras_upscaler_2", allow_custom_value=True)
                    visibility = gr.Slider(0.0, 1.0, value=0.0, step=0.001, label="Upscaler 2 visibility",
                                           elem_id="extras_upscaler_2_visibility")
            with gr.Column(variant="compact"):
                progress = gr.HTML("", elem_id="extras_progress")
                gallery = gr.Gallery(label="Result", format="png", columns=4, height=512, elem_id="extras_gallery",
                                     interactive=False)
                info = gr.HTML("", elem_id="html_info_extras")
                notice = gr.HTML("", elem_id="extras_error")

    def fresh_choices():
        # only the choices: a value sent back would race the pick being made in the opened list
        return gr.update(choices=names())

    for dropdown in (upscaler_1, upscaler_2):
        dropdown.focus(fresh_choices, outputs=[dropdown], queue=False, show_progress="hidden")
    refresh.click(lambda: (fresh_choices(), fresh_choices()), outputs=[upscaler_1, upscaler_2], queue=False,
                  show_progress="hidden")

    def sources(m, single, batch, in_dir):
        """[(image or image file, name)] of the chosen mode; ValueError with the notice when there is none."""
        if m == 0:
            if isinstance(single, NotAnImage):
                raise ValueError(single.message)
            if single is None:
                raise ValueError("No image: upload an image in the Single Image tab first.")
            return [(single, None)]
        if m == 1:
            paths = [_file_path(f) for f in (batch or [])]
            if not paths:
                raise ValueError("No images: add image files in the Batch Process tab first.")
            return [(p, getattr(f, "orig_name", None) or p.name) for p, f in zip(paths, batch)]
        if hide_dirs:
            raise ValueError("Batch from Directory is disabled on this server (--hide-ui-dir-config).")
        return [(p, p.name) for p in folder_images(in_dir)]

    def run(m, single, batch, in_dir, out_dir, show, rm, by_, w, h, crop_, up1, up2, vis,
            request: gr.Request = None):
        try:
            params = upscaling.ExtrasParams(
                resize_mode=int(rm or 0), upscaling_resize=float(by_), upscaling_resize_w=int(w),
                upscaling_resize_h=int(h), upscaling_crop=bool(crop_), upscaler_1=up1 or "None",
                upscaler_2=up2 or "None", extras_upscaler_2_visibility=float(vis or 0))
            items = sources(int(m or 0), single, batch, in_dir)
            batch_dir = (out_dir or "").strip() if m == 2 else ""
            save = webui.extras_save_target(batch_dir or None, keep_names=m != 0)
            keep = m != 2 or bool(show)
            job = webui.submit_extras(items, params, save=save, owner=owner_of(request), keep_images=keep)
        except ValueError as e:
            gr.Warning(str(e))
            yield "", gr.update(), gr.update(), notice_html(str(e), "extras_error_notice")
            return
        import time
        while job.status in ("queued", "running"):
            yield progress_html(job, job.textinfo), gr.update(), gr.update(), ""
            time.sleep(POLL_SECONDS)
        try:
            result = job.wait()
        except Exception as e:
            message = job_error_message(e)
            gr.Warning(message)
            yield "", gr.update(), gr.update(), notice_html(message, "extras_error_notice")
            return
        shown = [(im, None) for im in result.images] if keep else []
        saved = f"Saved {len(result.paths)} image{'s' if len(result.paths) != 1 else ''} to {save.folder}." \
            if m == 2 and not keep else ""
        yield "", shown, _info_html(result.infotexts) + (f"<p>{html.escape(saved)}</p>" if saved else ""), ""

    inputs = [mode, image, files, input_dir, output_dir, show_results, resize_mode, resize, width, height, crop,
              upscaler_1, upscaler_2, visibility]
    generate.click(run, inputs=inputs, outputs=[progress, gallery, info, notice], concurrency_limit=None)
