"""Loopback (img2img): each output is the next loop's input, the denoising strength moving from the request's to
the final one along a curve; the answer is a grid of every loop and the images.

script_args in A1111's order: loops, final_denoising_strength, denoising_curve ("Aggressive" / "Linear" /
"Lazy"), append_interrogation ("None"; captioning each loop is not available here)."""
import math

import gradio as gr

from modules import images, processing, scripts, shared
from modules.core import grids

CURVES = ("Aggressive", "Linear", "Lazy")


def strength_at(initial: float, final: float, curve: str, loop: int, loops: int) -> float:
    """A1111's schedule: the strength for loop `loop` (0-based) of `loops`."""
    if loops == 1:
        return initial
    progress = loop / (loops - 1)
    if curve == "Aggressive":
        share = math.sin(progress * math.pi * 0.5)
    elif curve == "Lazy":
        share = 1 - math.cos(progress * math.pi * 0.5)
    else:
        share = progress
    return initial + (final - initial) * share


class Script(scripts.Script):
    def title(self):
        return "Loopback"

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        loops = gr.Slider(1, 32, value=4, step=1, label="Loops", elem_id=self.elem_id("loops"))
        final = gr.Slider(0, 1, value=0.5, step=0.01, label="Final denoising strength",
                          elem_id=self.elem_id("final_denoising_strength"))
        curve = gr.Dropdown(list(CURVES), value="Linear", label="Denoising strength curve",
                            elem_id=self.elem_id("curve"))
        interrogation = gr.Dropdown(["None"], value="None", label="Append interrogated prompt at each iteration",
                                    elem_id=self.elem_id("append_interrogation"))
        return [loops, final, curve, interrogation]

    def validate_args(self, args):
        loops, final, curve, interrogation = args
        if not 1 <= int(loops) <= 32:
            raise ValueError(f"loops must be between 1 and 32, got {loops}")
        if not 0 <= float(final) <= 1:
            raise ValueError(f"final_denoising_strength must be between 0 and 1, got {final}")
        if curve not in CURVES:
            raise ValueError(f"denoising_curve must be one of {list(CURVES)}, got {curve!r}")
        if interrogation not in (None, "", "None"):
            raise ValueError(f"append_interrogation {interrogation!r} is not available here (use 'None')")

    def run(self, p, loops, final, curve, interrogation):
        self.validate_args([loops, final, curve, interrogation])
        loops, final = int(loops), float(final)
        processing.fix_seed(p)
        batch_count = p.n_iter
        p.extra_generation_params.update({"Final denoising strength": final, "Denoising curve": curve})
        p.batch_size, p.n_iter, p.do_not_save_grid = 1, 1, True
        original_images, original_fill, initial = list(p.init_images), p.inpainting_fill, p.denoising_strength
        history, outputs, infotexts, first = [], [], [], None
        for n in range(batch_count):
            p.init_images, p.denoising_strength, p.inpainting_fill = original_images, initial, original_fill
            last = None
            for i in range(loops):
                if p.job is not None:
                    if p.job.interrupted:
                        break
                    p.job.textinfo = f"Loopback: iteration {i + 1}/{loops}, batch {n + 1}/{batch_count}"
                result = processing.process_images(p)
                first = first or result
                if not result.images:
                    break
                p.seed = result.seed + 1
                p.denoising_strength = strength_at(initial, final, curve, i + 1, loops)
                last = result.images[result.grid_count]
                p.init_images = [last]
                p.inpainting_fill = 1  # "original": the next loop starts from this output
                if batch_count == 1:
                    history.append(last)
                    outputs.append(last)
                    infotexts.append(result.infotexts[result.grid_count])
            if batch_count > 1 and last is not None:
                history.append(last)
                outputs.append(last)
                infotexts.append(result.infotexts[result.grid_count])
        if first is None or not outputs:
            return processing.Processed(p, [], p.seed, "")
        grid = grids.image_grid(history, rows=1, margin=int(shared.opts.grid_margin),
                                background=shared.opts.grid_background_color)
        if p.request.save_images and not p.request.do_not_save_grid and shared.opts.grid_save:
            images.save_image(grid, p.outpath_grids, "grid", seed=first.seed, prompt=first.prompt,
                              extension=shared.opts.grid_format, info=infotexts[0], grid=True)
        return processing.Processed(p, [grid] + outputs, first.seed, infotexts[0], infotexts=[infotexts[0]] + infotexts,
                                    index_of_first_image=1)
