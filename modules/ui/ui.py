"""The Gradio UI, laid out like A1111's: checkpoint picker, txt2img, img2img, PNG Info, Settings. No torch here."""
from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from typing import Any

import gradio as gr

from modules import infotext, samplers
from modules.options import OptionError
from modules.ui import captioning as captioning_ui
from modules.ui import img2img as img2img_ui

log = logging.getLogger("webui.ui")

CSS = """
#txt2img_generate { min-height: 4.5em; font-size: 1.1em; }
.token-counter { text-align: right; font-size: 0.85em; opacity: 0.75; margin-top: -0.4em; }
.token-counter.over { color: #d33; opacity: 1; }
#banner_notice { border-left: 4px solid #f59e0b; padding: 0.4em 0.8em; }
#txt2img_progress .progress-bar, #img2img_progress .progress-bar { height: 0.7em; background: #f97316; border-radius: 0.3em; }
#txt2img_progress .progress-track, #img2img_progress .progress-track { width: 100%; background: #3333; border-radius: 0.3em; }
.infotext { white-space: pre-wrap; font-family: monospace; font-size: 0.85em; }
"""

# Ctrl+Enter in a prompt box clicks that tab's Generate, as in A1111.
JS = """
() => {
  document.addEventListener('keydown', (e) => {
    if (!(e.ctrlKey || e.metaKey) || e.key !== 'Enter') return;
    const box = e.target.closest('#txt2img_prompt, #txt2img_neg_prompt, #img2img_prompt, #img2img_neg_prompt');
    if (!box) return;
    e.preventDefault();
    const tab = box.id.startsWith('img2img') ? 'img2img' : 'txt2img';
    const btn = document.querySelector('#' + tab + '_generate');
    if (btn) btn.click();
  });
}
"""


def theme():
    return gr.themes.Default(primary_hue="orange")




def _token_counter_html(text: str, webui=None) -> str:
    from modules.ui.extra_networks import token_counter_html  # per chunk: BREAK, long prompts, tags, embeddings
    return token_counter_html(text, webui)


def _progress_html(job) -> str:
    if job is None:
        return ""
    pct = int(round(100 * (job.progress or 0)))
    eta = job.eta_relative
    eta_text = f", ETA {eta:.0f}s" if eta else ""
    step = f"step {job.sampling_step or 0}/{job.sampling_steps or 0}"
    if job.status == "queued":
        label = "Waiting in queue..."
    else:
        label = f"{pct}% ({step}{eta_text})"
    return (f'<div class="progress-track"><div class="progress-bar" style="width:{pct}%"></div></div>'
            f'<div class="progress-text">{html.escape(label)}</div>')


def _infotext_html(text: str) -> str:
    return f'<div class="infotext">{html.escape(text or "")}</div>'


def _banner(webui) -> str:
    parts = []
    if webui.args.demo:
        parts.append("**Demo mode:** the demo checkpoints have random weights, so images are coloured noise. "
                     "Put a real checkpoint in `models/Stable-diffusion/` for real pictures.")
    for name, why in webui.registry.unusable().items():
        parts.append(f"**Skipped checkpoint `{name}`:** it cannot be loaded ({why}). The next one in the list is "
                     "used instead.")
    if not webui.registry.list():
        parts.append(f"**No checkpoint found.** Put a `.safetensors` or `.ckpt` Stable Diffusion checkpoint (or a "
                     f"diffusers folder) in `{webui.folders.checkpoint_dirs[0]}` and press the refresh button, or "
                     "start with `--demo` to try the UI with tiny random-weight models.")
    return "\n\n".join(parts)


def create_ui(webui) -> gr.Blocks:
    from modules import generation_params as generation

    # Display titles show "name [hash]" once a file has been hashed and the bare name before: listing a folder
    # of multi-GB checkpoints must not hash them all at start-up (as A1111 does).
    def checkpoint_choices():
        return [c.display_title for c in webui.registry.list()]

    def current_checkpoint_title():
        info = webui.current_checkpoint()
        return info.display_title if info else None

    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
        banner = gr.Markdown(_banner(webui), elem_id="banner_notice", visible=bool(_banner(webui)))
        with gr.Row():
            checkpoint = gr.Dropdown(label="Stable Diffusion checkpoint", choices=checkpoint_choices(),
                                     value=current_checkpoint_title(), elem_id="setting_sd_model_checkpoint",
                                     scale=4, interactive=True)
            refresh = gr.Button("🔄", elem_id="refresh_sd_model_checkpoint", scale=0, min_width=50)

        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                t2i = _txt2img_tab(webui, generation)
            i2i = img2img_ui.create_tab(webui, tabs)  # img2img, sketch, inpaint, ..., batch
            captioning_ui.create_tabs(webui)  # Caption, VQA, Image search
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png = _pnginfo_tab()
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                settings_components = _settings_tab(webui)
        ready = gr.HTML("", elem_id="ui_ready", padding=False)

        def on_refresh():
            webui.refresh_checkpoints()
            text = _banner(webui)
            return (gr.update(choices=checkpoint_choices(), value=current_checkpoint_title()),
                    gr.update(value=text, visible=bool(text)))

        refresh.click(on_refresh, outputs=[checkpoint, banner])

        def on_page_load():
            # The page may be (re)loaded long after start-up: show the checkpoints, notices and settings in force
            # now (stale settings would be written back by the next Apply). One event, so #ui_ready marks them all.
            text = _banner(webui)
            return [gr.update(choices=checkpoint_choices(), value=current_checkpoint_title()),
                    gr.update(value=text, visible=bool(text)),
                    '<span data-ready="1"></span>'] + [_setting_update(webui, k) for k in settings_components] \
                + t2i["styles"].load()  # style choices as in styles.csv now

        demo.load(on_page_load, outputs=[checkpoint, banner, ready] + list(settings_components.values())
                  + t2i["styles"].outputs, queue=False, show_progress="hidden")

        def on_checkpoint(title):
            if not title:
                return gr.update()
            try:
                updates = webui.normalize_settings({"sd_model_checkpoint": title}, from_api=False)
                webui.options.update(updates)
                webui.load_checkpoint_now(updates["sd_model_checkpoint"])
            except (ValueError, OptionError) as e:
                raise gr.Error(str(e)) from None
            except Exception as e:  # a broken file must not take the UI down
                log.exception("loading %s failed", title)
                raise gr.Error(f"could not load {title}: {e}") from None
            return gr.update(value=current_checkpoint_title())

        checkpoint.input(on_checkpoint, inputs=[checkpoint], outputs=[checkpoint])

        # PNG Info -> txt2img
        def send_to_txt2img(text):
            fields = sendable_fields(webui, infotext.infotext_to_txt2img_fields(infotext.parse_infotext(text or "")))
            values = []
            for name, _ in t2i["send_fields"]:
                values.append(gr.update(value=fields[name]) if name in fields else gr.update())
            return [gr.Tabs(selected="txt2img")] + values

        png["send"].click(send_to_txt2img, inputs=[png["text"]],
                          outputs=[tabs] + [t2i["components"][n] for n, _ in t2i["send_fields"]])
        img2img_ui.wire_send(webui, i2i, t2i["send_img2img"], t2i["gallery"], t2i["infotexts"], t2i["selected"])
        img2img_ui.wire_send(webui, i2i, png["send_img2img"], png["image"], png["text"])
    return demo


SEED_FIELDS = ("seed", "subseed", "subseed_strength")
SIZE_FIELDS = ("width", "height")


def sendable_fields(webui, fields: dict) -> dict:
    """What "Send to" carries of an infotext's fields: the seeds only with the `send_seed` setting, the size only
    with `send_size` (A1111's two settings; both on by default)."""
    drop = (() if webui.options.get("send_seed") else SEED_FIELDS) + (() if webui.options.get("send_size") else
                                                                      SIZE_FIELDS)
    return {k: v for k, v in fields.items() if k not in drop}


def _txt2img_tab(webui, generation):
    sampler_names = [s.name for s in samplers.SAMPLERS]
    schedule_names = [s.label if hasattr(s, "label") else s for s in samplers.SCHEDULE_TYPES]
    with gr.Row():
        with gr.Column(scale=6):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Prompt (press Ctrl+Enter to generate)",
                                elem_id="txt2img_prompt")
            prompt_tokens = gr.HTML(_token_counter_html(""), elem_id="txt2img_token_counter")
            negative = gr.Textbox(label="Negative prompt", lines=2, placeholder="Negative prompt",
                                  elem_id="txt2img_neg_prompt")
            negative_tokens = gr.HTML(_token_counter_html(""), elem_id="txt2img_negative_token_counter")
            from modules.ui import extra_networks as extra_networks_ui
            extra_networks_ui.panel(webui, prompt)
        with gr.Column(scale=1, min_width=160):
            generate = gr.Button("Generate", variant="primary", elem_id="txt2img_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id="txt2img_interrupt", size="sm")
                skip = gr.Button("Skip", elem_id="txt2img_skip", size="sm")
            from modules.ui import styles as styles_ui
            style_controls = styles_ui.create(webui, prompt, negative)  # dropdown, apply button, style editor
            styles = style_controls.dropdown

    with gr.Row():
        with gr.Column():
            with gr.Row():
                sampler = gr.Dropdown(label="Sampling method", choices=sampler_names,
                                      value=samplers.DEFAULT_UI_SAMPLER, elem_id="txt2img_sampling")
                scheduler = gr.Dropdown(label="Schedule type", choices=schedule_names, value="Automatic",
                                        elem_id="txt2img_scheduler")
            steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps")
            with gr.Accordion("Hires. fix", open=False, elem_id="txt2img_hr"):
                enable_hr = gr.Checkbox(label="Enable hires. fix", value=False, elem_id="txt2img_enable_hr")
                with gr.Row():
                    hr_upscaler = gr.Dropdown(label="Upscaler", choices=list(generation.HIRES_UPSCALERS),
                                              value="Latent", elem_id="txt2img_hr_upscaler")
                    hr_steps = gr.Slider(0, 150, value=0, step=1, label="Hires steps", elem_id="txt2img_hires_steps")
                    hr_denoise = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                           elem_id="txt2img_denoising_strength")
                with gr.Row():
                    hr_scale = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale")
                    hr_resize_x = gr.Slider(0, 2048, value=0, step=8, label="Resize width to", elem_id="txt2img_hr_resize_x")
                    hr_resize_y = gr.Slider(0, 2048, value=0, step=8, label="Resize height to", elem_id="txt2img_hr_resize_y")
                with gr.Row():
                    # empty: the first pass's prompts; their <lora:...> tags set the hires pass's LoRAs
                    hr_prompt = gr.Textbox(label="Hires prompt", lines=2, elem_id="hires_prompt",
                                           placeholder="Prompt for hires fix pass. Leave empty to use the same prompt as in first pass.")
                    hr_negative = gr.Textbox(label="Hires negative prompt", lines=2, elem_id="hires_neg_prompt",
                                             placeholder="Negative prompt for hires fix pass. Leave empty to use the same negative prompt as in first pass.")
            with gr.Row():
                with gr.Column(scale=4):
                    width = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id="txt2img_width")
                    height = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id="txt2img_height")
                with gr.Column(scale=1, min_width=120):
                    batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id="txt2img_batch_count")
                    batch_size = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id="txt2img_batch_size")
            cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale")
            seeds = seed_controls("txt2img")
            seed, extra, subseed, subseed_strength = seeds.seed, seeds.extra, seeds.subseed, seeds.subseed_strength
        with gr.Column():
            progress, preview, gallery, info_html = output_panel("txt2img")
            send_img2img = img2img_ui.send_buttons("txt2img")
            error_html = gr.HTML("", elem_id="txt2img_error")

    job_state = gr.State(None)
    infotexts_state = gr.State([])
    seed_state = gr.State(-1)

    def counter(text):
        return _token_counter_html(text, webui)

    prompt.change(counter, inputs=[prompt], outputs=[prompt_tokens], show_progress="hidden", queue=False)
    negative.change(counter, inputs=[negative], outputs=[negative_tokens], show_progress="hidden", queue=False)
    seeds.wire(seed_state)

    inputs = [prompt, negative, styles, sampler, scheduler, steps, enable_hr, hr_upscaler, hr_steps, hr_denoise,
              hr_scale, hr_resize_x, hr_resize_y, width, height, batch_count, batch_size, cfg, seed, extra, subseed,
              subseed_strength, hr_prompt, hr_negative]

    def run(request: gr.Request, *values):
        (p, n, st, smp, sch, stp, ehr, hru, hrs, hrd, hrsc, hrx, hry, w, h, bc, bs, c, sd, ex, ss, sss, hrp,
         hrn) = values
        req = generation.Txt2ImgRequest(
            prompt=p or "", negative_prompt=n or "", styles=list(st or []), sampler_name=smp, scheduler=sch,
            steps=int(stp), enable_hr=bool(ehr), hr_upscaler=hru, hr_second_pass_steps=int(hrs),
            hr_prompt=hrp or "", hr_negative_prompt=hrn or "",
            denoising_strength=float(hrd), hr_scale=float(hrsc), hr_resize_x=int(hrx), hr_resize_y=int(hry),
            width=int(w), height=int(h), n_iter=int(bc), batch_size=int(bs), cfg_scale=float(c),
            seed=int(sd if sd is not None else -1), subseed=int(ss if (ex and ss is not None) else -1),
            subseed_strength=float(sss) if ex else 0.0, save_images=True)
        owner = getattr(request, "username", None) if request is not None else None
        try:
            job = webui.submit_txt2img(req, owner=owner)
        except ValueError as e:
            # shown under the gallery as well as in the toast, as a failed job's error is
            yield {progress: "", preview: gr.update(visible=False),
                   error_html: f'<div class="error">{html.escape(str(e))}</div>'}
            raise gr.Error(str(e)) from None
        yield {job_state: job.id, progress: _progress_html(job), error_html: "", preview: gr.update(visible=False)}
        last_preview = None
        while job.status in ("queued", "running"):
            time.sleep(0.25)
            update = {progress: _progress_html(job)}
            if job.current_image is not None and job.current_image is not last_preview:
                last_preview = job.current_image
                update[preview] = gr.update(value=last_preview, visible=True)
            yield update
        try:
            result = job.wait()
        except ValueError as e:
            yield {progress: "", preview: gr.update(visible=False),
                   error_html: f'<div class="error">{html.escape(str(e))}</div>'}
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("txt2img job %s failed", job.id)
            yield {progress: "", preview: gr.update(visible=False),
                   error_html: f'<div class="error">{html.escape(str(e))}</div>'}
            raise gr.Error(f"Generation failed: {e}") from None
        first = result.grid_count
        yield {
            gallery: [(im, None) for im in result.images],
            infotexts_state: result.infotexts,
            info_html: _infotext_html(result.infotexts[first] if result.infotexts else ""),
            seed_state: result.info.get("seed", -1),
            progress: "", preview: gr.update(visible=False), job_state: None,
            error_html: extra_networks_ui.warnings_html(result.info.get("warnings")),  # ignored prompt tags
        }

    wire_job_controls(webui, run, inputs, [job_state, progress, preview, gallery, infotexts_state, info_html,
                                           seed_state, error_html],
                      generate=generate, prompt=prompt, interrupt=interrupt, skip=skip, job_state=job_state,
                      gallery=gallery, infotexts_state=infotexts_state, info_html=info_html)

    components = dict(prompt=prompt, negative_prompt=negative, steps=steps, sampler_name=sampler,
                      scheduler=scheduler, cfg_scale=cfg, seed=seed, width=width, height=height,
                      subseed=subseed, subseed_strength=subseed_strength, enable_hr=enable_hr,
                      hr_scale=hr_scale, hr_upscaler=hr_upscaler, hr_second_pass_steps=hr_steps,
                      denoising_strength=hr_denoise, batch_size=batch_size, hr_prompt=hr_prompt,
                      hr_negative_prompt=hr_negative)
    send_fields = [(name, None) for name in components]
    return {"components": components, "send_fields": send_fields, "styles": style_controls,
            "send_img2img": send_img2img, "gallery": gallery, "infotexts": infotexts_state,
            "selected": img2img_ui.gallery_selection(gallery)}


@dataclass
class SeedControls:
    """Seed (🎲 random, ♻️ reuse the last) and, behind "Extra", the variation seed and its strength."""
    seed: Any
    random_seed: Any
    reuse_seed: Any
    extra: Any
    extra_row: Any
    subseed: Any
    subseed_strength: Any

    def wire(self, last_seed_state) -> None:
        self.extra.change(lambda v: gr.update(visible=v), inputs=[self.extra], outputs=[self.extra_row], queue=False)
        self.random_seed.click(lambda: -1, outputs=[self.seed], queue=False)
        self.reuse_seed.click(lambda s: s, inputs=[last_seed_state], outputs=[self.seed], queue=False)


def seed_controls(tab: str) -> SeedControls:
    """The seed rows of a generation tab, with A1111's element ids (`txt2img_seed`, `img2img_subseed`, ...)."""
    with gr.Row():
        seed = gr.Number(label="Seed", value=-1, precision=0, elem_id=f"{tab}_seed", scale=4)
        random_seed = gr.Button("🎲️", elem_id=f"{tab}_random_seed", scale=0, min_width=40)
        reuse_seed = gr.Button("♻️", elem_id=f"{tab}_reuse_seed", scale=0, min_width=40)
        extra = gr.Checkbox(label="Extra", value=False, elem_id=f"{tab}_subseed_show", scale=1)
    with gr.Row(visible=False) as extra_row:
        subseed = gr.Number(label="Variation seed", value=-1, precision=0, elem_id=f"{tab}_subseed")
        subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                     elem_id=f"{tab}_subseed_strength")
    return SeedControls(seed, random_seed, reuse_seed, extra, extra_row, subseed, subseed_strength)


def output_panel(tab: str):
    """(progress, live preview, gallery, infotext) of a generation tab, with A1111's element ids."""
    progress = gr.HTML("", elem_id=f"{tab}_progress")
    preview = gr.Image(label="Live preview", type="pil", format="png", interactive=False, visible=False,
                       elem_id=f"{tab}_preview", height=256)
    gallery = gr.Gallery(label="Output", format="png", columns=4, height=512, elem_id=f"{tab}_gallery",
                         interactive=False)
    info_html = gr.HTML("", elem_id=f"html_info_{tab}")
    return progress, preview, gallery, info_html


def wire_job_controls(webui, run, inputs, outputs, *, generate, prompt, interrupt, skip, job_state, gallery,
                      infotexts_state, info_html) -> None:
    """The controls every generation tab shares: Generate (and Enter in the prompt) runs `run`, Interrupt and
    Skip act on the tab's running job, and a click on a gallery image shows that image's infotext."""
    generate.click(run, inputs=inputs, outputs=outputs, concurrency_limit=None)
    prompt.submit(run, inputs=inputs, outputs=outputs, concurrency_limit=None)

    def stop(job_id, how):
        job = webui.queue.get(job_id) if job_id else None
        if job is not None:
            job.interrupt() if how == "interrupt" else job.skip()

    interrupt.click(lambda j: stop(j, "interrupt"), inputs=[job_state], queue=False)
    skip.click(lambda j: stop(j, "skip"), inputs=[job_state], queue=False)

    def show_info(texts, evt: gr.SelectData):
        if texts and 0 <= evt.index < len(texts):
            return _infotext_html(texts[evt.index])
        return gr.update()

    gallery.select(show_info, inputs=[infotexts_state], outputs=[info_html], queue=False)


def _pnginfo_tab():
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="pil", format="png", elem_id="pnginfo_image", sources=["upload"])
        with gr.Column():
            info = gr.HTML(elem_id="pnginfo_html")
            text = gr.Textbox(visible=False, elem_id="pnginfo_generation_info")
            send = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
            send_img2img = img2img_ui.send_buttons("pnginfo")

    def read(img):
        if img is None:
            return "", ""
        raw = infotext.read_image_infotext(img)
        items = infotext.png_info_items(img)
        if not raw and not items:
            return '<div class="infotext">No generation parameters found in this image.</div>', ""
        parts = []
        if raw:
            parts.append(f'<p><b>parameters</b></p>{_infotext_html(raw)}')
        for k, v in items.items():
            if k != "parameters":
                parts.append(f"<p><b>{html.escape(str(k))}</b></p>{_infotext_html(str(v))}")
        return "".join(parts), raw or ""

    image.change(read, inputs=[image], outputs=[info, text])
    return {"image": image, "text": text, "send": send, "send_img2img": send_img2img}


def _setting_update(webui, key: str):
    """A setting's current value for its component; a setting whose choices change (the VAE files) gets them anew."""
    spec, value = webui.options.specs[key], webui.options.get(key)
    if callable(spec.choices):
        return gr.update(choices=list(spec.choices()), value=value)
    return value


def _settings_tab(webui):
    hide_dirs = bool(getattr(webui.args, "hide_ui_dir_config", False))  # server paths stay off the UI then
    specs = {k: s for k, s in webui.options.specs.items()
             if s.ui and not (hide_dirs and s.section == "Paths for saving")}
    comps = {}
    sections: dict[str, list[str]] = {}
    for key, spec in specs.items():
        sections.setdefault(spec.section, []).append(key)
    apply = gr.Button("Apply settings", variant="primary", elem_id="settings_submit")
    result = gr.HTML(elem_id="settings_result")
    for section, keys in sections.items():
        with gr.Accordion(section, open=True):
            for key in keys:
                spec = specs[key]
                value = webui.options.get(key)  # refreshed on every page load (create_ui's on_page_load)
                elem_id = f"setting_{key}"
                choices = spec.choices() if callable(spec.choices) else spec.choices
                if spec.type is bool:
                    comps[key] = gr.Checkbox(label=spec.label, value=value, elem_id=elem_id)
                elif choices:
                    comps[key] = gr.Dropdown(label=spec.label, choices=list(choices), value=value, elem_id=elem_id)
                elif spec.type in (int, float) and spec.minimum is not None and spec.maximum is not None:
                    comps[key] = gr.Slider(spec.minimum, spec.maximum, value=value,
                                           step=1 if spec.type is int else 0.01, label=spec.label, elem_id=elem_id)
                elif spec.type in (int, float):
                    comps[key] = gr.Number(label=spec.label, value=value, precision=0 if spec.type is int else None,
                                           elem_id=elem_id)
                else:
                    comps[key] = gr.Textbox(label=spec.label, value=value, elem_id=elem_id)
    keys = list(comps)

    def save(*values):
        updates = {}
        for k, v in zip(keys, values):
            if specs[k].type is int and v is not None:
                v = int(v)
            updates[k] = v
        try:
            changed = webui.options.update(updates)
        except (OptionError, ValueError) as e:
            raise gr.Error(str(e)) from None
        return f"{len(changed)} settings changed: {', '.join(changed) or 'none'}."

    apply.click(save, inputs=[comps[k] for k in keys], outputs=[result])
    return comps
