"""The model comparison report: the same prompts and seeds over chosen checkpoints of any family (SD 1.x, SD 2.x,
SDXL, SD3, FLUX), written to `outputs/comparisons/DATE-TIME/` as a labelled grid per prompt (a column per
checkpoint, a row per seed), `report.csv` (one row per image) and `report.html` (a summary per checkpoint, the
table and the grids).

Each image is one txt2img request through the one processing loop, timed and with its peak memory (the CUDA
allocator's peak on a GPU, else the process RSS). A checkpoint's load time is measured once, before its first
image (0 when the model manager already held it). The prompt-alignment score is the cosine similarity of the
image and its prompt in the retrieval model's embedding space (BLIP-2 ITC, the space the Image search tab ranks
in: the best of the image's query vectors against the text's vector), so a higher number is an image that
matches its prompt better under that model.
"""
from __future__ import annotations

import csv
import datetime
import html
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from modules.captioning.models import CaptionerNotFoundError
from modules.core import fileio, grids, outputs
from modules.core.devices import PeakMemory
from modules.generation.leases import leased_checkpoint
from modules.generation.params import GenerationError, Txt2ImgRequest, validate
from modules.generation.processing import GenerationContext
from modules.generation.txt2img import run_txt2img
from modules.model_store.checkpoint_files import CheckpointNotFoundError

MAX_CHECKPOINTS, MAX_PROMPTS, MAX_SEEDS = 16, 32, 16
CSV_FIELDS = ("checkpoint", "family", "prompt_index", "prompt", "seed", "seconds", "peak_memory_mb", "memory",
              "load_seconds", "alignment", "image")


@dataclass(frozen=True)
class ComparisonRequest:
    checkpoints: tuple[str, ...]
    prompts: tuple[str, ...]
    seeds: tuple[int, ...] = (1,)
    negative_prompt: str = ""
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5
    sampler_name: str = "Euler"
    alignment: bool = True  # score with the retrieval model (skipped, with a note, when none is installed)
    alignment_model: str | None = None  # a blip2-itm captioner; None: the first one
    # per-checkpoint CFG scale (FLUX wants 1), by checkpoint name; others use cfg_scale
    cfg_scale_per_checkpoint: dict[str, float] = field(default_factory=dict)


def validate_comparison(ctx: GenerationContext, req: ComparisonRequest) -> list:
    """The checkpoints' infos; GenerationError naming every problem (unknown names included) before any work."""
    problems = []
    if not req.checkpoints:
        problems.append("checkpoints is empty: name at least one")
    if len(req.checkpoints) > MAX_CHECKPOINTS:
        problems.append(f"at most {MAX_CHECKPOINTS} checkpoints, got {len(req.checkpoints)}")
    prompts = [p for p in req.prompts if p.strip()]
    if not prompts:
        problems.append("prompts is empty: give at least one prompt")
    if len(req.prompts) > MAX_PROMPTS:
        problems.append(f"at most {MAX_PROMPTS} prompts, got {len(req.prompts)}")
    if not req.seeds or len(req.seeds) > MAX_SEEDS:
        problems.append(f"give 1 to {MAX_SEEDS} seeds, got {len(req.seeds)}")
    if any(s < 0 for s in req.seeds):
        problems.append("seeds must be fixed numbers (0 or more): a comparison needs the same seeds everywhere")
    infos = []
    for name in req.checkpoints:
        try:
            infos.append(ctx.registry.resolve(name))
        except CheckpointNotFoundError as e:  # its message lists what there is
            problems.append(str(e))
    try:
        validate(_image_request(req, prompts[0] if prompts else "x", 0, req.cfg_scale))
    except GenerationError as e:
        problems.append(str(e))
    if problems:
        raise GenerationError("; ".join(problems))
    return infos


def _image_request(req: ComparisonRequest, prompt: str, seed: int, cfg: float) -> Txt2ImgRequest:
    return Txt2ImgRequest(prompt=prompt, negative_prompt=req.negative_prompt, seed=seed, steps=req.steps,
                          width=req.width, height=req.height, cfg_scale=cfg,
                          distilled_cfg_scale=req.distilled_cfg_scale, sampler_name=req.sampler_name,
                          save_images=False, do_not_save_grid=True, do_not_save_samples=True)


def run_comparison(ctx: GenerationContext, req: ComparisonRequest, job=None, settings: dict | None = None,
                   alignment: Callable[..., tuple[list[float], str]] | None = None) -> dict[str, Any]:
    """Make every image and write the report; returns {folder, html, csv, grids, rows, summary, notes}.
    `alignment(images, prompts, model)` (else the context's) gives one score per image and the model's name."""
    infos = validate_comparison(ctx, req)
    prompts = [p for p in req.prompts if p.strip()]
    settings = dict(settings or {})
    folder = ctx.outputs_root / "comparisons" / datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    device = getattr(ctx.manager, "device", None)
    rows: list[dict[str, Any]] = []
    images: dict[tuple[int, int, int], Any] = {}  # (checkpoint, prompt, seed) index -> image
    notes: list[str] = []
    total = len(infos) * len(prompts) * len(req.seeds)
    done = 0
    for ci, info in enumerate(infos):
        cell_settings = {**settings, "sd_model_checkpoint": info.name}
        warnings: list[str] = []
        started = time.perf_counter()
        with leased_checkpoint(ctx, cell_settings, warnings) as bundle:
            family = bundle.arch.family
        load_seconds = time.perf_counter() - started
        cfg = float(req.cfg_scale_per_checkpoint.get(info.name, req.cfg_scale))
        for pi, prompt in enumerate(prompts):
            for si, seed in enumerate(req.seeds):
                if job is not None:
                    if job.interrupted:
                        notes.append(f"interrupted after {done} of {total} images")
                        break
                    job.textinfo = f"Model comparison: image {done + 1} of {total} ({info.name})"
                one = validate(_image_request(req, prompt, seed, cfg))
                with PeakMemory(device) as memory:
                    t0 = time.perf_counter()
                    result = run_txt2img(ctx, one, job, cell_settings)
                    seconds = time.perf_counter() - t0
                image = result.images[result.grid_count]
                name = outputs.save_image_named(image, folder, f"{ci:02d}-{pi:02d}-{seed}",
                                                infotext=result.infotexts[result.grid_count]).name
                images[(ci, pi, si)] = image
                notes += [f"{info.name}: {w}" for w in result.info.get("warnings", []) if f"{info.name}: {w}" not in notes]
                rows.append({"checkpoint": info.name, "family": family, "prompt_index": pi, "prompt": prompt,
                             "seed": seed, "seconds": round(seconds, 4),
                             "peak_memory_mb": round(memory.peak / 2**20, 1), "memory": memory.what,
                             "load_seconds": round(load_seconds, 4), "alignment": None, "image": name})
                done += 1
            if job is not None and job.interrupted:
                break
        if job is not None and job.interrupted:
            break
    scorer = None
    alignment = alignment or ctx.alignment
    if req.alignment and rows:
        ordered = [images[(ci, pi, si)] for ci in range(len(infos)) for pi in range(len(prompts))
                   for si in range(len(req.seeds)) if (ci, pi, si) in images]
        try:
            if alignment is None:
                raise CaptionerNotFoundError("no retrieval model")
            scores, scorer = alignment(ordered, [r["prompt"] for r in rows], req.alignment_model)
        except CaptionerNotFoundError as e:
            notes.append(f"prompt alignment not scored: {e}")
        else:
            for row, score in zip(rows, scores):
                row["alignment"] = round(float(score), 4)
    grid_files = _write_grids(folder, infos, prompts, req.seeds, images, settings)
    summary = _summary(rows, [i.name for i in infos])
    csv_path = folder / "report.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    fileio.atomic_write_text(csv_path, buf.getvalue())
    html_path = folder / "report.html"
    fileio.atomic_write_text(html_path, _html(req, rows, summary, grid_files, prompts, scorer, notes))
    return {"folder": str(folder), "html": str(html_path), "csv": str(csv_path),
            "grids": [str(folder / g) for g in grid_files], "rows": rows, "summary": summary, "notes": notes,
            "alignment_model": scorer}


def _write_grids(folder: Path, infos, prompts, seeds, images, settings) -> list[str]:
    colors = dict(background=settings.get("grid_background_color", "#ffffff"),
                  active=settings.get("grid_text_active_color", "#000000"),
                  inactive=settings.get("grid_text_inactive_color", "#999999"),
                  font_size=int(settings.get("grid_font_size", 0)))
    names = []
    for pi, _ in enumerate(prompts):
        cells = [images.get((ci, pi, si)) for si in range(len(seeds)) for ci in range(len(infos))]
        present = [c for c in cells if c is not None]
        if not present:
            continue
        from PIL import Image
        w, h = max(c.width for c in present), max(c.height for c in present)
        cells = [c if c is not None else Image.new("RGB", (w, h), colors["background"]) for c in cells]
        grid = grids.image_grid(cells, cols=len(infos), background=colors["background"])
        grid = grids.draw_grid_annotations(grid, w, h, [[grids.GridAnnotation(i.name)] for i in infos],
                                           [[grids.GridAnnotation(f"seed {s}")] for s in seeds], **colors)
        names.append(outputs.save_image_named(grid, folder, f"grid-{pi:02d}", infotext=None).name)
    return names


def _summary(rows: list[dict], names: list[str]) -> list[dict[str, Any]]:
    out = []
    for name in names:
        mine = [r for r in rows if r["checkpoint"] == name]
        if not mine:
            continue
        scores = [r["alignment"] for r in mine if r["alignment"] is not None]
        out.append({"checkpoint": name, "family": mine[0]["family"], "images": len(mine),
                    "seconds_per_image": round(sum(r["seconds"] for r in mine) / len(mine), 4),
                    "peak_memory_mb": max(r["peak_memory_mb"] for r in mine),
                    "load_seconds": mine[0]["load_seconds"],
                    "alignment": round(sum(scores) / len(scores), 4) if scores else None})
    return out


def _html(req, rows, summary, grid_files, prompts, scorer, notes) -> str:
    e = html.escape

    def table(items: list[dict], fields) -> str:
        head = "".join(f"<th>{e(f)}</th>" for f in fields)
        body = "".join("<tr>" + "".join(f"<td>{e('' if r.get(f) is None else str(r.get(f)))}</td>" for f in fields)
                       + "</tr>" for r in items)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Model comparison</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}</style></head><body>",
             "<h1>Model comparison</h1>",
             f"<p>{len(summary)} checkpoints, {len(prompts)} prompts, seeds {e(', '.join(map(str, req.seeds)))}; "
             f"{req.steps} steps, {e(req.sampler_name)}, {req.width}x{req.height}, CFG {req.cfg_scale}. "
             f"Alignment: {e(scorer) if scorer else 'not scored'} (cosine similarity of image and prompt in the "
             "retrieval model's space; higher matches better).</p>",
             "<h2>Summary</h2>", table(summary, ("checkpoint", "family", "images", "seconds_per_image",
                                                 "peak_memory_mb", "load_seconds", "alignment"))]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    for pi, name in enumerate(grid_files):
        parts.append(f"<h2>Prompt {pi + 1}</h2><p>{e(prompts[pi])}</p><img src='{e(name)}' alt='{e(prompts[pi])}'>")
    parts += ["<h2>Every image</h2>", table(rows, CSV_FIELDS), "</body></html>"]
    return "\n".join(parts)
