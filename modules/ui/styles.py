"""The styles controls of a generation tab: the Styles dropdown with the button that writes the selected styles
into the prompt boxes (A1111's "apply styles") and the one that opens the style editor (name, prompt, negative
prompt; save, delete), which spans the tab's width under the prompts."""
from __future__ import annotations

import html
from dataclasses import dataclass

import gradio as gr

from modules.prompting.styles import PromptStyle, UnknownStyleError
from modules.ui.common import icon_button


def _notice(text: str, ok: bool = False) -> str:
    cls = "style-notice" if ok else "style-notice notice-error"
    return f'<div class="{cls}">{html.escape(text)}</div>'


class StylesRow:
    """The dropdown and its two buttons, built where it is made (the column beside the prompts)."""

    def __init__(self, webui, tab: str):
        with gr.Row(elem_id=f"{tab}_styles_row"):
            self.dropdown = gr.Dropdown(label="Styles", choices=webui.styles.names(), multiselect=True,
                                        elem_id=f"{tab}_styles", scale=4)
            self.apply = icon_button(f"{tab}_style_apply", "brush", "Apply the selected styles to the prompts")
            self.edit = icon_button(f"{tab}_style_edit", "edit", "Edit styles")


@dataclass
class StylesControls:
    """`dropdown` holds the styles a generation applies."""
    dropdown: gr.Dropdown
    editor: gr.Accordion
    name: gr.Dropdown


def create(webui, tab: str, prompt: gr.Textbox, negative: gr.Textbox, row: StylesRow) -> StylesControls:
    """The style editor (an accordion under the prompts, opened by the row's edit button) and the wiring of the
    row to the tab's prompt boxes."""
    db = webui.styles
    dropdown = row.dropdown
    with gr.Accordion("Edit styles", open=False, elem_id=f"{tab}_style_editor") as editor:
        with gr.Row():
            name = gr.Dropdown(label="Style name", choices=db.names(), value=None, allow_custom_value=True,
                               interactive=True, elem_id=f"{tab}_style_name", scale=1)
            style_prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{tab}_style_prompt", scale=3)
            style_negative = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tab}_style_neg_prompt", scale=3)
        with gr.Row():
            copy = gr.Button("Copy from prompts", size="sm", elem_id=f"{tab}_style_copy")
            save = gr.Button("Save", size="sm", variant="primary", elem_id=f"{tab}_style_save")
            delete = gr.Button("Delete", size="sm", variant="stop", elem_id=f"{tab}_style_delete")
        notice = gr.HTML("", elem_id=f"{tab}_styles_notice")

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
            return gr.update(), gr.update(), _notice(f"Not saved: could not write {db.path.name}: {e.strerror}")
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
                    _notice(f"Not deleted: could not write {db.path.name}: {e.strerror}"))
        update, names = choices_updates(selected)
        return update, gr.update(choices=names, value=None), "", "", _notice(
            f"Deleted style {style_name!r}.", ok=True)

    def fresh_choices():
        # styles.csv may have changed (another tab's editor, an edit by hand): list it as it is now. Only the
        # choices: the value sent back would race the pick the user is making in the opened list.
        db.reload()
        return gr.update(choices=db.names())

    row.apply.click(on_apply, inputs=[dropdown, prompt, negative], outputs=[prompt, negative, dropdown, notice],
                    queue=False, show_progress="hidden")
    row.edit.click(lambda: gr.Accordion(open=True), outputs=[editor], queue=False, show_progress="hidden")
    dropdown.focus(fresh_choices, outputs=[dropdown], queue=False, show_progress="hidden")
    name.focus(lambda: gr.update(choices=db.names()), outputs=[name], queue=False, show_progress="hidden")
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
    return StylesControls(dropdown=dropdown, editor=editor, name=name)
