"""The Settings tab: every setting the options declare for the UI, by section, applied and saved at once."""
from __future__ import annotations

import html

import gradio as gr

from modules.core.options import OptionError


def setting_update(webui, key: str):
    """A setting's current value for its component; a setting whose choices change (the VAE files) gets them anew."""
    spec, value = webui.options.specs[key], webui.options.get(key)
    if callable(spec.choices):
        return gr.update(choices=list(spec.choices()), value=value)
    return value


def create_tab(webui) -> dict:
    """The tab's components by setting key (refreshed on every page load by create_ui)."""
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
                value = webui.options.get(key)
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
            gr.Warning(str(e))
            return f'<div class="notice-error">Not applied: {html.escape(str(e))}</div>'
        return f"{len(changed)} settings changed: {', '.join(changed) or 'none'}."

    apply.click(save, inputs=[comps[k] for k in keys], outputs=[result])
    return comps
