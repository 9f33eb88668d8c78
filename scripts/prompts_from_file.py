"""Prompts from file or textbox: one request per line. A line is a prompt, or A1111's command-line form:
`--prompt "a cat" --negative_prompt "blurry" --steps 20 --seed 5 --cfg_scale 7 --sampler_name "Euler a"
--width 512 --height 512 ...` (A1111's keys). A line that cannot be read is reported with its number before any
image is made.

script_args in A1111's order: checkbox_iterate (a new seed per line), checkbox_iterate_batch (one seed for all
lines), prompt_position ("start" / "end": where the line goes against the UI's prompt), prompt_txt."""
import shlex

import gradio as gr

from modules import processing, scripts
from modules.core import samplers


def _int(tag, value):
    return int(value)


def _float(tag, value):
    return float(value)


def _str(tag, value):
    return value


def _bool(tag, value):
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"--{tag} takes true or false, got {value!r}")


TAGS = {
    "prompt": _str, "negative_prompt": _str, "styles": _str, "prompt_for_display": _str,
    "seed": _int, "subseed": _int, "subseed_strength": _float, "seed_resize_from_h": _int, "seed_resize_from_w": _int,
    "sampler_index": _int, "sampler_name": _str, "scheduler": _str, "batch_size": _int, "n_iter": _int,
    "steps": _int, "cfg_scale": _float, "width": _int, "height": _int, "denoising_strength": _float,
    "restore_faces": _bool, "tiling": _bool, "do_not_save_samples": _bool, "do_not_save_grid": _bool,
}
REFUSED = {  # A1111 keys this studio does not take from a text box, and why
    "sd_model": "pick the checkpoint in the UI or with override_settings",
    "outpath_samples": "output folders are server settings", "outpath_grids": "output folders are server settings",
}


def parse_line(line: str) -> dict:
    """One line -> the request fields it sets (ValueError naming the problem)."""
    if not line.startswith("--"):
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise ValueError(f"cannot split the line into arguments ({e})") from None
    out, i = {}, 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ValueError(f"expected an option like --prompt, got {word!r}")
        tag = word[2:]
        if tag in REFUSED:
            raise ValueError(f"--{tag} is not accepted here: {REFUSED[tag]}")
        if tag not in TAGS:
            raise ValueError(f"unknown option --{tag} (options: {', '.join('--' + t for t in TAGS)})")
        values = []
        i += 1
        while i < len(words) and not words[i].startswith("--"):
            values.append(words[i])
            i += 1
        if not values:
            raise ValueError(f"--{tag} needs a value")
        try:
            out[tag] = TAGS[tag](tag, " ".join(values))
        except ValueError as e:
            raise ValueError(f"--{tag}: {e}") from None
    if out.get("restore_faces") or out.get("tiling"):
        raise ValueError("--restore_faces and --tiling are not available in this studio")
    out.pop("restore_faces", None)
    out.pop("tiling", None)
    if "sampler_index" in out:
        names = samplers.sampler_names()
        index = out.pop("sampler_index")
        if not 0 <= index < len(names):
            raise ValueError(f"--sampler_index {index} is out of range (0..{len(names) - 1})")
        out.setdefault("sampler_name", names[index])
    if "styles" in out:
        out["styles"] = [s.strip() for s in out["styles"].split(",") if s.strip()]
    out.pop("prompt_for_display", None)
    return out


def parse_text(text: str) -> list[dict]:
    jobs, problems = [], []
    for number, raw in enumerate(str(text or "").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            jobs.append(parse_line(line))
        except ValueError as e:
            problems.append(f"line {number}: {e}")
    if problems:
        raise ValueError("; ".join(problems))
    return jobs


class Script(scripts.Script):
    def title(self):
        return "Prompts from file or textbox"

    def ui(self, is_img2img):
        checkbox_iterate = gr.Checkbox(label="Iterate seed every line", value=False, elem_id=self.elem_id("checkbox_iterate"))
        checkbox_iterate_batch = gr.Checkbox(label="Use same random seed for all lines", value=False,
                                             elem_id=self.elem_id("checkbox_iterate_batch"))
        prompt_position = gr.Radio(["start", "end"], label="Insert prompts at the", value="start",
                                   elem_id=self.elem_id("prompt_position"))
        prompt_txt = gr.Textbox(label="List of prompt inputs", lines=3, elem_id=self.elem_id("prompt_txt"))
        upload = gr.File(label="Upload prompt inputs", type="binary", elem_id=self.elem_id("file"))
        upload.change(lambda data: (data.decode("utf-8", "replace") if data else gr.update()), inputs=[upload],
                      outputs=[prompt_txt], show_progress="hidden")
        return [checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt]

    def validate_args(self, args):
        checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt = args
        if prompt_position not in ("start", "end"):
            raise ValueError(f"prompt_position must be 'start' or 'end', got {prompt_position!r}")
        if not parse_text(prompt_txt):
            raise ValueError("no prompts: give one prompt (or one line of --options) per line")

    def run(self, p, checkbox_iterate, checkbox_iterate_batch, prompt_position, prompt_txt):
        try:
            jobs = parse_text(prompt_txt)
        except ValueError as e:
            raise scripts.ScriptError(f"Prompts from file or textbox: {e}") from None
        if not jobs:
            raise scripts.ScriptError("Prompts from file or textbox: no prompts")
        if checkbox_iterate or checkbox_iterate_batch:
            processing.fix_seed(p)
        all_images, infotexts, all_prompts, all_seeds, paths, warnings = [], [], [], [], [], set()
        for n, job in enumerate(jobs):
            if p.job is not None:
                if p.job.interrupted:
                    break
                p.job.textinfo = f"Prompts from file: line {n + 1} of {len(jobs)}"
            pc = processing.copy_processing(p)
            for key, value in job.items():
                setattr(pc, key, value)
            if job.get("prompt") and p.prompt:
                pc.prompt = f"{job['prompt']} {p.prompt}" if prompt_position == "start" else f"{p.prompt} {job['prompt']}"
            if job.get("negative_prompt") and p.negative_prompt:
                pc.negative_prompt = (f"{job['negative_prompt']} {p.negative_prompt}" if prompt_position == "start"
                                      else f"{p.negative_prompt} {job['negative_prompt']}")
            if checkbox_iterate and "seed" not in job:
                pc.seed = p.seed + n * p.batch_size * p.n_iter
            result = processing.process_images(pc)
            all_images += result.images[result.grid_count:]
            infotexts += result.infotexts[result.grid_count:]
            all_prompts += result.all_prompts
            all_seeds += result.all_seeds
            paths += result.paths
            warnings.update(result.info.get("warnings", []))
        out = processing.Processed(p, all_images, all_seeds[0] if all_seeds else p.seed, "", all_prompts=all_prompts,
                                   all_seeds=all_seeds, infotexts=infotexts, paths=paths)
        out.info["warnings"] = sorted(warnings)
        return out
