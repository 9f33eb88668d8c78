"""SD upscale (img2img): upscale the init image with an upscaler, then redraw it tile by tile with img2img at the
request's width x height, tiles overlapping and blended, so a small model adds detail to a large picture.

script_args in A1111's order: info (ignored), overlap (pixels, 64), upscaler (its name, or its index into
/sdapi/v1/upscalers), scale_factor (2.0), e.g. ["", 8, "Lanczos", 2.0]."""
import gradio as gr

from modules import processing, scripts, shared
from modules.core import grids, upscaling


def _upscaler_names() -> list[str]:
    return shared.upscaler_names()


def _resolve(name_or_index, names: list[str]) -> str:
    if isinstance(name_or_index, bool):
        raise ValueError(f"upscaler must be a name or an index, got {name_or_index!r}")
    if isinstance(name_or_index, (int, float)) or (isinstance(name_or_index, str) and name_or_index.isdigit()):
        i = int(name_or_index)
        if not 0 <= i < len(names):
            raise ValueError(f"upscaler index {i} is out of range (0..{len(names) - 1}: {', '.join(names)})")
        return names[i]
    for n in names:
        if n.lower() == str(name_or_index).strip().lower():
            return n
    raise ValueError(f"unknown upscaler {name_or_index!r} (upscalers: {', '.join(names)})")


class Script(scripts.Script):
    def title(self):
        return "SD upscale"

    def show(self, is_img2img):
        return is_img2img

    def ui(self, is_img2img):
        info = gr.HTML("<p>Will upscale the image by the selected scale factor; use width and height sliders to "
                       "set tile size</p>")
        overlap = gr.Slider(0, 256, value=64, step=16, label="Tile overlap", elem_id=self.elem_id("overlap"))
        scale_factor = gr.Slider(1.0, 4.0, value=2.0, step=0.05, label="Scale Factor",
                                 elem_id=self.elem_id("scale_factor"))
        names = _upscaler_names()
        upscaler = gr.Radio(names, value=names[0] if names else None, label="Upscaler",
                            elem_id=self.elem_id("upscaler_index"))
        return [info, overlap, upscaler, scale_factor]

    def validate_args(self, args):
        _, overlap, upscaler, scale_factor = args
        _resolve(upscaler, _upscaler_names())
        if not 0 <= int(overlap) <= 256:
            raise ValueError(f"overlap must be between 0 and 256 pixels, got {overlap}")
        if not 1 <= float(scale_factor) <= 8:
            raise ValueError(f"scale_factor must be between 1 and 8, got {scale_factor}")

    def run(self, p, _info, overlap, upscaler, scale_factor):
        try:
            self.validate_args([_info, overlap, upscaler, scale_factor])
            name = _resolve(upscaler, _upscaler_names())
        except ValueError as e:
            raise scripts.ScriptError(f"SD upscale: {e}") from None
        overlap, scale_factor = int(overlap), float(scale_factor)
        processing.fix_seed(p)
        init = p.init_images[0].convert("RGB")
        server = getattr(p.request, "upscalers", None)
        if server is not None:
            big = server.upscale_image(init, name, scale_factor, job=p.job)
        else:
            big = upscaling.upscale(init, scale_factor, name)
        tile_w, tile_h = p.width, p.height
        if overlap >= min(tile_w, tile_h):
            raise scripts.ScriptError(f"SD upscale: the overlap ({overlap}) must be smaller than the tile size "
                                      f"({tile_w}x{tile_h}: the width and height sliders)")
        if big.width < tile_w or big.height < tile_h:  # a picture smaller than one tile is one (padded) tile
            canvas = big.resize((max(big.width, tile_w), max(big.height, tile_h)))
            big = canvas
        tiles = grids.split_tiles(big, tile_w, tile_h, overlap)
        if len(tiles) > 400:
            raise scripts.ScriptError(f"SD upscale: {len(tiles)} tiles; use a larger tile size or a smaller scale")
        batch = max(int(p.batch_size), 1)
        count = max(int(p.n_iter), 1)
        p.n_iter, p.do_not_save_grid, p.do_not_save_samples = 1, True, True
        p.resize_mode, p.image_mask, p.mask = 0, None, None
        p.extra_generation_params.update({"SD upscale overlap": overlap, "SD upscale upscaler": name})
        results, infotexts, seeds, start_seed = [], [], [], p.seed
        for n in range(count):
            p.seed = start_seed + n
            done = []
            for i in range(0, len(tiles), batch):
                if p.job is not None:
                    if p.job.interrupted:
                        break
                    p.job.textinfo = f"SD upscale: tiles {i + 1}-{min(i + batch, len(tiles))} of {len(tiles)}, " \
                                     f"image {n + 1}/{count}"
                chunk = tiles[i:i + batch]
                p.batch_size = len(chunk)
                p.init_images = [t for _, _, t in chunk]
                result = processing.process_images(p)
                first_info = result.infotexts[result.grid_count] if result.infotexts else ""
                done += [(x, y, im) for (x, y, _), im in zip(chunk, result.images[result.grid_count:])]
            if len(done) < len(tiles):
                break
            combined = grids.combine_tiles(big.size, done)
            results.append(combined)
            infotexts.append(first_info)
            seeds.append(start_seed + n)
            if p.request.save_images and not p.request.do_not_save_samples and shared.opts.samples_save:
                from modules import images
                images.save_image(combined, p.outpath_samples, "", start_seed + n, p.prompt, shared.opts.samples_format,
                                  info=first_info, p=p)
        return processing.Processed(p, results, start_seed, infotexts[0] if infotexts else "", all_seeds=seeds,
                                    infotexts=infotexts)
