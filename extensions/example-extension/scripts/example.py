"""example-extension: the parts of A1111's extension surface most extensions use.

- an always-on script (an accordion under txt2img and img2img) that adds a line to every image's infotext;
- a callback (on_image_saved) that counts the files saved;
- a tab (on_ui_tabs) and a setting (on_ui_settings, shown in Settings > Example extension);
- a flag of its own (preload.py adds --example-greeting, read here as shared.cmd_opts.example_greeting).
"""
import gradio as gr

from modules import script_callbacks, scripts, shared

saved = {"count": 0}


class ExampleScript(scripts.Script):
    def title(self):
        return "Example note"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        enabled = gr.Checkbox(label="Add a note to the infotext", value=False, elem_id=self.elem_id("enabled"))
        note = gr.Textbox(label="Note", value="made with example-extension", elem_id=self.elem_id("note"))
        return [enabled, note]

    def process(self, p, enabled, note):
        if enabled:
            p.extra_generation_params["Example note"] = note or shared.opts.example_extension_note


def on_image_saved(params):
    saved["count"] += 1


def on_ui_settings():
    section = ("example_extension", "Example extension")
    shared.opts.add_option("example_extension_note", shared.OptionInfo(
        "made with example-extension", "Default note of the example script", section=section).info("any text"))


def on_ui_tabs():
    with gr.Blocks(analytics_enabled=False) as tab:
        greeting = getattr(shared.cmd_opts, "example_greeting", "Hello")
        gr.Markdown(f"{greeting} from example-extension.", elem_id="example_extension_greeting")
        count = gr.Textbox(label="Images saved since start", elem_id="example_extension_count")
        gr.Button("Count", elem_id="example_extension_refresh").click(lambda: str(saved["count"]), outputs=[count])
    return [(tab, "Example", "example_extension")]


script_callbacks.on_image_saved(on_image_saved)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_ui_tabs(on_ui_tabs)
