"""The txt2img styles controls: the Styles dropdown, the button that writes the selected styles into the
prompt boxes (A1111's "apply styles"), and the style editor (name, prompt, negative prompt; save, delete)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from modules.styles import PromptStyle, UnknownStyleError


def _notice(text: str, ok: bool = False) -> str:
    cls = "style-notice" if ok else "style-notice error"
    return f'<div class="{cls}">{html.escape(text)}</div>'


@dataclass
class StylesControls:
    """What the tab needs: `dropdown` (the selection generation applies), and for the page-load event
    the components whose choices `load()` refreshes (the page config is built once, styles change later)."""

    dropdown: gr.Dropdown
    outputs: list
    load: Callable[[], list]


def create(webui, prompt: gr.Textbox, negative: gr.Textbox) -> StylesControls:
    """Build the controls where they are called (the column beside the prompts) and wire them to the
    txt2img prompt boxes."""
    db = webui.styles
    with gr.Row(elem_id="txt2img_styles_row"):
        dropdown = gr.Dropdown(label="Styles", choices=db.names(), multiselect=True, elem_id="txt2img_styles",
                               scale=4)
        apply = gr.Button("🖌️", elem_id="txt2img_style_apply", scale=0, min_width=40)
    with gr.Accordion("Edit styles", open=False, elem_id="txt2img_style_editor"):
        name = gr.Dropdown(label="Style name", choices=db.names(), value=None, allow_custom_value=True,
                           interactive=True, elem_id="txt2img_style_name")
        style_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="txt2img_style_prompt")
        style_negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="txt2img_style_neg_prompt")
        with gr.Row():
            copy = gr.Button("Copy from prompts", size="sm", elem_id="txt2img_style_copy")
            save = gr.Button("Save", size="sm", variant="primary", elem_id="txt2img_style_save")
            delete = gr.Button("Delete", size="sm", variant="stop", elem_id="txt2img_style_delete")
    notice = gr.HTML("", elem_id="txt2img_styles_notice")

    def choices_updates(selected):
        """New choices for both dropdowns; a selected style that no longer exists leaves the selection."""
        names = db.names()
        kept = [s for s in (selected or []) if s in names]
        return gr.update(choices=names, value=kept), names

    def on_apply(selected, text, negative_text):
        if not selected:
            return gr.update(), gr.update(), gr.update(), _notice("Select one or more styles to apply first.")
        try:
            new_prompt, new_negative = db.apply(text or "", negative_text or "", selected)
        except UnknownStyleError as e:
            return gr.update(), gr.update(), gr.update(), _notice(str(e))
        return new_prompt, new_negative, gr.update(value=[]), ""

    def on_name(style_name):
        style = db.get((style_name or "").strip())
        if style is None:
            return gr.update(), gr.update()  # a new name: keep what is being typed
        return style.prompt, style.negative_prompt

    def on_save(style_name, text, negative_text, selected):
        style_name = (style_name or "").strip()
        old = db.get(style_name)
        try:
            db.save(PromptStyle(style_name, text or "", negative_text or "", old.extra if old else {}))
        except ValueError as e:
            return gr.update(), gr.update(), _notice(f"Not saved: {e}")
        except OSError as e:
            return gr.update(), gr.update(), _notice(f"Not saved: could not write {db.path}: {e}")
        update, names = choices_updates(selected)
        return update, gr.update(choices=names, value=style_name), _notice(
            f"Saved style {style_name!r} to {db.path.name}.", ok=True)

    def on_delete(style_name, selected):
        style_name = (style_name or "").strip()
        if not style_name:
            return gr.update(), gr.update(), gr.update(), gr.update(), _notice("Choose a style to delete.")
        try:
            db.delete(style_name)
        except UnknownStyleError as e:
            return gr.update(), gr.update(), gr.update(), gr.update(), _notice(f"Not deleted: {e}")
        except OSError as e:
            return (gr.update(), gr.update(), gr.update(), gr.update(),
                    _notice(f"Not deleted: could not write {db.path}: {e}"))
        update, names = choices_updates(selected)
        return update, gr.update(choices=names, value=None), "", "", _notice(
            f"Deleted style {style_name!r}.", ok=True)

    def on_page_load():
        db.reload()  # styles.csv may have been edited by hand since the last read
        names = db.names()
        return [gr.update(choices=names), gr.update(choices=names)]

    apply.click(on_apply, inputs=[dropdown, prompt, negative], outputs=[prompt, negative, dropdown, notice],
                queue=False, show_progress="hidden")
    # select also fires when the name already shown is chosen again (to reload it); input for typed names
    gr.on([name.select, name.input], on_name, inputs=[name], outputs=[style_prompt, style_negative], queue=False,
          show_progress="hidden")
    copy.click(lambda p, n: (p or "", n or ""), inputs=[prompt, negative], outputs=[style_prompt, style_negative],
               queue=False, show_progress="hidden")
    save.click(on_save, inputs=[name, style_prompt, style_negative, dropdown], outputs=[dropdown, name, notice],
               queue=False, show_progress="hidden")
    delete.click(on_delete, inputs=[name, dropdown],
                 outputs=[dropdown, name, style_prompt, style_negative, notice], queue=False,
                 show_progress="hidden")
    return StylesControls(dropdown=dropdown, outputs=[dropdown, name], load=on_page_load)
