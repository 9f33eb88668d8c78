"""X/Y/Z plot: one image per combination of up to three axes' values, in a labelled grid (a sub-grid per Z value).

script_args in A1111's order: x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type,
z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_seeds_x,
vary_seeds_y, vary_seeds_z, margin_size, csv_mode. Axis types are indices into the tab's axis list (A1111's
order) or labels. Every value is checked before the first image is made. The cells run with the costliest axis
(Checkpoint name, then VAE) varying slowest, so each checkpoint loads once. With the setting "xyz_record_timing"
each cell's seconds per image and peak memory are written under it and into a CSV/JSON table beside the grid;
the answer's info always has that table (`xyz_timing`).
"""
import csv
import io
import json
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from modules import images, processing, scripts, shared
from modules.core import fileio, grids
from modules.scripting import xyz

MAX_CELLS = 1000


class Script(scripts.Script):
    def title(self):
        return "X/Y/Z plot"

    def ui(self, is_img2img):
        axes = xyz.axes_for(is_img2img)
        labels = [a.label for a in axes]
        rows = []
        defaults = {"x": 1, "y": 0, "z": 0}
        for name in ("x", "y", "z"):
            with gr.Row():
                kind = gr.Dropdown(labels, value=labels[defaults[name]], type="index", label=f"{name.upper()} type",
                                   elem_id=self.elem_id(f"{name}_type"))
                values = gr.Textbox(label=f"{name.upper()} values", lines=1, elem_id=self.elem_id(f"{name}_values"))
                dropdown = gr.Dropdown(label=f"{name.upper()} values", multiselect=True, visible=False, choices=[],
                                       value=[], elem_id=self.elem_id(f"{name}_values_dropdown"))
            kind.change(self._switch(axes), inputs=[kind], outputs=[values, dropdown], queue=False,
                        show_progress="hidden")
            rows += [kind, values, dropdown]
        with gr.Row():
            draw_legend = gr.Checkbox(label="Draw legend", value=True, elem_id=self.elem_id("draw_legend"))
            include_lone_images = gr.Checkbox(label="Include Sub Images", value=False,
                                              elem_id=self.elem_id("include_lone_images"))
            include_sub_grids = gr.Checkbox(label="Include Sub Grids", value=False,
                                            elem_id=self.elem_id("include_sub_grids"))
            csv_mode = gr.Checkbox(label="Use text inputs instead of dropdowns", value=False,
                                   elem_id=self.elem_id("csv_mode"))
        with gr.Row():
            no_fixed_seeds = gr.Checkbox(label="Keep -1 for seeds", value=False, elem_id=self.elem_id("no_fixed_seeds"))
            vary_x = gr.Checkbox(label="Vary seeds for X", value=False, elem_id=self.elem_id("vary_seeds_x"))
            vary_y = gr.Checkbox(label="Vary seeds for Y", value=False, elem_id=self.elem_id("vary_seeds_y"))
            vary_z = gr.Checkbox(label="Vary seeds for Z", value=False, elem_id=self.elem_id("vary_seeds_z"))
        margin = gr.Slider(0, 500, value=0, step=2, label="Grid margins (px)", elem_id=self.elem_id("margin_size"))
        return rows + [draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, vary_x, vary_y, vary_z,
                       margin, csv_mode]

    @staticmethod
    def _switch(axes):
        def switch(index):
            axis = axes[index] if isinstance(index, int) and 0 <= index < len(axes) else None
            choices = list(axis.choices()) if axis is not None and axis.choices is not None else None
            return (gr.update(visible=choices is None),
                    gr.update(visible=choices is not None, choices=choices or [], value=[]))
        return switch

    def validate_args(self, args):
        if len(args) < 9:
            raise ValueError("script_args needs at least x_type, x_values, x_values_dropdown, y_type, y_values, "
                             "y_values_dropdown, z_type, z_values, z_values_dropdown")
        axes = xyz.axes_for(self.is_img2img)
        for i in (0, 3, 6):
            axis = xyz.find_axis(axes, args[i] if args[i] is not None else 0)
            if axis.apply is None:
                raise ValueError(f"axis {axis.label!r} is not available in this studio")

    def run(self, p, *args):
        (x_type, x_values, x_dropdown, y_type, y_values, y_dropdown, z_type, z_values, z_dropdown, draw_legend,
         include_lone_images, include_sub_grids, no_fixed_seeds, vary_x, vary_y, vary_z, margin_size,
         csv_mode) = args
        axes = xyz.axes_for(self.is_img2img)
        picked = []
        try:
            for kind, values, dropdown in ((x_type, x_values, x_dropdown), (y_type, y_values, y_dropdown),
                                           (z_type, z_values, z_dropdown)):
                axis = xyz.find_axis(axes, kind if kind is not None else 0)
                vals = xyz.parse_values(axis, values, None if csv_mode else dropdown, bool(csv_mode))
                if axis.confirm is not None:
                    axis.confirm(p, vals)
                picked.append((axis, vals))
        except xyz.AxisError as e:
            raise scripts.ScriptError(f"X/Y/Z plot: {e}") from None
        (xa, xs), (ya, ys), (za, zs) = picked
        count = len(xs) * len(ys) * len(zs)
        if count > MAX_CELLS:
            raise scripts.ScriptError(f"X/Y/Z plot: {count} cells, at most {MAX_CELLS}")
        if not no_fixed_seeds:
            processing.fix_seed(p)

        def cell_p(ix, iy, iz):
            pc = processing.copy_processing(p)
            for axis, vals, i in ((xa, xs, ix), (ya, ys, iy), (za, zs, iz)):
                axis.apply(pc, vals[i], vals)
            xdim = len(xs) if vary_x else 1
            ydim = len(ys) if vary_y else 1
            if isinstance(pc.seed, int) and pc.seed >= 0:
                pc.seed += (ix if vary_x else 0) + (iy * xdim if vary_y else 0) + (iz * xdim * ydim if vary_z else 0)
            pc.do_not_save_grid = True
            return pc

        cells = [(ix, iy, iz) for iz in range(len(zs)) for iy in range(len(ys)) for ix in range(len(xs))]
        try:
            for c in cells:  # every value applied once before any image is made (Prompt S/R, Size, ...)
                cell_p(*c)
        except xyz.AxisError as e:
            raise scripts.ScriptError(f"X/Y/Z plot: {e}") from None
        # the costliest axis varies slowest: each checkpoint (then VAE) is loaded once
        # (A1111's order: costlier first; among equals Z varies slowest and X fastest)
        ranked = sorted(((xa.cost, 0), (ya.cost, 1), (za.cost, 2)), key=lambda t: (-t[0], -t[1]))
        order = sorted(cells, key=lambda c: tuple(c[i] for _, i in ranked))

        device = getattr(p.ctx.manager, "device", None)
        results, timing = {}, []
        job = p.job
        for n, c in enumerate(order):
            if job is not None:
                if job.interrupted:
                    break
                job.textinfo = f"X/Y/Z plot: cell {n + 1} of {count}"
            pc = cell_p(*c)
            from modules.core.devices import PeakMemory
            with PeakMemory(device) as memory:
                started = time.perf_counter()
                res = processing.process_images(pc)
                seconds = time.perf_counter() - started
            made = len(res.images) - res.grid_count
            results[c] = res
            timing.append({
                "x": xyz.legend(p, xa, xs[c[0]]), "y": xyz.legend(p, ya, ys[c[1]]), "z": xyz.legend(p, za, zs[c[2]]),
                "images": made, "seconds": round(seconds, 4),
                "seconds_per_image": round(seconds / max(made, 1), 4),
                "peak_memory_mb": round(memory.peak / 2**20, 1), "memory": memory.what,
            })
        if not results:
            return processing.Processed(p, [], p.seed, "")

        first = next(iter(results.values()))
        w = max((r.images[r.grid_count].width for r in results.values() if r.images), default=p.width)
        h = max((r.images[r.grid_count].height for r in results.values() if r.images), default=p.height)
        record = bool(shared.opts.xyz_record_timing)
        colors = dict(background=shared.opts.grid_background_color, active=shared.opts.grid_text_active_color,
                      inactive=shared.opts.grid_text_inactive_color, font_size=shared.opts.grid_font_size)
        timing_of = {c: row for c, row in zip(order, timing)}

        def cell_image(c):
            res = results.get(c)
            im = res.images[res.grid_count] if res is not None and res.images else Image.new("RGB", (w, h), "black")
            if record and c in timing_of:
                row = timing_of[c]
                im = grids.caption_under(im, f"{row['seconds_per_image']:.2f} s/img, {row['peak_memory_mb']:.0f} MB",
                                         background=colors["background"], color=colors["active"])
            return im

        margin = int(margin_size or 0)
        sub_grids = []
        for iz in range(len(zs)):
            cell_images = [cell_image((ix, iy, iz)) for iy in range(len(ys)) for ix in range(len(xs))]
            cw, ch = max(i.width for i in cell_images), max(i.height for i in cell_images)
            grid = grids.image_grid(cell_images, cols=len(xs), margin=margin, background=colors["background"])
            if draw_legend:
                hor = [[grids.GridAnnotation(xyz.legend(p, xa, x))] for x in xs]
                ver = [[grids.GridAnnotation(xyz.legend(p, ya, y))] for y in ys]
                grid = grids.draw_grid_annotations(grid, cw, ch, hor, ver, margin, **colors)
            sub_grids.append(grid)
        if len(zs) > 1:
            main = grids.image_grid(sub_grids, cols=len(zs), margin=margin, background=colors["background"])
            if draw_legend:
                sw, sh = max(g.width for g in sub_grids), max(g.height for g in sub_grids)
                main = grids.draw_grid_annotations(main, sw, sh, [[grids.GridAnnotation(xyz.legend(p, za, z))]
                                                                  for z in zs], [[]], margin, **colors)
        else:
            main = sub_grids[0]
        grid_images = [main] + (sub_grids if include_sub_grids and len(zs) > 1 else [])
        first_text = first.infotexts[first.grid_count] if first.infotexts else ""
        cell_texts = [r.infotexts[r.grid_count] if r.infotexts else "" for r in (results.get(c) for c in cells) if r]
        lone = [r.images[r.grid_count] for r in (results.get(c) for c in cells) if r and r.images]
        all_images = grid_images + (lone if include_lone_images else [])
        infotexts = [first_text] * len(grid_images) + (cell_texts if include_lone_images else [])
        paths = []
        if p.request.save_images and not p.request.do_not_save_grid and shared.opts.grid_save:
            path, _ = images.save_image(main, p.outpath_grids, "xyz_grid", seed=first.seed, prompt=first.prompt,
                                        extension=shared.opts.grid_format, info=first_text, grid=True, p=p)
            paths.append(Path(path))
            if record:
                paths += _write_table(Path(path), timing)
        out = processing.Processed(p, all_images, first.seed, first_text, all_seeds=first.all_seeds,
                                   infotexts=infotexts, index_of_first_image=len(grid_images), paths=paths)
        out.info["xyz_timing"] = timing
        out.info["xyz_cell_infotexts"] = cell_texts
        out.info["warnings"] = sorted({w for r in results.values() for w in r.info.get("warnings", [])})
        return out


def _write_table(grid_path: Path, rows: list[dict]) -> list[Path]:
    """The cells' timing and memory as CSV and JSON beside the grid (same name), written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["x"])
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = grid_path.with_suffix(".csv"), grid_path.with_suffix(".json")
    fileio.atomic_write_text(csv_path, buf.getvalue())
    fileio.atomic_write_text(json_path, json.dumps(rows, indent=2))
    return [csv_path, json_path]
