"""The Train tab: LoRA, DreamBooth, Embedding and Captioner sub-tabs (basics first, the rest folded in groups with
kohya's option names and defaults), a dataset preview before starting, Start / Stop / Resume, and the run panel (live
loss plot, learning rate, speed, ETA, memory, sample images; for a captioner run the evaluation plot of BLEU-4,
ROUGE-L and CIDEr and example captions, reference vs before vs now) with the list of past runs, whose config loads
back into the form. It drives the same run manager as the API, which starts the training CLI. No torch here."""
from __future__ import annotations

import dataclasses
import html
import logging

import gradio as gr

from modules.training import config as train_config
from modules.ui.common import clean_text, notice_html

log = logging.getLogger("webui.ui")

DEFAULTS = train_config.TrainConfig()
BASICS = {
    "lora": ["pretrained_model_name_or_path", "train_data_dir", "output_name", "max_train_steps", "max_train_epochs",
             "train_batch_size", "resolution", "learning_rate", "network_dim", "network_alpha"],
    "dreambooth": ["pretrained_model_name_or_path", "train_data_dir", "output_name", "class_prompt",
                   "num_class_images", "max_train_steps", "max_train_epochs", "train_batch_size", "resolution",
                   "learning_rate", "full_fine_tune", "network_dim", "network_alpha"],
    "embedding": ["pretrained_model_name_or_path", "train_data_dir", "output_name", "token_string", "init_word",
                  "num_vectors_per_token", "max_train_steps", "max_train_epochs", "train_batch_size", "resolution",
                  "learning_rate"],
    "captioner": ["pretrained_model_name_or_path", "train_data_dir", "val_data_dir", "output_name", "val_split",
                  "max_train_steps", "max_train_epochs", "train_batch_size", "learning_rate", "lora_language_model",
                  "train_vision_encoder"],
}
GROUPS = {
    "Data and captions": ["reg_data_dir", "caption_extension", "caption_missing_with", "shuffle_caption",
                          "keep_tokens", "caption_dropout_rate", "enable_bucket", "min_bucket_reso",
                          "max_bucket_reso", "bucket_reso_steps", "cache_latents", "cache_latents_to_disk"],
    "Optimizer and schedule": ["optimizer_type", "lr_scheduler", "lr_warmup_steps", "unet_lr", "text_encoder_lr",
                               "gradient_accumulation_steps", "max_grad_norm", "min_snr_gamma", "noise_offset",
                               "prior_loss_weight", "seed"],
    "Network": ["network_train_unet_only", "network_train_text_encoder_only", "train_text_encoder", "clip_skip"],
    "Saving and samples": ["output_dir", "save_every_n_steps", "save_every_n_epochs", "save_state",
                           "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs"],
    "Memory and precision": ["mixed_precision", "gradient_checkpointing", "cache_text_encoder_outputs"],
}
# the captioner sub-tab's groups (the image-generation options mean nothing to a captioner)
CAPTIONER_GROUPS = {
    "Data and captions": ["caption_extension", "seed"],
    "Optimizer and schedule": ["optimizer_type", "lr_scheduler", "lr_warmup_steps", "gradient_accumulation_steps",
                               "max_grad_norm"],
    "LoRA on the language model (BLIP-2)": ["network_dim", "network_alpha"],
    "Evaluation": ["eval_every_n_epochs", "eval_num_beams", "eval_max_length", "eval_examples"],
    "Saving": ["output_dir", "output_format", "save_every_n_steps", "save_every_n_epochs", "save_state"],
    "Memory and precision": ["mixed_precision", "gradient_checkpointing", "memory_budget_mb"],
}
NOT_FOR = {
    "lora": {"class_prompt", "num_class_images", "full_fine_tune", "train_text_encoder", "token_string",
             "init_word", "num_vectors_per_token"},
    "dreambooth": {"token_string", "init_word", "num_vectors_per_token"},
    "embedding": {"network_dim", "network_alpha", "network_train_unet_only", "network_train_text_encoder_only",
                  "full_fine_tune", "train_text_encoder", "class_prompt", "num_class_images", "unet_lr",
                  "text_encoder_lr", "prior_loss_weight", "cache_text_encoder_outputs"},
}
CHOICES = {"lr_scheduler": train_config.LR_SCHEDULERS, "optimizer_type": train_config.OPTIMIZERS,
           "mixed_precision": train_config.PRECISIONS, "output_format": train_config.CAPTIONER_OUTPUT_FORMATS}


def _captioner_bases(webui) -> list[str]:
    """The captioners a run can start from: BLIP / BLIP-2 captioners that are whole folders."""
    try:
        registry = webui.captioning.registry
        registry.refresh()
        return [i.name for i in registry.list() if i.can_caption and i.base_path is None]
    except Exception:  # no captioner folders: the box still takes a typed name or folder
        log.exception("listing the captioners for the Train tab")
        return []


def _component(name: str, webui, method: str = ""):
    f = train_config.FIELDS[name]
    default = f.default
    info = f.metadata.get("help")
    if name == "pretrained_model_name_or_path" and method == "captioner":
        names = _captioner_bases(webui)
        return gr.Dropdown(label="Base captioner (--base)", choices=names, value=names[0] if names else None,
                           allow_custom_value=True, info="a BLIP or BLIP-2 captioner of the Caption tab")
    if name == "pretrained_model_name_or_path":
        names = [c.name for c in webui.registry.list()]
        current = webui.current_checkpoint()
        return gr.Dropdown(label="Base model (pretrained_model_name_or_path)", choices=names,
                           value=current.name if current else None, allow_custom_value=True, info=info)
    if name in CHOICES:
        return gr.Dropdown(label=name, choices=list(CHOICES[name]), value=default, info=info)
    if isinstance(default, bool):
        return gr.Checkbox(label=name, value=default, info=info)
    if isinstance(default, int):
        return gr.Number(label=name, value=default, precision=0, info=info)
    if isinstance(default, float):
        return gr.Number(label=name, value=default, info=info)
    return gr.Textbox(label=name, value=default, info=info, max_lines=1)


def _fields(form: dict, method: str, names: list[str], webui) -> None:
    """Text fields one per line, numbers and switches three to a row."""
    row: list[str] = []

    def flush():
        if row:
            with gr.Row():
                for n in row:
                    form[n] = _component(n, webui, method)
                    form[n].elem_id = f"train_{method}_{n}"
            row.clear()

    for name in names:
        if isinstance(train_config.FIELDS[name].default, str) and name not in CHOICES:
            flush()
            form[name] = _component(name, webui, method)
            form[name].elem_id = f"train_{method}_{name}"
        else:
            row.append(name)
            if len(row) == 3:
                flush()
    flush()


def _status_html(snap: dict | None) -> str:
    if not snap:
        return ""
    parts = [f"<b>Run {snap['id']}</b> ({html.escape(snap['method'])}, {html.escape(str(snap['output_name']))}): "
             f"<span class='train-state'>{html.escape(snap['state'])}</span>",
             f"step {snap['step']}/{snap['total_steps']}, epoch {snap['epoch']}"]
    if snap.get("loss") is not None:
        parts.append(f"loss {snap['loss']:.4f} (smoothed {snap['loss_avg']:.4f})")
    if snap.get("learning_rate") is not None:
        parts.append(f"lr {snap['learning_rate']:.3g}")
    if snap.get("it_s"):
        parts.append(f"{snap['it_s']:.2f} it/s")
    if snap.get("eta_s") is not None:
        parts.append(f"ETA {snap['eta_s']:.0f} s")
    if snap.get("peak_memory"):
        parts.append(f"peak memory {snap['peak_memory'] / 2**20:.0f} MB")
    text = ", ".join(parts)
    if snap.get("outputs"):
        text += "<br>saved: " + ", ".join(html.escape(p) for p in snap["outputs"][-3:])
    if snap.get("error"):
        text += notice_html(clean_text(snap["error"]))
    return f"<div class='train-status' id='train_status_text'>{text}</div>"


LOSS_COLORS = {"loss": "#1f77b4", "smoothed": "#ff7f0e"}


def _loss_frame(snap: dict | None):
    """The loss points for the plot; None while there are none (a plot that starts from an empty frame draws no
    lines for the data it gets later)."""
    import pandas as pd
    if not (snap or {}).get("losses"):
        return None
    rows = []
    for point in (snap or {}).get("losses", []):
        rows.append({"step": point["step"], "loss": point["loss"], "series": "loss"})
        rows.append({"step": point["step"], "loss": point["loss_avg"], "series": "smoothed"})
    # typed even when empty: the plot reads the column kinds (numbers, not labels) from the dtypes
    frame = pd.DataFrame(rows, columns=["step", "loss", "series"])
    return frame.astype({"step": "int64", "loss": "float64", "series": "str"})


EVAL_METRICS = ("CIDEr", "BLEU-4", "ROUGE-L", "BLEU-1")
EVAL_COLORS = {"CIDEr": "#2ca02c", "BLEU-4": "#d62728", "ROUGE-L": "#9467bd", "BLEU-1": "#8c564b"}


def _eval_frame(snap: dict | None):
    """The evaluation scores by step for the plot (a captioner run's); None while there are none."""
    import pandas as pd
    evals = (snap or {}).get("evals") or []
    if not evals:
        return None
    rows = [{"step": e["step"], "score": float(e[m]), "metric": m} for e in evals for m in EVAL_METRICS if m in e]
    frame = pd.DataFrame(rows, columns=["step", "score", "metric"])
    return frame.astype({"step": "int64", "score": "float64", "metric": "str"})


def _examples_html(snap: dict | None) -> str:
    snap = snap or {}
    examples, evals = snap.get("examples") or [], snap.get("evals") or []
    if not examples and not evals:
        return ""
    rows = "".join(f"<tr><td>{html.escape(e['tag'] or '')}</td><td>{e['step']}</td>"
                   + "".join(f"<td>{e[m]:.3f}</td>" for m in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr")) + "</tr>"
                   for e in evals)
    table = (f"<table class='train-eval-table' style='width:100%;font-size:smaller'><tr><th>evaluation</th><th>step</th><th>BLEU-1</th><th>BLEU-4</th>"
             f"<th>ROUGE-L</th><th>CIDEr</th></tr>{rows}</table>") if evals else ""
    cells = "".join(f"<tr><td>{html.escape(clean_text(x['reference']))}</td><td>{html.escape(clean_text(x['before']))}"
                    f"</td><td>{html.escape(clean_text(x['now']))}</td></tr>" for x in examples)
    sample = (f"<table class='train-eval-examples' style='width:100%;font-size:smaller'><tr><th>reference</th><th>before training</th><th>now</th></tr>"
              f"{cells}</table>") if examples else ""
    return f"<div id='train_eval_text'>{table}{sample}</div>"


def _run_choices(webui, owner) -> list[str]:
    return [f"{r.id}: {r.method} {r.cfg.output_name} ({r.state})" for r in reversed(webui.training.list(owner))]


def _run_id(choice) -> int | None:
    try:
        return int(str(choice).split(":", 1)[0])
    except (TypeError, ValueError):
        return None


def _thumbnail(path):
    # PIL thumbnails, not paths: Gradio serves only files under its allowed paths, and data folders may be anywhere
    from PIL import Image
    with Image.open(path) as im:
        im.thumbnail((192, 192))
        return im.convert("RGB")


def _owner(request: gr.Request | None):
    return getattr(request, "username", None) if request is not None else None


def create_tab(webui) -> gr.Textbox:
    """The Train tab's content (the caller opens the gr.Tab); returns the box that changes when a run ends."""
    from modules.training.dataset import DatasetError

    service = webui.training
    forms: dict[str, dict[str, gr.components.Component]] = {}
    buttons = {}
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Tabs(elem_id="train_methods"):
                for method, title in (("lora", "LoRA"), ("dreambooth", "DreamBooth"), ("embedding", "Embedding"),
                                      ("captioner", "Captioner")):
                    with gr.Tab(title, id=f"train_{method}", elem_id=f"tab_train_{method}"):
                        form = {}
                        _fields(form, method, BASICS[method], webui)
                        groups = CAPTIONER_GROUPS if method == "captioner" else GROUPS
                        for group, names in groups.items():
                            with gr.Accordion(group, open=False):
                                _fields(form, method, [n for n in names if n not in NOT_FOR.get(method, ())],
                                        webui)
                        with gr.Row():
                            preview = gr.Button("Preview dataset", elem_id=f"train_{method}_preview")
                            start = gr.Button("Start training", variant="primary", elem_id=f"train_{method}_start")
                        forms[method] = form
                        buttons[method] = (preview, start)
            notice = gr.HTML("", elem_id="train_notice")
            preview_text = gr.HTML("", elem_id="train_preview_text")
            preview_gallery = gr.Gallery(label="Dataset preview", columns=6, height=260, elem_id="train_preview",
                                         visible=False)
        with gr.Column(scale=2):
            with gr.Row():
                # a custom value passes: a label whose state has changed meanwhile ("3: lora x (queued)" while the
                # list says "(starting)") still names its run, and the next refresh puts the current label in
                runs = gr.Dropdown(label="Runs", choices=_run_choices(webui, None), elem_id="train_runs",
                                   interactive=True, allow_custom_value=True)
                stop = gr.Button("Stop", elem_id="train_stop", variant="stop")
                resume = gr.Button("Resume", elem_id="train_resume")
                load = gr.Button("Load config", elem_id="train_load_config")
            status = gr.HTML("", elem_id="train_status")
            plot = gr.LinePlot(None, x="step", y="loss", color="series", label="Loss", color_map=LOSS_COLORS,
                               elem_id="train_loss_plot", height=260)
            eval_plot = gr.LinePlot(None, x="step", y="score", color="metric", color_map=EVAL_COLORS, height=220,
                                    label="Evaluation on the held-out captions (captioner runs)",
                                    elem_id="train_eval_plot")
            eval_text = gr.HTML("", elem_id="train_eval")
            samples = gr.Gallery(label="Samples", columns=4, height=220, elem_id="train_samples")
    timer = gr.Timer(1.0, active=True)
    # "<run id>:<state>" of the shown run once it has ended: the wiring re-renders the extra-network panels on a
    # change, so a finished run's LoRA card appears in txt2img without a click
    ended = gr.Textbox("", visible=False, elem_id="train_ended")

    def values_of(method, args) -> dict:
        names = list(forms[method])
        values = {}
        for name, value in zip(names, args):
            kind = type(train_config.FIELDS[name].default)
            if value is None and kind is not str:
                continue
            if kind is str:
                value = "" if value is None else str(value).strip()
            values[name] = value
        return values

    def do_preview(method, *args):
        try:
            _, plan = service.check(method, values_of(method, args))
        except (train_config.TrainConfigError, DatasetError) as e:
            gr.Warning(clean_text(str(e)))
            return notice_html(clean_text(str(e))), "", gr.update(visible=False)
        summary = plan.summary()
        ds = summary["dataset"]
        buckets = ", ".join(f"{b['size'][0]}x{b['size'][1]}: {b['count']}" for b in ds["buckets"])
        if method == "captioner":
            held = (f"{summary['val_images']} held out for the evaluations ({html.escape(summary['val_source'])})"
                    if summary["val_images"] else "none held out (no evaluation: give val_split or val_data_dir)")
            text = (f"<div id='train_preview_summary'>{ds['images']} captioned images ({ds['repeats_total']} with "
                    f"repeats), {held}; {summary['steps_per_epoch']} steps per epoch, <b>{summary['total_steps']} "
                    f"steps</b> in all; {summary['trainable_params'] / 1e6:.2f}M of {summary['total_params'] / 1e6:.2f}M "
                    f"parameters train, about {summary['memory_estimate_mb']} MB; the result is saved "
                    f"{'whole' if summary['output_format'] == 'full' else 'as the trained tensors only'}"
                    + (f"; {html.escape('; '.join(ds['warnings'][:5]))}" if ds["warnings"] else "") + "</div>")
            items = [(_thumbnail(item["path"]), f"x{item['repeats']}: {item['caption']}")
                     for item in plan.data.preview()[:60]]
            return "", text, gr.update(value=items, visible=True)
        text = (f"<div id='train_preview_summary'>{ds['images']} images ({ds['repeats_total']} with repeats, "
                f"{ds['reg_images']} regularisation), buckets {html.escape(buckets)}; {summary['steps_per_epoch']} "
                f"steps per epoch, <b>{summary['total_steps']} steps</b> in all"
                + (f"; skipped: {html.escape(', '.join(s[0] for s in ds['skipped']))}" if ds["skipped"] else "")
                + "</div>")
        items = [(_thumbnail(item["path"]),
                  f"{item['bucket'][0]}x{item['bucket'][1]}, x{item['repeats']}: {item['caption']}")
                 for item in plan.data.preview()[:60]]
        return "", text, gr.update(value=items, visible=True)

    def do_start(method, *args, request: gr.Request = None):
        owner = _owner(request)
        try:
            run = service.start(method, values_of(method, args), owner)
        except Exception as e:
            from modules.training.runs import RunBusyError
            if not isinstance(e, (train_config.TrainConfigError, DatasetError, RunBusyError)):
                raise
            gr.Warning(clean_text(str(e)))
            return notice_html(clean_text(str(e))), gr.update()
        choices = _run_choices(webui, owner)
        return "", gr.update(choices=choices, value=next(c for c in choices if _run_id(c) == run.id))

    for method, (preview, start) in buttons.items():
        inputs = list(forms[method].values())
        m = gr.State(method)
        preview.click(do_preview, [m, *inputs], [notice, preview_text, preview_gallery])
        start.click(do_start, [m, *inputs], [notice, runs])

    # (run id, points plotted, samples shown, choices, evaluations plotted): only what changed is sent
    shown = gr.State(None)

    def refresh(choice, last, request: gr.Request = None):
        owner = _owner(request)
        run_id = _run_id(choice)
        choices = _run_choices(webui, owner)
        last = last or (None, -1, -1, [], -1)
        runs_update = gr.update(choices=choices) if choices != last[3] else gr.update()
        if run_id is None:
            return (runs_update, "", gr.update(), gr.update(), (None, -1, -1, choices, -1), gr.update(), gr.update(),
                    gr.update())
        try:
            snap = service.get(run_id, owner).snapshot()
        except LookupError:
            return (gr.update(choices=choices, value=None), "", _loss_frame(None), [], (None, -1, -1, choices, -1),
                    gr.update(), _eval_frame(None), "")
        if choices != last[3] or choice not in choices:
            runs_update = gr.update(choices=choices, value=next((c for c in choices if _run_id(c) == run_id), None))
        same_run = last[0] == run_id
        plot_update = gr.update() if same_run and last[1] == len(snap["losses"]) else _loss_frame(snap)
        samples_update = gr.update() if same_run and last[2] == len(snap["samples"]) else [
            (_thumbnail(p), f"step {p.rsplit('step', 1)[-1][:6]}") for p in snap["samples"][-12:]]
        ended_update = f"{run_id}:{snap['state']}" if snap["state"] in ("done", "stopped", "failed") else gr.update()
        evals_same = same_run and len(last) > 4 and last[4] == len(snap["evals"])
        eval_update = gr.update() if evals_same else _eval_frame(snap)
        eval_text_update = gr.update() if evals_same else _examples_html(snap)
        return (runs_update, _status_html(snap), plot_update, samples_update,
                (run_id, len(snap["losses"]), len(snap["samples"]), choices, len(snap["evals"])), ended_update,
                eval_update, eval_text_update)

    outputs = [runs, status, plot, samples, shown, ended, eval_plot, eval_text]
    timer.tick(refresh, [runs, shown], outputs, show_progress="hidden")
    runs.input(refresh, [runs, gr.State(None)], outputs, show_progress="hidden")

    def do_stop(choice, request: gr.Request = None):
        run_id = _run_id(choice)
        if run_id is None:
            return notice_html("choose a run to stop")
        try:
            service.stop(run_id, _owner(request))
        except LookupError as e:
            return notice_html(str(e))
        return ""

    stop.click(do_stop, [runs], [notice])

    def do_resume(choice, request: gr.Request = None):
        owner = _owner(request)
        run_id = _run_id(choice)
        try:
            if run_id is None:
                return notice_html("choose a stopped run to resume"), gr.update()
            run = service.resume(run_id, {}, owner)
        except Exception as e:
            from modules.training.runs import RunBusyError
            if not isinstance(e, (train_config.TrainConfigError, DatasetError, RunBusyError, LookupError)):
                raise
            gr.Warning(clean_text(str(e)))
            return notice_html(clean_text(str(e))), gr.update()
        choices = _run_choices(webui, owner)
        return "", gr.update(choices=choices, value=next(c for c in choices if _run_id(c) == run.id))

    resume.click(do_resume, [runs], [notice, runs])

    all_outputs = [c for method in forms for c in forms[method].values()]

    def do_load(choice, request: gr.Request = None):
        run_id = _run_id(choice)
        try:
            run = service.get(run_id, _owner(request)) if run_id is not None else None
        except LookupError:
            run = None
        if run is None:
            return [gr.update()] * len(all_outputs)
        cfg = dataclasses.asdict(run.cfg)
        out = []
        for method in forms:
            for name in forms[method]:
                out.append(gr.update(value=cfg[name]) if method == run.method else gr.update())
        return out

    load.click(do_load, [runs], all_outputs)
    return ended
