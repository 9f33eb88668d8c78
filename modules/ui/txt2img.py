"""The txt2img tab: the shared prompt tools, A1111's controls (sampler, steps, hires fix, size, batch, CFG,
seeds) and the shared output panel. Thin: controls -> a Txt2ImgRequest -> a job -> the result. No torch here."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from modules.core import samplers
from modules.ui import common
from modules.ui import scripts as scripts_ui
from modules.ui.common import OutputPanel, PromptTools


@dataclass
class Txt2ImgTab:
    tools: PromptTools
    panel: OutputPanel
    components: dict  # request field name -> component, for "Send to txt2img"


def sampler_controls(tab: str):
    with gr.Row():
        sampler = gr.Dropdown(label="Sampling method", choices=samplers.sampler_names(),
                              value=samplers.DEFAULT_UI_SAMPLER, elem_id=f"{tab}_sampling")
        scheduler = gr.Dropdown(label="Schedule type", choices=samplers.schedule_type_labels(), value="Automatic",
                                elem_id=f"{tab}_scheduler")
    steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tab}_steps")
    return sampler, scheduler, steps


def batch_controls(tab: str):
    with gr.Row():
        batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{tab}_batch_count")
        batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tab}_batch_size")
    return batch_count, batch_size


def create_tab(webui) -> Txt2ImgTab:
    """The contents of the txt2img tab (built inside its gr.Tab)."""
    from modules import generation

    tools = common.prompt_tools(webui, "txt2img")
    with gr.Row():
        with gr.Column():
            sampler, scheduler, steps = sampler_controls("txt2img")
            with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr"):
                enable_hr = gr.Checkbox(label="Enable hires. fix", value=False, elem_id="txt2img_enable_hr")
                with gr.Row():
                    hr_upscaler = gr.Dropdown(label="Upscaler",
                                              choices=list(generation.HIRES_UPSCALERS) + webui.upscalers.model_names(),
                                              value="Latent", elem_id="txt2img_hr_upscaler")
                    hr_steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps", elem_id="txt2img_hires_steps")
                    hr_denoise = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                           elem_id="txt2img_denoising_strength")
                with gr.Row():
                    hr_scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
                    hr_resize_x = gr.Slider(0, 2048, value=0, step=8, label="Resize width to",
                                            elem_id="txt2img_hr_resize_x")
                    hr_resize_y = gr.Slider(0, 2048, value=0, step=8, label="Resize height to",
                                            elem_id="txt2img_hr_resize_y")
                with gr.Row():
                    # empty: the first pass's prompts; their <lora:...> tags set the hires pass's LoRAs
                    hr_prompt = gr.Textbox(label="Hires prompt", lines=2, elem_id="hires_prompt",
                                           placeholder="Prompt for hires fix pass. Leave empty to use the same "
                                                       "prompt as in first pass.")
                    hr_negative = gr.Textbox(label="Hires negative prompt", lines=2, elem_id="hires_neg_prompt",
                                             placeholder="Negative prompt for hires fix pass. Leave empty to use "
                                                         "the same negative prompt as in first pass.")
            for slider in (hr_resize_x, hr_resize_y):
                common.snap_to_step(slider, 8, 0, 2048)
            width, height = common.size_sliders("txt2img")
            batch_count, batch_size = batch_controls("txt2img")
            with gr.Row():
                cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
                distilled = gr.Slider(0, 30, value=3.5, step=0.5, label="Distilled CFG Scale",
                                      elem_id="txt2img_distilled_cfg_scale",
                                      info="FLUX only; keep CFG Scale at 1 with it")
            seeds = common.seed_controls("txt2img")
            script_ui = scripts_ui.script_controls(webui, is_img2img=False)
        with gr.Column():
            panel = common.output_panel("txt2img")
    seeds.wire(panel)

    inputs = [tools.prompt, tools.negative, tools.styles.dropdown, sampler, scheduler, steps, enable_hr, hr_upscaler,
              hr_steps, hr_denoise, hr_scale, hr_resize_x, hr_resize_y, width, height, batch_count, batch_size, cfg,
              seeds.seed, seeds.extra, seeds.subseed, seeds.subseed_strength, hr_prompt, hr_negative, distilled]
    own = len(inputs)
    inputs += script_ui.inputs

    def run(request: gr.Request, *values):
        from modules.ui.extra_networks import warnings_html
        (p, n, st, smp, sch, stp, ehr, hru, hrs, hrd, hrsc, hrx, hry, w, h, bc, bs, c, sd, ex, ss, sss, hrp,
         hrn, dc) = values[:own]
        w, h = (common.snap(v, common.SIZE_STEP, common.MIN_SIZE, common.MAX_SIZE) for v in (w, h))
        req = generation.Txt2ImgRequest(
            prompt=p or "", negative_prompt=n or "", styles=list(st or []), sampler_name=smp, scheduler=sch,
            steps=int(stp), enable_hr=bool(ehr), hr_upscaler=hru, hr_second_pass_steps=int(hrs),
            hr_prompt=hrp or "", hr_negative_prompt=hrn or "",
            denoising_strength=float(hrd), hr_scale=float(hrsc), hr_resize_x=int(hrx), hr_resize_y=int(hry),
            width=w, height=h, n_iter=int(bc), batch_size=int(bs), cfg_scale=float(c),
            distilled_cfg_scale=float(dc), seed=int(sd if sd is not None else -1), subseed=int(ss if (ex and ss is not None) else -1),
            subseed_strength=float(sss) if ex else 0.0, save_images=True)
        try:
            selection = script_ui.selection(webui, values[own:])
            job = webui.submit_txt2img(req, owner=common.owner_of(request), scripts=selection)
        except ValueError as e:
            yield panel.failed(str(e))
            return
        yield panel.started(job)
        yield from panel.follow(job, (w, h))
        try:
            result = job.wait()
        except Exception as e:  # a failed job, whatever the cause, is a notice: the UI keeps working
            yield panel.failed(common.job_error_message(e))
            return
        yield panel.finished(result, warnings_html(result.info.get("warnings"), "txt2img"))

    common.wire_job_controls(webui, run, inputs, tools, panel)
    components = dict(prompt=tools.prompt, negative_prompt=tools.negative, steps=steps, sampler_name=sampler,
                      scheduler=scheduler, cfg_scale=cfg, distilled_cfg_scale=distilled, seed=seeds.seed,
                      width=width, height=height, subseed=seeds.subseed, subseed_strength=seeds.subseed_strength, enable_hr=enable_hr,
                      hr_scale=hr_scale, hr_upscaler=hr_upscaler, hr_second_pass_steps=hr_steps,
                      denoising_strength=hr_denoise, batch_size=batch_size, hr_prompt=hr_prompt,
                      hr_negative_prompt=hr_negative, styles=tools.styles.dropdown)
    return Txt2ImgTab(tools, panel, components)
