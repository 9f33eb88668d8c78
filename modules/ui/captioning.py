"""The Caption (with batch captioning, evaluation and downloads), VQA and Image search tabs. Thin: inputs ->
a captioning request -> a job on the shared queue -> the result. No torch here."""
from __future__ import annotations

import html
import logging
import time
from pathlib import Path

import gradio as gr

from modules.ui.common import (
    NotAnImage,
    UploadImage,
    clean_text,
    job_error_message,
    notice_html,
    progress_html,
)

log = logging.getLogger("webui.ui")

STYLES = ["short", "a photo of", "detailed", "custom"]

# "Send to txt2img prompt": write the caption into the txt2img prompt box the way typing would (so
# Gradio sees the change) and switch to the txt2img tab; no server round trip is needed.
SEND_TO_TXT2IMG_JS = """
(caption) => {
  const box = document.querySelector('#txt2img_prompt textarea');
  if (box) { box.value = caption || ''; box.dispatchEvent(new Event('input', {bubbles: true})); }
  const tab = [...document.querySelectorAll('button[role="tab"]')].find(b => b.textContent.trim() === 'txt2img');
  if (tab) tab.click();
  return caption;
}
"""


def _error_html(message: str) -> str:
    return notice_html(message)


def _thumbnail(path: Path):
    # PIL thumbnails, not paths: Gradio serves only files under its allowed paths, and a search folder may be anywhere
    from PIL import Image
    with Image.open(path) as im:
        im.thumbnail((256, 256))
        return im.convert("RGB")


def _owner(request: gr.Request | None):
    return getattr(request, "username", None) if request is not None else None


def create_tabs(webui) -> None:
    """Add the Caption, VQA and Image search tabs to the enclosing gr.Tabs."""
    from modules import captioning

    service = webui.captioning

    def names(purpose: str) -> list[str]:
        service.registry.refresh()
        ok = {"caption": lambda i: i.can_caption, "vqa": lambda i: i.can_answer,
              "search": lambda i: i.kind == "blip2-itm"}[purpose]
        return [i.name for i in service.registry.list() if ok(i)]

    def default(purpose: str):
        try:
            return service.registry.resolve(None, purpose=purpose).name
        except captioning.CaptionerError:
            return None

    def model_dropdown(purpose: str, elem_id: str):
        label = {"caption": "Captioner", "vqa": "Model", "search": "Retrieval model"}[purpose]
        return gr.Dropdown(label=label,
                           choices=names(purpose), value=default(purpose), elem_id=elem_id, interactive=True,
                           allow_custom_value=False)

    def run_job(submit, request):
        """Queue, wait, and turn errors into a notice (returned) plus a toast (raised by the caller)."""
        try:
            job = submit(_owner(request))
            return job.wait(), None
        except Exception as e:  # a failing model must not take the UI down: say what went wrong, plainly
            return None, job_error_message(e)

    # --------------------------------------------------------------------------------------- Caption
    with gr.Tab("Caption", id="caption", elem_id="tab_caption") as caption_tab:
        with gr.Row():
            with gr.Column():
                cap_image = UploadImage(label="Image", type="pil", format="png", sources=["upload", "clipboard"],
                                     elem_id="caption_image", height=320)
                with gr.Row():
                    cap_model = model_dropdown("caption", "caption_model")
                    cap_refresh = gr.Button("🔄", elem_id="caption_refresh", scale=0, min_width=50)
                cap_style = gr.Radio(STYLES, value="a photo of", label="Style", elem_id="caption_style")
                cap_prompt = gr.Textbox(label="Custom prompt (the caption continues it)", value="a photo of",
                                        visible=False, elem_id="caption_prompt")
                with gr.Accordion("Decoding", open=False, elem_id="caption_decoding"):
                    with gr.Row():
                        cap_beams = gr.Slider(1, 10, value=5, step=1, label="Beams", elem_id="caption_beams")
                        cap_rep = gr.Slider(1.0, 3.0, value=1.0, step=0.05, label="Repetition penalty",
                                            elem_id="caption_repetition_penalty")
                    with gr.Row():
                        cap_min = gr.Slider(0, 75, value=8, step=1, label="Min length (tokens)", elem_id="caption_min_length")
                        cap_max = gr.Slider(1, 150, value=30, step=1, label="Max length (tokens)", elem_id="caption_max_length")
                    with gr.Row():
                        cap_nucleus = gr.Checkbox(label="Nucleus sampling", value=False, elem_id="caption_nucleus")
                        cap_top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", elem_id="caption_top_p")
                        cap_seed = gr.Number(label="Seed (sampling)", value=0, precision=0, elem_id="caption_seed")
                    cap_int8 = gr.Checkbox(label="Load 8-bit (bitsandbytes, CUDA only)", value=False,
                                           elem_id="caption_int8")
            with gr.Column():
                cap_run = gr.Button("Caption", variant="primary", elem_id="caption_run")
                cap_output = gr.Textbox(label="Caption", lines=3, buttons=["copy"], elem_id="caption_output",
                                        interactive=True)
                cap_send = gr.Button("Send to txt2img prompt", elem_id="caption_send_txt2img")
                cap_error = gr.HTML("", elem_id="caption_error")

        with gr.Accordion("Batch captioning (a caption file beside each image)", open=False, elem_id="caption_batch"):
            with gr.Row():
                b_folder = gr.Textbox(label="Folder", elem_id="caption_batch_folder", scale=4)
                b_recursive = gr.Checkbox(label="Include sub-folders", value=False, elem_id="caption_batch_recursive")
            with gr.Row():
                b_ext = gr.Textbox(label="Caption file extension", value=".txt", elem_id="caption_batch_extension")
                b_prefix = gr.Textbox(label="Prefix", elem_id="caption_batch_prefix")
                b_suffix = gr.Textbox(label="Suffix", elem_id="caption_batch_suffix")
            with gr.Row():
                b_overwrite = gr.Checkbox(label="Overwrite existing caption files", value=False,
                                          elem_id="caption_batch_overwrite")
                b_size = gr.Slider(1, 32, value=4, step=1, label="Batch size", elem_id="caption_batch_size")
            b_run = gr.Button("Caption folder", variant="primary", elem_id="caption_batch_run")
            b_progress = gr.HTML("", elem_id="caption_batch_progress")
            b_summary = gr.Textbox(label="Summary", lines=4, interactive=False, elem_id="caption_batch_summary")

        with gr.Accordion("Evaluation (BLEU, ROUGE-L, CIDEr; VQA accuracy)", open=False, elem_id="caption_eval"):
            e_folder = gr.Textbox(label="Folder of images with reference captions beside them (one per line)",
                                  elem_id="caption_eval_folder")
            e_json = gr.Textbox(label='...or a VQA JSON file: [{"image", "question", "answers": [...]}]',
                                elem_id="caption_eval_vqa_json")
            e_run = gr.Button("Evaluate", elem_id="caption_eval_run")
            e_result = gr.JSON(label="Scores", elem_id="caption_eval_result")
            e_error = gr.HTML("", elem_id="caption_eval_error")

        with gr.Accordion("Download a captioner", open=False, elem_id="caption_download"):
            with gr.Row():
                d_name = gr.Dropdown(list(captioning.KNOWN_CAPTIONERS), value="blip-image-captioning-base",
                                     label="Model", elem_id="caption_download_name", allow_custom_value=True)
                d_run = gr.Button("Download", elem_id="caption_download_run", scale=0)
            d_status = gr.HTML("", elem_id="caption_download_status")

    def on_style(style):
        preset = captioning.CAPTION_STYLES.get(style)
        if preset is None:
            return gr.update(visible=True), gr.update(), gr.update(), gr.update()
        return (gr.update(visible=False), gr.update(value=preset.min_length), gr.update(value=preset.max_length),
                gr.update(value=preset.repetition_penalty))

    cap_style.change(on_style, inputs=[cap_style], outputs=[cap_prompt, cap_min, cap_max, cap_rep], queue=False)

    def settings_from(style, prompt, beams, rep, mn, mx, nucleus, top_p, seed):
        text = prompt if style == "custom" else captioning.CAPTION_STYLES[style].prompt
        return captioning.CaptionSettings(prompt=text or "", num_beams=int(beams), repetition_penalty=float(rep),
                                          min_length=int(mn), max_length=int(mx), nucleus=bool(nucleus),
                                          top_p=float(top_p), seed=int(seed or 0))

    decoding = [cap_style, cap_prompt, cap_beams, cap_rep, cap_min, cap_max, cap_nucleus, cap_top_p, cap_seed]

    def on_caption(image, model, *values, request: gr.Request = None):
        *dec, int8 = values
        if image is None or isinstance(image, NotAnImage):
            message = image.message if image is not None else "No image: upload an image to caption."
            gr.Warning(message)
            return "", _error_html(message)
        req = captioning.CaptionRequest(image=image.convert("RGB"), model=model, settings=settings_from(*dec),
                                        int8=bool(int8))
        caption, error = run_job(lambda owner: service.submit_caption(req, owner), request)
        if error:
            gr.Warning(error)
            return gr.update(), _error_html(error)
        return clean_text(caption), ""

    cap_run.click(on_caption, inputs=[cap_image, cap_model, *decoding, cap_int8], outputs=[cap_output, cap_error],
                  concurrency_limit=None)
    cap_send.click(None, inputs=[cap_output], js=SEND_TO_TXT2IMG_JS)
    cap_refresh.click(lambda: gr.update(choices=names("caption"), value=default("caption")), outputs=[cap_model],
                      queue=False)

    def on_batch(folder, recursive, ext, prefix, suffix, overwrite, size, model, *dec, request: gr.Request = None):
        try:
            req = captioning.BatchCaptionRequest(folder=Path(folder or ""), model=model, settings=settings_from(*dec),
                                                 recursive=bool(recursive), extension=ext or ".txt",
                                                 prefix=prefix or "", suffix=suffix or "",
                                                 overwrite=bool(overwrite), batch_size=int(size))
            job = service.submit_batch(req, _owner(request))
        except (captioning.CaptionerError, ValueError) as e:
            gr.Warning(str(e))
            yield _error_html(str(e)), ""
            return
        while job.status in ("queued", "running"):
            yield progress_html(job), gr.update()
            time.sleep(0.3)
        try:
            summary = job.wait()
        except Exception as e:
            log.exception("batch captioning failed")
            yield _error_html(f"batch captioning failed: {e}"), ""
            return
        yield "", summary.text()

    b_run.click(on_batch, inputs=[b_folder, b_recursive, b_ext, b_prefix, b_suffix, b_overwrite, b_size, cap_model,
                                  *decoding], outputs=[b_progress, b_summary], concurrency_limit=None)

    def on_evaluate(folder, vqa_json, model, *dec, request: gr.Request = None):
        req = captioning.EvaluateRequest(folder=Path(folder or "."), model=model, settings=settings_from(*dec),
                                         vqa_json=Path(vqa_json) if (vqa_json or "").strip() else None)
        if req.vqa_json is None and not (folder or "").strip():
            return None, _error_html("Give a folder of images with reference captions, or a VQA JSON file.")
        result, error = run_job(lambda owner: service.submit_evaluate(req, owner), request)
        if error:
            gr.Warning(error)
            return None, _error_html(error)
        return result, ""

    e_run.click(on_evaluate, inputs=[e_folder, e_json, cap_model, *decoding], outputs=[e_result, e_error],
                concurrency_limit=None)

    def on_download(name, progress=gr.Progress(track_tqdm=True)):
        # A download is network work, not GPU work: it runs here, not on the job queue, with tqdm's bars shown.
        try:
            target = captioning.download_captioner(name, service.models_dir)
        except captioning.CaptionerDownloadError as e:
            gr.Warning(str(e))
            return _error_html(str(e)), gr.update()
        service.registry.refresh()
        return (f"<div>Downloaded to {html.escape(str(target))}.</div>",
                gr.update(choices=names("caption"), value=default("caption")))

    d_run.click(on_download, inputs=[d_name], outputs=[d_status, cap_model])

    # ------------------------------------------------------------------------------------------- VQA
    with gr.Tab("VQA", id="vqa", elem_id="tab_vqa") as vqa_tab:
        with gr.Row():
            with gr.Column():
                vqa_image = UploadImage(label="Image", type="pil", format="png", sources=["upload", "clipboard"],
                                     elem_id="vqa_image", height=320)
                with gr.Row():
                    vqa_model = model_dropdown("vqa", "vqa_model")
                    vqa_refresh = gr.Button("🔄", elem_id="vqa_refresh", scale=0, min_width=50)
            with gr.Column():
                vqa_chat = gr.Chatbot(label="Conversation", elem_id="vqa_chat", height=320)
                vqa_question = gr.Textbox(label="Question", placeholder="Ask about the image and press Enter",
                                          elem_id="vqa_question")
                with gr.Row():
                    vqa_ask = gr.Button("Ask", variant="primary", elem_id="vqa_ask")
                    vqa_clear = gr.Button("Clear conversation", elem_id="vqa_clear")
                vqa_error = gr.HTML("", elem_id="vqa_error")
        vqa_turns = gr.State([])  # inside the tab: a component between two tabs breaks Gradio's tab strip

    def on_ask(image, model, question, turns, request: gr.Request = None):
        turns = list(turns or [])
        if isinstance(image, NotAnImage):
            gr.Warning(image.message)
            return gr.update(), gr.update(), turns, _error_html(image.message)
        if image is None or not (question or "").strip():
            message = "No image: upload an image first." if image is None else "The question is empty."
            return gr.update(), gr.update(), turns, _error_html(message)
        req = captioning.VqaRequest(image=image.convert("RGB"), question=question, model=model,
                                    history=tuple((q, a) for q, a in turns))
        answer, error = run_job(lambda owner: service.submit_vqa(req, owner), request)
        if error:
            gr.Warning(error)
            return gr.update(), gr.update(), turns, _error_html(error)
        turns.append((question, clean_text(answer)))
        chat = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
        return chat, "", turns, ""

    def relist(purpose: str, current):
        """The model list again (a captioner trained meanwhile appears), the choice kept while it exists."""
        choices = names(purpose)
        return gr.update(choices=choices, value=current if current in choices else default(purpose))

    # opening the tab lists the captioners on disk now: a fine-tuned one appears without a restart or a click
    caption_tab.select(lambda current: relist("caption", current), inputs=[cap_model], outputs=[cap_model],
                       queue=False)
    vqa_tab.select(lambda current: relist("vqa", current), inputs=[vqa_model], outputs=[vqa_model], queue=False)
    vqa_refresh.click(lambda current: relist("vqa", current), inputs=[vqa_model], outputs=[vqa_model], queue=False)

    ask_io = dict(inputs=[vqa_image, vqa_model, vqa_question, vqa_turns],
                  outputs=[vqa_chat, vqa_question, vqa_turns, vqa_error], concurrency_limit=None)
    vqa_ask.click(on_ask, **ask_io)
    vqa_question.submit(on_ask, **ask_io)
    vqa_clear.click(lambda: ([], [], "", ""), outputs=[vqa_chat, vqa_turns, vqa_question, vqa_error], queue=False)
    # a new image starts a new conversation: earlier answers were about the old one
    vqa_image.change(lambda: ([], []), outputs=[vqa_chat, vqa_turns], queue=False)

    # ---------------------------------------------------------------------------------- Image search
    with gr.Tab("Image search", id="search", elem_id="tab_search"):
        with gr.Row():
            s_query = gr.Textbox(label="Describe the image", elem_id="search_query", scale=4)
            s_run = gr.Button("Search", variant="primary", elem_id="search_run", scale=0)
        with gr.Row():
            s_folder = gr.Textbox(label="Folder (empty: the outputs folder)", elem_id="search_folder", scale=4)
            s_model = model_dropdown("search", "search_model")
            s_top_k = gr.Slider(1, 100, value=12, step=1, label="Top k", elem_id="search_top_k")
            s_rerank = gr.Checkbox(label="Re-rank with ITM", value=True, elem_id="search_rerank")
        s_error = gr.HTML("", elem_id="search_error")
        s_gallery = gr.Gallery(label="Results", columns=6, height=480, elem_id="search_gallery", interactive=False)

    def on_search(query, folder, model, top_k, rerank, request: gr.Request = None):
        req = captioning.SearchRequest(query=query or "", folder=Path(folder) if (folder or "").strip() else None,
                                       model=model, top_k=int(top_k), rerank=bool(rerank))
        hits, error = run_job(lambda owner: service.submit_search(req, owner), request)
        if error:
            gr.Warning(error)
            return gr.update(), _error_html(error)
        items = [(_thumbnail(h.path), f"{h.path.name}  ITM {h.itm:.3f}  ITC {h.itc:.3f}" if h.itm is not None
                  else f"{h.path.name}  ITC {h.itc:.3f}") for h in hits]
        return items, "" if items else _error_html("No image found in that folder.")

    s_run.click(on_search, inputs=[s_query, s_folder, s_model, s_top_k, s_rerank], outputs=[s_gallery, s_error],
                concurrency_limit=None)
    s_query.submit(on_search, inputs=[s_query, s_folder, s_model, s_top_k, s_rerank], outputs=[s_gallery, s_error],
                   concurrency_limit=None)
