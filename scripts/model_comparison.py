"""Model comparison (txt2img): the tab's prompt (or a list of prompts) and seeds over the chosen checkpoints of any
family, written as a report under outputs/comparisons/DATE-TIME/: a grid per prompt (a column per checkpoint, a
row per seed), report.csv and report.html with seconds per image, peak memory, load time and the prompt-alignment
score of the retrieval model (Image search's space). The tab's steps, size, sampler, CFG and Distilled CFG apply
to every checkpoint. The same report over HTTP: POST /sdapi/v1/model-comparison.

script_args: checkpoints (a list of names, or one comma-separated text), prompts (one per line; empty: the tab's
prompt), seeds (comma-separated numbers; empty: the tab's seed, or 1), alignment (true/false), flux_cfg_one
(CFG Scale 1 for FLUX checkpoints, which take their guidance as Distilled CFG)."""
from pathlib import Path

import gradio as gr

from modules import processing, scripts, shared


def _list(value) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in (value or []) if str(v).strip()]


def _seeds(text, fallback: int) -> list[int]:
    words = _list(text)
    if not words:
        return [fallback if fallback >= 0 else 1]
    try:
        return [int(w) for w in words]
    except ValueError:
        raise scripts.ScriptError(f"Model comparison: seeds must be whole numbers, got {text!r}") from None


class Script(scripts.Script):
    def title(self):
        return "Model comparison"

    def show(self, is_img2img):
        return not is_img2img

    def ui(self, is_img2img):
        checkpoints = gr.Dropdown(shared.names_of("checkpoints"), multiselect=True, value=[], label="Checkpoints",
                                  elem_id=self.elem_id("checkpoints"))
        prompts = gr.Textbox(label="Prompts (one per line; empty: the prompt above)", lines=3,
                             elem_id=self.elem_id("prompts"))
        seeds = gr.Textbox(label="Seeds (comma-separated; empty: the seed above)", value="1, 2",
                           elem_id=self.elem_id("seeds"))
        with gr.Row():
            alignment = gr.Checkbox(label="Score prompt alignment (retrieval model)", value=True,
                                    elem_id=self.elem_id("alignment"))
            flux_cfg_one = gr.Checkbox(label="CFG Scale 1 for FLUX", value=True, elem_id=self.elem_id("flux_cfg_one"))
        return [checkpoints, prompts, seeds, alignment, flux_cfg_one]

    def run(self, p, checkpoints, prompts, seeds, alignment=True, flux_cfg_one=True):
        from modules.generation import comparison
        from modules.generation.params import GenerationError
        from modules.model_store.checkpoint_files import detect_architecture

        names = _list(checkpoints)
        if not names:
            raise scripts.ScriptError("Model comparison: choose at least one checkpoint")
        texts = [line.strip() for line in str(prompts or "").splitlines() if line.strip()] or [p.prompt]
        per_checkpoint = {}
        if flux_cfg_one:
            for name in names:
                info = p.ctx.registry.find(name)
                if info is not None and detect_architecture(info.filename).family == "flux":
                    per_checkpoint[info.name] = 1.0
        req = comparison.ComparisonRequest(
            checkpoints=tuple(names), prompts=tuple(texts), seeds=tuple(_seeds(seeds, p.seed)),
            negative_prompt=p.negative_prompt, steps=p.steps, width=p.width, height=p.height, cfg_scale=p.cfg_scale,
            distilled_cfg_scale=p.distilled_cfg_scale, sampler_name=p.sampler_name, alignment=bool(alignment),
            cfg_scale_per_checkpoint=per_checkpoint)
        try:
            report = comparison.run_comparison(p.ctx, req, p.job, p.settings)
        except GenerationError as e:
            raise scripts.ScriptError(f"Model comparison: {e}") from None
        from PIL import Image
        grid_images = []
        for path in report["grids"]:
            with Image.open(path) as im:
                grid_images.append(im.convert("RGB"))
        text = f"Model comparison report: {report['html']}"
        out = processing.Processed(p, grid_images, req.seeds[0], text, infotexts=[text] * len(grid_images),
                                   paths=[Path(x) for x in (report["html"], report["csv"], *report["grids"])])
        out.info["comparison"] = {k: report[k] for k in ("folder", "html", "csv", "summary", "notes",
                                                         "alignment_model")}
        out.info["warnings"] = list(report["notes"])
        return out
