"""What the generation tabs share, built once: the prompt tools (prompt boxes with token counters, Generate,
Interrupt and Skip, styles, extra networks), the seed rows, the output panel (progress, live preview over the
gallery, infotext, notices, "Send to" buttons) and the runner that follows a queued job for a tab; plus the
icon buttons with their tooltips, the upload components that survive a file that is not an image, and the
page's CSS and JS. No torch here.
"""
from __future__ import annotations

import html
import json
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import PIL.Image

ICONS = Path(__file__).resolve().parent / "icons"
MIN_SIZE, MAX_SIZE, SIZE_STEP = 64, 2048, 8
POLL_SECONDS = 0.25

# elem_id -> what the button does: its tooltip and accessible name (icon buttons have no text of their own)
TOOLTIPS: dict[str, str] = {}


def icon_button(elem_id: str, icon: str, tooltip: str, **kw) -> gr.Button:
    """A small button showing an SVG icon (renders without any emoji font), named by `tooltip` for screen
    readers and on hover."""
    TOOLTIPS[elem_id] = tooltip
    return gr.Button("", icon=str(ICONS / f"{icon}.svg"), elem_id=elem_id, elem_classes=["icon-button"],
                     scale=0, min_width=42, **kw)


CSS = """
.icon-button { max-width: 2.8em !important; min-width: 2.8em !important; padding: 0.35em !important; }
.icon-button img { width: 1.3em !important; height: 1.3em !important; margin: 0 !important; }
.generate-box button.primary { min-height: 4.5em; font-size: 1.1em; }
.token-counter { text-align: right; font-size: 0.8em; opacity: 0.75; margin: -0.6em 0.4em 0 0; }
.token-counter.over { color: #d33; opacity: 1; }
#banner_notice { border-left: 4px solid #f59e0b; padding: 0.4em 0.8em; }
.progress-bar { height: 0.7em; background: #f97316; border-radius: 0.3em; }
.progress-track { width: 100%; background: #3333; border-radius: 0.3em; }
.infotext { white-space: pre-wrap; font-family: monospace; font-size: 0.85em; }
.notice-error { color: #d33; }
.results { position: relative; }
.results .live-preview { position: absolute !important; inset: 0; z-index: 20; background: var(--block-background-fill); }
.results .live-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
.size-column { min-width: 180px; }
.extra-cards { display: flex; flex-wrap: wrap; gap: 0.6em; }
.extra-card { width: 9.5em; cursor: pointer; border: 1px solid var(--border-color-primary); border-radius: 0.5em;
  overflow: hidden; background: var(--block-background-fill); display: flex; flex-direction: column; }
.extra-card:hover { border-color: #f97316; }
.extra-card.active { outline: 3px solid #f97316; }
.extra-card .preview { height: 7em; display: flex; align-items: center; justify-content: center; font-size: 2em;
  background: var(--background-fill-secondary); color: var(--body-text-color-subdued); }
.extra-card .preview img { width: 100%; height: 100%; object-fit: cover; }
.extra-card .name { font-weight: 600; padding: 0.3em 0.5em 0 0.5em; word-break: break-all; }
.extra-card .kind { font-size: 0.8em; opacity: 0.7; padding: 0 0.5em 0.4em 0.5em; }
.extra-note { font-size: 0.85em; opacity: 0.75; margin-top: 0.4em; }
"""


def js() -> str:
    """The page's JS: Ctrl+Enter generates; extra-network cards add (or, clicked again, remove) their tag in
    the prompt; icon buttons get their tooltips and accessible names (re-applied when Gradio re-renders)."""
    return """
() => {
  const tips = %s;
  const label = () => {
    for (const [id, text] of Object.entries(tips)) {
      const el = document.getElementById(id);
      if (el && el.getAttribute('aria-label') !== text) { el.setAttribute('aria-label', text); el.setAttribute('title', text); }
    }
  };
  new MutationObserver(label).observe(document.body, {childList: true, subtree: true});
  label();
  document.addEventListener('keydown', (e) => {
    if (!(e.ctrlKey || e.metaKey) || e.key !== 'Enter') return;
    const box = e.target.closest('#txt2img_prompt, #txt2img_neg_prompt, #img2img_prompt, #img2img_neg_prompt');
    if (!box) return;
    e.preventDefault();
    const btn = document.querySelector('#' + box.id.split('_')[0] + '_generate');
    if (btn) btn.click();
  });
  const escape = (s) => s.replace(/[.*+?^${}()|[\\]\\\\]/g, '\\\\$&');
  const toggle = (text, card) => {
    const name = card.dataset.name;
    const pattern = card.dataset.kind === 'lora'
      ? new RegExp('(,\\\\s*)?<lora:' + escape(name) + '(:[^>]*)?>', 'i')
      : new RegExp('(,\\\\s*)?(?<![\\\\w-])' + escape(name) + '(?![\\\\w-])', 'i');
    if (pattern.test(text)) return text.replace(pattern, '').replace(/^\\s*,\\s*/, '');
    const trimmed = text.replace(/\\s+$/, '');
    return trimmed ? trimmed + (trimmed.endsWith(',') ? ' ' : ', ') + card.dataset.tag : card.dataset.tag;
  };
  document.addEventListener('click', (e) => {
    const card = e.target.closest('.extra-card');
    if (!card) return;
    const box = document.querySelector('#' + card.dataset.target + ' textarea');
    if (!box) return;
    box.value = toggle(box.value, card);
    box.dispatchEvent(new Event('input', {bubbles: true}));
  });
}
""" % json.dumps(TOOLTIPS)


def theme():
    return gr.themes.Default(primary_hue="orange")


# ----------------------------------------------------------------------------------------------- notices

def notice_html(message: str, elem_id: str | None = None) -> str:
    """A red notice under the output (the toast goes away; this stays until the next run)."""
    ident = f' id="{elem_id}"' if elem_id else ""
    return f'<div class="notice-error"{ident}>{html.escape(message)}</div>' if message else ""


def infotext_html(text: str) -> str:
    return f'<div class="infotext">{html.escape(text or "")}</div>'


def progress_html(job, label: str = "") -> str:
    if job is None:
        return ""
    pct = int(round(100 * (job.progress or 0)))
    eta = job.eta_relative
    if job.status == "queued":
        text = "Waiting in queue..."
    else:
        text = f"{pct}% (step {job.sampling_step or 0}/{job.sampling_steps or 0}" + (f", ETA {eta:.0f}s" if eta else "") + ")"
    head = f"<div>{html.escape(label)}</div>" if label else ""
    return (f'{head}<div class="progress-track"><div class="progress-bar" style="width:{pct}%"></div></div>'
            f'<div class="progress-text">{html.escape(text)}</div>')


def clean_text(text: str) -> str:
    """Text a model wrote, fit for a text box: control and other non-printing characters removed (random or
    broken captioners emit them), runs of whitespace folded."""
    kept = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text or "")
    return " ".join(kept.split())


def owner_of(request: gr.Request | None) -> str | None:
    return getattr(request, "username", None) if request is not None else None


# ----------------------------------------------------------------------------------- uploads that are not images

@dataclass(frozen=True)
class NotAnImage:
    """What an upload component hands a handler for a file that is not a readable image."""
    name: str

    @property
    def message(self) -> str:
        return f"not an image: {self.name}"


def _not_an_image(payload) -> NotAnImage:
    names = [getattr(payload, "orig_name", None), getattr(payload, "path", None)]
    background = getattr(payload, "background", None)  # an ImageEditor value
    if background is not None:
        names = [getattr(background, "orig_name", None), getattr(background, "path", None)] + names
    name = next((n for n in names if n), "the file")
    return NotAnImage(Path(str(name)).name)


def _tolerant(component):
    """Make `component` hand its handlers `NotAnImage` for a file PIL cannot read, instead of failing in Gradio's
    own preprocessing (whose message lists component types and server paths). Done on the instance: a subclass
    of a Gradio component would make Gradio write a .pyi file beside this module at import."""
    preprocess = component.preprocess

    def tolerant_preprocess(payload):
        try:
            return preprocess(payload)
        except (PIL.UnidentifiedImageError, OSError, ValueError, gr.Error):
            return _not_an_image(payload)

    component.preprocess = tolerant_preprocess
    return component


def UploadImage(**kw) -> gr.Image:  # noqa: N802  (used like the component class it stands for)
    """gr.Image that gives its handlers `NotAnImage` for a file that is not an image."""
    return _tolerant(gr.Image(**kw))


def UploadEditor(**kw) -> gr.ImageEditor:  # noqa: N802
    """gr.ImageEditor that gives its handlers `NotAnImage` for a file that is not an image."""
    return _tolerant(gr.ImageEditor(**kw))


def refuse_non_images(component, notice) -> None:
    """Clear `component` when a non-image file is uploaded into it, and say so in `notice`."""
    def check(value):
        if isinstance(value, NotAnImage):
            gr.Warning(value.message)
            return None, notice_html(value.message)
        return gr.update(), gr.update()
    component.upload(check, inputs=[component], outputs=[component, notice], queue=False, show_progress="hidden")


# --------------------------------------------------------------------------------------------- the prompt tools

@dataclass
class PromptTools:
    """The top of a generation tab: prompts with token counters, Generate / Interrupt / Skip, the styles
    controls and the extra-networks panel (LoRA and embedding cards)."""
    prompt: Any
    negative: Any
    generate: Any
    interrupt: Any
    skip: Any
    styles: Any  # styles_ui.StylesControls
    networks: Any  # extra_networks_ui.Panel
    side: Any  # the column beside the prompts, for a tab's own buttons (img2img's Interrogate)


def prompt_tools(webui, tab: str) -> PromptTools:
    """Build the prompt tools of `tab` ("txt2img" or "img2img") with A1111's element ids."""
    from modules.ui import extra_networks as networks_ui
    from modules.ui import styles as styles_ui

    with gr.Row():
        with gr.Column(scale=6):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id=f"{tab}_prompt",
                                placeholder="Prompt (press Ctrl+Enter to generate)")
            prompt_tokens = gr.HTML(networks_ui.token_counter_html(""), elem_id=f"{tab}_token_counter",
                                    padding=False)
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tab}_neg_prompt",
                                  placeholder="Negative prompt (press Ctrl+Enter to generate)")
            negative_tokens = gr.HTML(networks_ui.token_counter_html(""), elem_id=f"{tab}_negative_token_counter",
                                      padding=False)
        with gr.Column(scale=1, min_width=220, elem_classes=["generate-box"]) as side:
            generate = gr.Button("Generate", variant="primary", elem_id=f"{tab}_generate")
            with gr.Row():
                interrupt = gr.Button("Interrupt", elem_id=f"{tab}_interrupt", size="sm")
                skip = gr.Button("Skip", elem_id=f"{tab}_skip", size="sm")
            styles_row = styles_ui.StylesRow(webui, tab)
    styles = styles_ui.create(webui, tab, prompt, negative, styles_row)  # the editor: full width, below
    networks = networks_ui.panel(webui, tab, prompt)

    def counter(text):
        return networks_ui.token_counter_html(text, webui)

    prompt.change(counter, inputs=[prompt], outputs=[prompt_tokens], show_progress="hidden", queue=False)
    negative.change(counter, inputs=[negative], outputs=[negative_tokens], show_progress="hidden", queue=False)
    return PromptTools(prompt, negative, generate, interrupt, skip, styles, networks, side)


# ------------------------------------------------------------------------------------------- seed rows

@dataclass
class SeedControls:
    """Seed (random, reuse the selected image's) and, behind "Extra", the variation seed and its strength."""
    seed: Any
    random_seed: Any
    reuse_seed: Any
    extra: Any
    extra_row: Any
    subseed: Any
    subseed_strength: Any

    def wire(self, output: "OutputPanel") -> None:
        """♻ takes the seed (and variation seed) of the image selected in `output` (the first when none is)."""
        from modules.core import infotext

        def reuse(texts, index):
            texts = texts or []
            if not texts:
                return gr.update(), gr.update(), gr.update(), gr.update()
            i = index if isinstance(index, int) and 0 <= index < len(texts) else 0
            params = infotext.parse_infotext(texts[i])
            seed = infotext.to_int(params.get("Seed"))
            subseed = infotext.to_int(params.get("Variation seed"))
            strength = infotext.to_float(params.get("Variation seed strength"))
            if subseed is None:
                return (seed if seed is not None else gr.update()), gr.update(), gr.update(), gr.update()
            return seed, subseed, strength or 0.0, True

        self.extra.change(lambda v: gr.update(visible=v), inputs=[self.extra], outputs=[self.extra_row], queue=False)
        self.random_seed.click(lambda: -1, outputs=[self.seed], queue=False)
        self.reuse_seed.click(reuse, inputs=[output.infotexts, output.selected],
                              outputs=[self.seed, self.subseed, self.subseed_strength, self.extra], queue=False)


def seed_controls(tab: str) -> SeedControls:
    """The seed rows of a generation tab, with A1111's element ids (`txt2img_seed`, `img2img_subseed`, ...)."""
    with gr.Row():
        seed = gr.Number(label="Seed", value=-1, precision=0, elem_id=f"{tab}_seed", scale=4)
        random_seed = icon_button(f"{tab}_random_seed", "dice", "Random seed: set the seed to -1")
        reuse_seed = icon_button(f"{tab}_reuse_seed", "reuse", "Reuse the seed of the selected image")
        extra = gr.Checkbox(label="Extra", value=False, elem_id=f"{tab}_subseed_show", scale=1)
    with gr.Row(visible=False) as extra_row:
        subseed = gr.Number(label="Variation seed", value=-1, precision=0, elem_id=f"{tab}_subseed")
        subseed_strength = gr.Slider(0, 1, value=0, step=0.01, label="Variation strength",
                                     elem_id=f"{tab}_subseed_strength")
    return SeedControls(seed, random_seed, reuse_seed, extra, extra_row, subseed, subseed_strength)


def size_sliders(tab: str) -> tuple[Any, Any]:
    """Width and height (A1111's ids); a typed size snaps to the slider's step, as dragging does."""
    width = gr.Slider(MIN_SIZE, MAX_SIZE, value=512, step=SIZE_STEP, label="Width", elem_id=f"{tab}_width")
    height = gr.Slider(MIN_SIZE, MAX_SIZE, value=512, step=SIZE_STEP, label="Height", elem_id=f"{tab}_height")
    for slider in (width, height):
        snap_to_step(slider, SIZE_STEP, MIN_SIZE, MAX_SIZE)
    return width, height


def snap(value, step: int, low: int, high: int) -> int:
    value = 0 if value is None else float(value)
    return int(min(high, max(low, int(value / step + 0.5) * step)))  # halves up, as a range input rounds


def snap_to_step(slider, step: int, low: int, high: int) -> None:
    def on_change(value):
        snapped = snap(value, step, low, high)
        return gr.update() if value is not None and float(value) == snapped else snapped
    slider.change(on_change, inputs=[slider], outputs=[slider], queue=False, show_progress="hidden")


# -------------------------------------------------------------------------------------------- the output side

@dataclass
class OutputPanel:
    """The right-hand side of a generation tab. The live preview lies over the gallery, where the result will
    appear, at its size; errors show in `notice` and leave the last result in place."""
    progress: Any
    preview: Any
    gallery: Any
    info_html: Any
    notice: Any
    send_img2img: Any
    send_inpaint: Any
    job: Any  # gr.State: the running job's id
    infotexts: Any  # gr.State: one infotext per gallery image
    selected: Any  # gr.State: the index of the image picked in the gallery

    @property
    def outputs(self) -> list:
        return [self.job, self.progress, self.preview, self.gallery, self.infotexts, self.info_html, self.notice]

    def failed(self, message: str) -> dict:
        """A run that did not produce images: the message, and the last result left as it was."""
        gr.Warning(message)
        return {self.progress: "", self.preview: gr.update(visible=False), self.job: None,
                self.notice: notice_html(message, f"{self.gallery.elem_id.split('_')[0]}_error_notice")}

    def started(self, job) -> dict:
        return {self.job: job.id, self.progress: progress_html(job), self.notice: "",
                self.preview: gr.update(visible=False)}

    def follow(self, job, size: tuple[int, int], label: str = ""):
        """Progress and live-preview updates while `job` runs (the cheap latent preview, upscaled to `size`)."""
        last = None
        while job.status in ("queued", "running"):
            time.sleep(POLL_SECONDS)
            update = {self.progress: progress_html(job, label)}
            current = job.current_image
            if current is not None and current is not last:
                last = current
                update[self.preview] = gr.update(value=current.resize(size, PIL.Image.Resampling.NEAREST),
                                                 visible=True)
            yield update

    def finished(self, result, notice: str = "") -> dict:
        first = min(result.grid_count, len(result.infotexts) - 1)  # a script's answer may be its grid alone
        return {self.gallery: [(im, None) for im in result.images], self.infotexts: result.infotexts,
                self.info_html: infotext_html(result.infotexts[first] if result.infotexts else ""),
                self.progress: "", self.preview: gr.update(visible=False), self.job: None, self.notice: notice}


def output_panel(tab: str) -> OutputPanel:
    """(progress, live preview over the gallery, infotext, notice, Send to buttons) with A1111's element ids."""
    progress = gr.HTML("", elem_id=f"{tab}_progress")
    with gr.Column(elem_classes=["results"], elem_id=f"{tab}_results"):
        gallery = gr.Gallery(label="Output", format="png", columns=4, height=512, elem_id=f"{tab}_gallery",
                             interactive=False)
        preview = gr.Image(label="Live preview", type="pil", format="png", interactive=False, visible=False,
                           elem_id=f"{tab}_preview", elem_classes=["live-preview"], height=512,
                           show_label=False)
    with gr.Row():
        send_img2img = gr.Button("Send to img2img", elem_id=f"{tab}_send_to_img2img", size="sm")
        send_inpaint = gr.Button("Send to inpaint", elem_id=f"{tab}_send_to_inpaint", size="sm")
    info_html = gr.HTML("", elem_id=f"html_info_{tab}")
    notice = gr.HTML("", elem_id=f"{tab}_error")
    job, infotexts, selected = gr.State(None), gr.State([]), gr.State(0)
    gallery.select(_selected_index, outputs=[selected], queue=False, show_progress="hidden")
    gallery.change(lambda: 0, outputs=[selected], queue=False, show_progress="hidden")
    return OutputPanel(progress, preview, gallery, info_html, notice, send_img2img, send_inpaint, job, infotexts,
                       selected)


def _selected_index(evt: gr.SelectData):
    return evt.index if isinstance(evt.index, int) else 0


def wire_job_controls(webui, run: Callable, inputs: list, tools: PromptTools, panel: OutputPanel) -> None:
    """Generate (and Enter in the prompt) runs `run`; Interrupt and Skip act on the tab's running job; a click
    on a gallery image shows that image's infotext."""
    tools.generate.click(run, inputs=inputs, outputs=panel.outputs, concurrency_limit=None)
    tools.prompt.submit(run, inputs=inputs, outputs=panel.outputs, concurrency_limit=None)

    def stop(job_id, how):
        job = webui.queue.get(job_id) if job_id else None
        if job is not None:
            job.interrupt() if how == "interrupt" else job.skip()

    tools.interrupt.click(lambda j: stop(j, "interrupt"), inputs=[panel.job], queue=False)
    tools.skip.click(lambda j: stop(j, "skip"), inputs=[panel.job], queue=False)

    def show_info(texts, evt: gr.SelectData):
        if texts and isinstance(evt.index, int) and 0 <= evt.index < len(texts):
            return infotext_html(texts[evt.index])
        return gr.update()

    panel.gallery.select(show_info, inputs=[panel.infotexts], outputs=[panel.info_html], queue=False)


# ----------------------------------------------------------------------------------------------- send to

SEED_FIELDS = ("seed", "subseed", "subseed_strength")
SIZE_FIELDS = ("width", "height")


def sendable_fields(webui, fields: dict) -> dict:
    """What "Send to" carries of an infotext's fields: the seeds only with the `send_seed` setting, the size only
    with `send_size` (A1111's two settings; both on by default)."""
    drop = (() if webui.options.get("send_seed") else SEED_FIELDS) + (() if webui.options.get("send_size") else
                                                                      SIZE_FIELDS)
    return {k: v for k, v in fields.items() if k not in drop}


def pasted_fields(webui, text: str) -> dict:
    """An infotext as request fields for "Send to": parsed, the styles it names selected and their text taken
    back out of the prompts (A1111), and what the send settings leave out left out."""
    from modules.core import infotext
    fields = infotext.infotext_to_txt2img_fields(infotext.parse_infotext(text or ""))
    if fields.get("styles"):
        prompt, negative, found = webui.styles.extract(fields.get("prompt", ""), fields.get("negative_prompt", ""),
                                                       fields["styles"])
        fields.update(prompt=prompt, negative_prompt=negative, styles=found)
    return sendable_fields(webui, fields)


def job_error_message(exc: BaseException) -> str:
    """What a person is told when a job failed: the service's own message for a request it refused (those
    say what to change), a plain sentence otherwise; the details (type, traceback, paths) go to the log."""
    import logging
    import sys

    from modules.core.jobs import JobStopped
    if isinstance(exc, JobStopped):
        return "Stopped before an image was made."
    manager = sys.modules.get("modules.model_store.model_manager")
    if isinstance(exc, ValueError) or (manager is not None and isinstance(exc, manager.ModelOutOfMemoryError)):
        return str(exc)
    logging.getLogger("webui.ui").error("a job failed", exc_info=exc)
    return "Generation failed because of an error in the server (its log has the details)."
