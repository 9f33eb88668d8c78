"""The Checkpoint Merger tab, laid out as A1111's: models A, B and C, the custom name, the multiplier, the
interpolation method, format, float16, config source, a VAE to bake in, weights to discard, metadata, Merge. The
merge runs through the job queue (`modules/model_store/merging.py`); the saved file or the error shows under the
button. No torch here."""
from __future__ import annotations

import html
import time

import gradio as gr

from modules.model_store import merging
from modules.ui.common import (
    POLL_SECONDS,
    icon_button,
    notice_html,
    owner_of,
    progress_html,
)


def _model_choices(webui) -> list[str]:
    # diffusers folders are listed as checkpoints but cannot be merged (single files only)
    return [c.name for c in webui.registry.list() if not c.is_diffusers_folder]


def _vae_choices(webui) -> list[str]:
    return [merging.NO_VAE, *webui.vaes.names()]


def _saved_html(result, info) -> str:
    text = f"Checkpoint saved to {html.escape(str(result.path))}"
    if result.config is not None:
        text += f"<br>config copied to {html.escape(str(result.config))}"
    name = html.escape(info.name if info else result.path.name)
    return (f"<div id='modelmerger_saved' data-name='{name}'>{text}<br>"
            f"sha256 {html.escape(result.sha256)}</div>")


def _failed(message: str) -> str:
    gr.Warning(message)
    return notice_html(message, "modelmerger_error")


def create_tab(webui) -> gr.Textbox:
    """The tab's content (the caller opens the gr.Tab); returns a hidden box that changes after every merge, for
    the wiring to refresh the checkpoint list (the new model is listed at once)."""
    models = _model_choices(webui)
    with gr.Row(equal_height=False):
        with gr.Column(variant="compact"):
            gr.HTML("<p style='margin-bottom: 0.7em'>A merger of two or three checkpoints into a new one, written to "
                    "the checkpoint folder. With M = 0 the result is model A.</p>")
            with gr.Row():
                primary = gr.Dropdown(models, value=None, label="Primary model (A)",
                                      elem_id="modelmerger_primary_model_name")
                secondary = gr.Dropdown(models, value=None, label="Secondary model (B)",
                                        elem_id="modelmerger_secondary_model_name")
                tertiary = gr.Dropdown(models, value=None, label="Tertiary model (C)",
                                       elem_id="modelmerger_tertiary_model_name")
                refresh = icon_button("modelmerger_refresh", "refresh",
                                      "Rescan the model folders for checkpoints and VAEs")
            custom_name = gr.Textbox(label="Custom Name (Optional)", elem_id="modelmerger_custom_name",
                                     placeholder='empty: "A_B_0.3", "A_B_minus_C_0.3" or "A"', max_lines=1)
            multiplier = gr.Slider(0, 1, value=0.3, step=0.01, label="Multiplier (M) - set to 0 to get model A",
                                   elem_id="modelmerger_interp_amount")
            method = gr.Radio(list(merging.INTERP_METHODS), value=merging.WEIGHTED_SUM, label="Interpolation Method",
                              info="Weighted sum: A·(1-M) + B·M; Add difference: A + (B-C)·M; No interpolation: A "
                                   "(to convert, bake in a VAE or discard weights)",
                              elem_id="modelmerger_interp_method")
            with gr.Row():
                fmt = gr.Radio(["ckpt", "safetensors"], value="safetensors", label="Checkpoint format",
                               elem_id="modelmerger_checkpoint_format")
                half = gr.Checkbox(False, label="Save as float16", elem_id="modelmerger_save_as_half")
            config_source = gr.Radio(list(merging.CONFIG_SOURCES), value=merging.CONFIG_SOURCES[0],
                                     label="Copy config from", type="index", elem_id="modelmerger_config_method")
            with gr.Row():
                vae = gr.Dropdown(_vae_choices(webui), value=merging.NO_VAE, label="Bake in VAE",
                                  elem_id="modelmerger_bake_in_vae")
            discard = gr.Textbox(label="Discard weights with matching name", elem_id="modelmerger_discard_weights",
                                 placeholder="a regular expression, e.g. ^model_ema", max_lines=1)
            with gr.Row():
                save_metadata = gr.Checkbox(True, label="Save metadata", elem_id="modelmerger_save_metadata")
                overwrite = gr.Checkbox(False, label="Overwrite a checkpoint of the same name",
                                        elem_id="modelmerger_overwrite")
            merge = gr.Button("Merge", variant="primary", elem_id="modelmerger_merge")
        with gr.Column():
            result = gr.HTML("", elem_id="modelmerger_result")
    merged = gr.Textbox("", visible=False, elem_id="modelmerger_merged")  # "<name>:<job id>" after each merge

    dropdowns = [primary, secondary, tertiary]

    def model_updates() -> list:
        choices = _model_choices(webui)
        return [gr.update(choices=choices) for _ in dropdowns]

    def do_refresh():
        webui.refresh_checkpoints()
        webui.vaes.refresh()
        return [*model_updates(), gr.update(choices=_vae_choices(webui))]

    refresh.click(do_refresh, outputs=[*dropdowns, vae], show_progress="hidden")

    def do_merge(a, b, c, interp, m, checkpoint_format, save_as_half, name, config_index, bake_in_vae, discard_re,
                 save_meta, replace, request: gr.Request = None):
        from modules.core.jobs import JobStopped

        keep = [gr.update() for _ in range(1 + len(dropdowns))]
        req = merging.MergeRequest(
            primary_model_name=a or "", secondary_model_name=b, tertiary_model_name=c, interp_method=interp,
            multiplier=m, save_as_half=save_as_half, custom_name=name or "", checkpoint_format=checkpoint_format,
            config_source=config_index if config_index is not None else 0, bake_in_vae=bake_in_vae,
            discard_weights=discard_re or "", save_metadata=save_meta, overwrite=replace)
        try:
            job = merging.submit(webui, req, owner=owner_of(request))
        except ValueError as e:
            yield [_failed(str(e)), *keep]
            return
        while not job.done:
            yield [progress_html(job, job.textinfo or "Merging"), *keep]
            time.sleep(POLL_SECONDS)
        try:
            res = job.wait(0)
        except JobStopped:
            yield [_failed("The merge was stopped; nothing was written."), *keep]
            return
        except ValueError as e:
            yield [_failed(str(e)), *keep]
            return
        except Exception:
            import logging
            logging.getLogger("webui.ui").exception("merging failed")
            yield [_failed("The merge failed because of an error in the server (its log has the details)."), *keep]
            return
        info = webui.registry.find(str(res.path))
        yield [_saved_html(res, info), f"{info.name if info else res.path.name}:{job.id}", *model_updates()]

    merge.click(do_merge, inputs=[primary, secondary, tertiary, method, multiplier, fmt, half, custom_name,
                                  config_source, vae, discard, save_metadata, overwrite],
                outputs=[result, merged, *dropdowns])
    return merged
