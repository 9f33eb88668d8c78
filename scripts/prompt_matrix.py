"""Prompt matrix: `a cat|in a hat|on a mat` makes every combination of the `|`-separated parts after the first
(2^(n-1) images) and a grid with the parts' legend, struck through where a part is off.

script_args in A1111's order: put_at_start (bool), different_seeds (bool), prompt_type ("positive" / "negative"),
variations_delimiter ("comma" / "space"), margin_size (px)."""

import gradio as gr

from modules import images, processing, scripts, shared
from modules.core import grids


class Script(scripts.Script):
    def title(self):
        return "Prompt matrix"

    def ui(self, is_img2img):
        gr.HTML("<p>Separate the parts of the prompt with <code>|</code>: every combination of the parts after the "
                "first is made.</p>")
        with gr.Row():
            put_at_start = gr.Checkbox(label="Put variable parts at start of prompt", value=False,
                                       elem_id=self.elem_id("put_at_start"))
            different_seeds = gr.Checkbox(label="Use different seed for each picture", value=False,
                                          elem_id=self.elem_id("different_seeds"))
        with gr.Row():
            prompt_type = gr.Radio(["positive", "negative"], label="Select prompt", value="positive",
                                   elem_id=self.elem_id("prompt_type"))
            delimiter = gr.Radio(["comma", "space"], label="Select joining char", value="comma",
                                 elem_id=self.elem_id("variations_delimiter"))
        margin_size = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)", elem_id=self.elem_id("margin_size"))
        return [put_at_start, different_seeds, prompt_type, delimiter, margin_size]

    def validate_args(self, args):
        put_at_start, different_seeds, prompt_type, delimiter, margin_size = args
        if prompt_type not in ("positive", "negative"):
            raise ValueError(f"prompt_type must be 'positive' or 'negative', got {prompt_type!r}")
        if delimiter not in ("comma", "space"):
            raise ValueError(f"variations_delimiter must be 'comma' or 'space', got {delimiter!r}")

    def run(self, p, put_at_start, different_seeds, prompt_type, delimiter, margin_size):
        self.validate_args([put_at_start, different_seeds, prompt_type, delimiter, margin_size])
        processing.fix_seed(p)
        joiner = ", " if delimiter == "comma" else " "
        original = p.prompt if prompt_type == "positive" else p.negative_prompt
        original = original[0] if isinstance(original, list) else original
        parts = original.split("|")
        count = 2 ** (len(parts) - 1)
        if count > 64:
            raise scripts.ScriptError(f"Prompt matrix: {len(parts) - 1} variable parts make {count} images, at most 64")
        all_prompts = []
        for combination in range(count):
            chosen = [t.strip().strip(",") for n, t in enumerate(parts[1:]) if combination & (1 << n)]
            chosen = chosen + [parts[0].strip()] if put_at_start else [parts[0].strip()] + chosen
            all_prompts.append(joiner.join(c for c in chosen if c))
        # one image per batch: a batch shares one conditioning here, and every image has its own prompt
        p.batch_size, p.n_iter = 1, len(all_prompts)
        p.do_not_save_grid = True
        if prompt_type == "positive":
            p.prompt = all_prompts
        else:
            p.negative_prompt = all_prompts
        p.seed = [p.seed + (i if different_seeds else 0) for i in range(len(all_prompts))]
        p.extra_generation_params["Script"] = "Prompt matrix"
        result = processing.process_images(p)
        cells = result.images[result.grid_count:]
        grid = images.image_grid(cells, rows=1 << ((len(parts) - 1) // 2))
        grid = grids.draw_prompt_matrix(grid, cells[0].width, cells[0].height, parts, int(margin_size or 0),
                                        background=shared.opts.grid_background_color,
                                        active=shared.opts.grid_text_active_color,
                                        inactive=shared.opts.grid_text_inactive_color,
                                        font_size=shared.opts.grid_font_size)
        result.images.insert(0, grid)
        result.infotexts.insert(0, result.infotexts[result.grid_count] if result.infotexts else "")
        result.grid_count += 1
        result.info["index_of_first_image"] = result.grid_count
        if p.request.save_images and not p.request.do_not_save_grid and shared.opts.grid_save:
            path, _ = images.save_image(grid, p.outpath_grids, "prompt_matrix", seed=result.seed, prompt=original,
                                        extension=shared.opts.grid_format, info=result.infotexts[0], grid=True)
            result.paths.append(path)
        return result
