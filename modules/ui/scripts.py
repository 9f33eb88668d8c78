"""The Script dropdown of txt2img and img2img (the picked script's controls shown under it) and the always-on
scripts' accordions, built from the server's script host; turns their values into the request's scripts."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import gradio as gr

from modules.scripting.script_base import ScriptError

log = logging.getLogger("webui.ui")


@dataclass
class ScriptControls:
    is_img2img: bool
    dropdown: gr.Dropdown
    inputs: list = field(default_factory=list)  # the dropdown, then every script's components in order
    spans: dict = field(default_factory=dict)  # title -> (start, end) into inputs
    alwayson_titles: list = field(default_factory=list)

    def selection(self, webui, values: list):
        """The request's scripts from the controls' values (raises ScriptError / UnknownScriptError)."""
        values = list(values)
        name = values[0] if values and values[0] not in (None, "None") else None
        given = {t: {"args": values[a:b]} for t, (a, b) in self.spans.items() if t in self.alwayson_titles}
        args = values[slice(*self.spans[name])] if name in self.spans else []
        return webui.scripts.bind(self.is_img2img, name, args, given)


def _build(tab, entry, problems: list[str]) -> list | None:
    try:
        return tab.build_ui(entry)
    except ScriptError as e:
        tab.drop(entry, str(e))
        problems.append(str(e))
        return None


def script_controls(webui, is_img2img: bool) -> ScriptControls:
    """Built inside the tab's left column: always-on accordions, then the Script dropdown and the picked
    script's controls (the others hidden)."""
    tab = webui.scripts.tab(is_img2img)
    name = "img2img" if is_img2img else "txt2img"
    problems: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    inputs: list = []
    alwayson_titles = []
    pending = []
    for entry in list(tab.alwayson):
        with gr.Accordion(entry.title, open=False, elem_id=f"{name}_script_{_slug(entry.title)}") as box:
            comps = _build(tab, entry, problems)
        if comps is None:
            box.visible = False
            continue
        pending.append((entry.title, comps))
        alwayson_titles.append(entry.title)
    dropdown = gr.Dropdown(["None"] + tab.titles(), value="None", label="Script", elem_id=f"{name}_script")
    inputs.append(dropdown)
    groups = []
    for entry in list(tab.selectable):
        with gr.Group(visible=False, elem_id=f"{name}_script_group_{_slug(entry.title)}") as group:
            comps = _build(tab, entry, problems)
        if comps is None:
            continue
        spans[entry.title] = (len(inputs), len(inputs) + len(comps))
        inputs += comps
        groups.append((entry.title, group))
    for title, comps in pending:
        spans[title] = (len(inputs), len(inputs) + len(comps))
        inputs += comps
    if problems:
        gr.Markdown("\n\n".join(f"**Script skipped:** {p}" for p in problems), elem_id=f"{name}_script_problems")
    dropdown.choices = [("None", "None")] + [(t, t) for t, _ in groups]

    def show(choice):
        return [gr.update(visible=choice == title) for title, _ in groups]

    if groups:
        dropdown.change(show, inputs=[dropdown], outputs=[g for _, g in groups], queue=False, show_progress="hidden")
    return ScriptControls(is_img2img, dropdown, inputs, spans, alwayson_titles)


def _slug(title: str) -> str:
    import re
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
