"""The Gradio UI, laid out like A1111's: the checkpoint picker, then the tabs (txt2img, img2img, Caption, VQA,
Image search, PNG Info, Settings), and what crosses between them ("Send to", checkpoint switches, page load).
Each tab is built by its own module; what they share is in `common`. No torch here."""
from __future__ import annotations

import logging

import gradio as gr

from modules.core.options import OptionError
from modules.ui import captioning as captioning_ui
from modules.ui import common, pnginfo, settings, txt2img
from modules.ui import extensions as extensions_ui
from modules.ui import extras as extras_ui
from modules.ui import img2img as img2img_ui
from modules.ui import merger as merger_ui
from modules.ui import train as train_ui

log = logging.getLogger("webui.ui")

CSS = common.CSS
theme = common.theme


def js(webui=None) -> str:
    """The page's JS (built after the UI, which registers the icon buttons' tooltips), then the enabled
    extensions' javascript/*.js files."""
    parts = [common.js()]
    for ext in (webui.scripts.extensions if webui is not None else []):
        if ext.enabled:
            for path in ext.javascript:
                parts.append(f"// {ext.name}/{path.name}\n" + path.read_text(encoding="utf-8", errors="replace"))
    return "\n;\n".join(parts)


def css(webui=None) -> str:
    """The page's CSS and the enabled extensions' style.css."""
    parts = [CSS]
    for ext in (webui.scripts.extensions if webui is not None else []):
        if ext.enabled and ext.style is not None:
            parts.append(ext.style.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(parts)


def extension_tabs(webui) -> list[tuple]:
    """(blocks, title, id) of every on_ui_tabs callback (made before the page, rendered inside its tabs)."""
    tabs = []
    for entry, made in webui.scripts.callbacks.call("ui_tabs"):
        for item in made or []:
            try:
                blocks, title, elem_id = item[0], str(item[1]), str(item[2])
            except (TypeError, IndexError):
                webui.scripts.report_source(entry.source, None, f"on_ui_tabs returned {item!r}, not (blocks, title, id)")
                continue
            tabs.append((blocks, title, elem_id, entry.source))
    return tabs


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


def check_tab_strip(tabs: gr.Tabs) -> None:
    """Every child of a gr.Tabs must be a gr.Tab: Gradio's tab strip counts every child, so a component made
    between two tabs (a gr.State is enough) shifts the strip, and clicking a tab then renames another and adds
    duplicates. Fails at build time, naming the stray component, so a new tab (or an extension's) cannot ship
    that bug."""
    stray = [c for c in tabs.children if not isinstance(c, gr.Tab)]
    if stray:
        names = ", ".join(f"{type(c).__name__}(elem_id={getattr(c, 'elem_id', None)!r})" for c in stray)
        raise RuntimeError(f"components outside any tab of {tabs.elem_id!r}: {names}; make them inside a tab")


def create_ui(webui) -> gr.Blocks:
    # Checkpoints are listed by their display title: "name [hash]" once a file has been hashed, the bare name
    # before (listing a folder of multi-GB files must not hash them all at start-up, as in A1111). The value
    # shown is always one of the choices listed with it, so a switch never blanks the box.
    def checkpoint_update():
        info = webui.current_checkpoint()
        return gr.update(choices=[c.display_title for c in webui.registry.list()],
                         value=info.display_title if info else None)

    webui.scripts.callbacks.call("before_ui")
    added = extension_tabs(webui)
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
        banner = gr.Markdown(_banner(webui), elem_id="banner_notice", visible=bool(_banner(webui)))
        with gr.Row():
            current = webui.current_checkpoint()
            checkpoint = gr.Dropdown(label="Stable Diffusion checkpoint",
                                     choices=[c.display_title for c in webui.registry.list()],
                                     value=current.display_title if current else None,
                                     elem_id="setting_sd_model_checkpoint", scale=4, interactive=True,
                                     # a title picked just before the list gained hashes is still a name the
                                     # handler resolves: no "not in the list of choices" error for it
                                     allow_custom_value=True)
            refresh = common.icon_button("refresh_sd_model_checkpoint", "refresh",
                                         "Rescan the model folders for checkpoints")

        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                t2i = txt2img.create_tab(webui)
            with gr.Tab("img2img", id="img2img", elem_id="tab_img2img"):
                i2i = img2img_ui.create_tab(webui)
            extras_ui.create_tab(webui)  # Extras (upscaling)
            captioning_ui.create_tabs(webui)  # Caption, VQA, Image search
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                train_ended = train_ui.create_tab(webui)
            with gr.Tab("PNG Info", id="pnginfo", elem_id="tab_pnginfo"):
                png = pnginfo.create_tab()
            with gr.Tab("Checkpoint Merger", id="modelmerger", elem_id="tab_modelmerger"):
                merged = merger_ui.create_tab(webui)
            for blocks, title, elem_id, source in added:  # extensions' tabs (on_ui_tabs), as A1111 places them
                with gr.Tab(title, id=elem_id, elem_id=f"tab_{elem_id}"):
                    try:
                        blocks.render()
                    except Exception as e:  # a broken extension tab is reported, the page still builds
                        log.exception("extension tab %s failed", title)
                        webui.scripts.report_source(source, None, f"tab {title!r}: {type(e).__name__}: {e}")
                        gr.Markdown(f"**This extension's tab failed to build:** {type(e).__name__}: {e}")
            with gr.Tab("Settings", id="settings", elem_id="tab_settings"):
                settings_components = settings.create_tab(webui)
            with gr.Tab("Extensions", id="extensions", elem_id="tab_extensions"):
                extensions_ui.create_tab(webui)
        check_tab_strip(tabs)
        ready = gr.HTML("", elem_id="ui_ready", padding=False)
        panels = [t2i.tools.networks, i2i.tools.networks]

        def notices():
            text = _banner(webui)
            return gr.update(value=text, visible=bool(text))

        def on_refresh(*queries):
            webui.refresh_checkpoints()
            return [checkpoint_update(), notices()] + [p.render(webui, q) for p, q in zip(panels, queries)]

        refresh.click(on_refresh, inputs=[p.search for p in panels], outputs=[checkpoint, banner] + [p.html for p in panels])
        # a training run ended: its LoRA, embedding or checkpoint is listed at once
        train_ended.change(on_refresh, inputs=[p.search for p in panels],
                           outputs=[checkpoint, banner] + [p.html for p in panels], show_progress="hidden")
        # a merge saved a checkpoint: the checkpoint box lists it at once
        merged.change(on_refresh, inputs=[p.search for p in panels],
                      outputs=[checkpoint, banner] + [p.html for p in panels], show_progress="hidden")

        def on_page_load():
            # The page may be (re)loaded long after start-up: show the checkpoints, notices and settings in force
            # now (stale settings would be written back by the next Apply). One event, so #ui_ready marks them all.
            return ([checkpoint_update(), notices(), '<span data-ready="1"></span>']
                    + [settings.setting_update(webui, k) for k in settings_components]
                    + [p.render(webui) for p in panels])

        demo.load(on_page_load, outputs=[checkpoint, banner, ready] + list(settings_components.values())
                  + [p.html for p in panels], queue=False, show_progress="hidden")

        def on_checkpoint(title, *queries):
            if not title:
                return [gr.update(), gr.update()] + [gr.update() for _ in panels]
            try:
                updates = webui.normalize_settings({"sd_model_checkpoint": title}, from_api=False)
                webui.options.update(updates)
                webui.load_checkpoint_now(updates["sd_model_checkpoint"])
            except (ValueError, OptionError) as e:
                gr.Warning(str(e))
            except Exception as e:  # a broken file must not take the UI down
                log.exception("loading %s failed", title)
                gr.Warning(f"could not load {title}: {common.job_error_message(e)}")
            # loading hashed the file: its title now has the hash, in the value and in the choices alike
            return [checkpoint_update(), notices()] + [p.render(webui, q) for p, q in zip(panels, queries)]

        checkpoint.input(on_checkpoint, inputs=[checkpoint] + [p.search for p in panels],
                         outputs=[checkpoint, banner] + [p.html for p in panels])

        # PNG Info -> txt2img
        send_fields = list(t2i.components)

        def send_to_txt2img(text):
            fields = common.pasted_fields(webui, text or "")
            return [gr.Tabs(selected="txt2img")] + [gr.update(value=fields[n]) if n in fields else gr.update()
                                                    for n in send_fields]

        png.send_txt2img.click(send_to_txt2img, inputs=[png.text],
                               outputs=[tabs] + [t2i.components[n] for n in send_fields])
        for panel in (t2i.panel, i2i.panel):  # a result goes on to img2img / inpaint, from either tab
            img2img_ui.wire_send(webui, tabs, i2i, (panel.send_img2img, panel.send_inpaint), panel.gallery,
                                 panel.infotexts, panel.selected)
        img2img_ui.wire_send(webui, tabs, i2i, (png.send_img2img, png.send_inpaint), png.image, png.text)
    return demo
