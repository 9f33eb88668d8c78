"""Captioning service: caption, VQA, batch captioning, image-text search and evaluation, run as jobs on the one worker.

Requests are frozen dataclasses validated before they are queued (so bad input fails at once with a
CaptionerError, never inside the worker). The work functions (`run_*`) lease models from the model
manager for the length of one job, so a caption may move an SD checkpoint to RAM and back, as any other
model under the same budgets. Generation calls are exactly transformers' `processor(...)` +
`model.generate(...)` with the request's settings: the fidelity test compares them token for token.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from modules.captioning import metrics
from modules.captioning.models import (
    KIND_BLIP,
    CaptionerError,
    CaptionerInfo,
    CaptionerRegistry,
    captioner_key,
    use_captioner,
)

log = logging.getLogger("webui.captioning")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SEARCH_INDEX_VERSION = "1"


# ------------------------------------------------------------------------------------------ requests

@dataclass(frozen=True)
class CaptionSettings:
    """Decoding settings. The defaults are BLIP-2's caption settings (beam 5, 8-30 new tokens)."""
    prompt: str = ""
    num_beams: int = 5
    nucleus: bool = False  # sample with top_p instead of beam search only
    top_p: float = 0.9
    min_length: int = 8  # new tokens
    max_length: int = 30  # new tokens
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    seed: int = 0  # used when sampling

    def validate(self) -> "CaptionSettings":
        if not 1 <= self.num_beams <= 16:
            raise CaptionerError(f"num_beams must be 1..16, got {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise CaptionerError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_length <= 512:
            raise CaptionerError(f"max_length must be 1..512 tokens, got {self.max_length}")
        if not 0 <= self.min_length <= self.max_length:
            raise CaptionerError(f"min_length must be 0..max_length ({self.max_length}), got {self.min_length}")
        if not 0.5 <= self.repetition_penalty <= 10:
            raise CaptionerError(f"repetition_penalty must be 0.5..10, got {self.repetition_penalty}")
        return self

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(num_beams=self.num_beams, max_new_tokens=self.max_length,
                                      min_new_tokens=self.min_length, repetition_penalty=self.repetition_penalty,
                                      length_penalty=self.length_penalty)
        if self.nucleus:
            kwargs.update(do_sample=True, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False)
        return kwargs


# Caption styles: short and detailed come from the prompt and the length settings (BLIP-2 paper/LAVIS).
CAPTION_STYLES = {
    "short": CaptionSettings(prompt="", min_length=5, max_length=20),
    "a photo of": CaptionSettings(prompt="a photo of", min_length=8, max_length=30),
    "detailed": CaptionSettings(prompt="a detailed description of this picture:", min_length=30, max_length=75,
                                repetition_penalty=1.5),
}
# VQA: beam 5, at most 10 tokens, length penalty -1 (short answers), as LAVIS answers questions.
VQA_SETTINGS = CaptionSettings(num_beams=5, min_length=1, max_length=10, length_penalty=-1.0)


@dataclass(frozen=True)
class CaptionRequest:
    image: Any  # a PIL image
    model: str | None = None  # captioner folder name; None/"clip" -> the default captioner
    settings: CaptionSettings = field(default_factory=CaptionSettings)
    int8: bool = False


@dataclass(frozen=True)
class VqaRequest:
    image: Any
    question: str
    model: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # earlier (question, answer) turns, oldest first
    settings: CaptionSettings = VQA_SETTINGS
    int8: bool = False


@dataclass(frozen=True)
class BatchCaptionRequest:
    folder: Path
    model: str | None = None
    settings: CaptionSettings = field(default_factory=CaptionSettings)
    recursive: bool = False
    extension: str = ".txt"  # kohya's scripts default to ".caption"
    prefix: str = ""
    suffix: str = ""
    overwrite: bool = False  # False: images that already have a caption file are skipped
    batch_size: int = 4
    int8: bool = False


@dataclass
class BatchSummary:
    captioned: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    interrupted: bool = False

    def text(self) -> str:
        lines = [f"Captioned {len(self.captioned)}, skipped {len(self.skipped)} (caption file exists), "
                 f"failed {len(self.failed)}" + (" - interrupted" if self.interrupted else "") + "."]
        lines += [f"failed: {p}: {why}" for p, why in self.failed]
        return "\n".join(lines)


@dataclass(frozen=True)
class SearchRequest:
    query: str
    folder: Path
    model: str | None = None
    top_k: int = 10
    rerank: bool = True  # re-rank the top k by the image-text matching head


@dataclass(frozen=True)
class SearchHit:
    path: Path
    itc: float  # max over query tokens of the cosine similarity (the contrastive score)
    itm: float | None  # probability that image and text match (the ITM head), for the re-ranked top k


@dataclass(frozen=True)
class EmbeddingsRequest:
    """Retrieval embeddings of images (PIL) or of texts, in the space the Image search tab ranks in."""
    images: tuple = ()
    texts: tuple[str, ...] = ()
    model: str | None = None  # a blip2-itm folder name; None -> the first one
    batch_size: int = 8


@dataclass(frozen=True)
class EvaluateRequest:
    folder: Path  # images with reference captions beside them (same stem + extension), one per line
    model: str | None = None
    settings: CaptionSettings = field(default_factory=CaptionSettings)
    extension: str = ".txt"
    vqa_json: Path | None = None  # instead: [{"image", "question", "answers": [...]}] (paths relative to it)


# ------------------------------------------------------------------------------------------ helpers

def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def check_folder(folder: Path | str, what: str = "folder") -> Path:
    if not str(folder).strip():
        raise CaptionerError(f"{what} is empty: give a folder of images")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CaptionerError(f"{what} {str(folder)!r} does not exist or is not a folder")
    return folder.resolve()


def normalize_extension(ext: str) -> str:
    ext = (ext or ".txt").strip()
    ext = ext if ext.startswith(".") else "." + ext
    if "/" in ext or "\\" in ext or ext in (".", "..") or ext.lower() in IMAGE_EXTENSIONS:
        raise CaptionerError(f"caption file extension {ext!r} is not allowed")
    return ext


def vqa_prompt(info: CaptionerInfo, question: str, history: tuple[tuple[str, str], ...] = ()) -> str:
    """BLIP-2's VQA prompt with earlier turns prepended: "Question: q1 Answer: a1. Question: q2 Answer:"."""
    word = info.vqa_answer_word
    turns = [f"Question: {q.strip()} {word} {a.strip().rstrip('.')}." for q, a in history]
    return " ".join(turns + [f"Question: {question.strip()} {word}"])


def processor_inputs(loaded, images: list, prompt: str) -> dict:
    """`processor(images, text)` on the model's device, pixel values in the vision tower's dtype."""
    inputs = loaded.processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    device, dtype = loaded.device, loaded.dtype
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}


def decode_generated(loaded, output, inputs: dict, prompt: str) -> list[str]:
    """Text of each generated sequence. Decoder-only BLIP-2 returns the prompt ids (32 image tokens + text)
    first: they are cut off and the prompt text put back in front, so a caption reads "a photo of ...".
    BLIP v1 returns the prompt as part of its text already; FlanT5 returns only new tokens."""
    tokenizer = loaded.processor.tokenizer
    if loaded.info.kind == KIND_BLIP:
        return [t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
    if getattr(loaded.model.config, "use_decoder_only_language_model", True):
        output = output[:, inputs["input_ids"].shape[1]:]
    texts = [t.strip() for t in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return [f"{prompt.strip()} {t}".strip() if prompt.strip() else t for t in texts]


def generate_text(loaded, images: list, prompt: str, settings: CaptionSettings, *, with_prompt: bool = True) -> list[str]:
    import torch

    inputs = processor_inputs(loaded, images, prompt)
    if settings.nucleus:
        torch.manual_seed(settings.seed)  # the worker is the only thread generating: this seeds this job only
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **settings.generate_kwargs())
    return decode_generated(loaded, output, inputs, prompt if with_prompt else "")


def _fit_history(loaded, info: CaptionerInfo, question: str, history, settings: CaptionSettings) -> str:
    """The VQA prompt with as many of the latest turns as the language model's context holds. Earlier turns
    are dropped whole; the image placeholder tokens the processor puts first are never cut."""
    config = getattr(loaded.model.config, "text_config", None)
    limit = getattr(config, "max_position_embeddings", None) or 512
    query = getattr(loaded.model.config, "num_query_tokens", 32)
    history = tuple(history)
    while True:
        prompt = vqa_prompt(info, question, history)
        used = len(loaded.processor.tokenizer(prompt)["input_ids"]) + query + settings.max_length
        if used <= limit or not history:
            return prompt
        history = history[1:]


# ------------------------------------------------------------------------------------------- the work

@dataclass
class CaptionContext:
    registry: CaptionerRegistry
    manager: Any
    dtype: Any


def run_caption(ctx: CaptionContext, req: CaptionRequest, job=None) -> str:
    info = ctx.registry.resolve(req.model, purpose="caption")
    with use_captioner(ctx.manager, info, ctx.dtype, int8=req.int8) as loaded:
        if job is not None:
            job.step(0, 1)
        return generate_text(loaded, [req.image], req.settings.prompt, req.settings)[0]


def run_vqa(ctx: CaptionContext, req: VqaRequest, job=None) -> str:
    info = ctx.registry.resolve(req.model, purpose="vqa")
    with use_captioner(ctx.manager, info, ctx.dtype, int8=req.int8) as loaded:
        prompt = _fit_history(loaded, info, req.question, req.history, req.settings)
        answer = generate_text(loaded, [req.image], prompt, req.settings, with_prompt=False)[0]
    return answer.strip().rstrip(".").strip()


def run_batch(ctx: CaptionContext, req: BatchCaptionRequest, job=None) -> BatchSummary:
    from modules.core.fileio import atomic_write_text
    from modules.core.jobs import JobInterrupted

    info = ctx.registry.resolve(req.model, purpose="caption")
    summary = BatchSummary()
    todo = []
    for path in list_images(req.folder, req.recursive):
        if path.with_suffix(req.extension).exists() and not req.overwrite:
            summary.skipped.append(path)
        else:
            todo.append(path)
    if not todo:
        return summary
    with use_captioner(ctx.manager, info, ctx.dtype, int8=req.int8) as loaded:
        for start in range(0, len(todo), req.batch_size):
            if job is not None:
                try:
                    job.step(start, len(todo))
                except JobInterrupted:
                    summary.interrupted = True
                    break
            images, paths = [], []
            for path in todo[start:start + req.batch_size]:
                try:
                    images.append(open_rgb(path))
                    paths.append(path)
                except Exception as e:  # an unreadable file is reported, the rest goes on
                    summary.failed.append((path, f"cannot read the image: {e}"))
            if not images:
                continue
            try:
                captions = generate_text(loaded, images, req.settings.prompt, req.settings)
            except Exception as e:
                summary.failed += [(p, f"captioning failed: {e}") for p in paths]
                continue
            for path, caption in zip(paths, captions):
                text = f"{req.prefix}{caption}{req.suffix}"
                try:
                    atomic_write_text(path.with_suffix(req.extension), text)
                    summary.captioned.append(path)
                except OSError as e:
                    summary.failed.append((path, f"cannot write the caption file: {e}"))
        if job is not None and not summary.interrupted:
            job.sampling_step = job.sampling_steps = len(todo)
    return summary


# ------------------------------------------------------------------------------------------- search

def image_embeddings(loaded, images: list):
    """ITC image embeddings [N, num_query_tokens, D], normalised: the Q-Former's query outputs through the
    vision projection (what Blip2ForImageTextRetrieval compares with text, not the raw vision features)."""
    import torch

    model = loaded.model
    pixel_values = loaded.processor.image_processor(images, return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(loaded.device, loaded.dtype)
    with torch.inference_mode():
        vision = model.vision_model(pixel_values=pixel_values)[0]
        mask = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
        queries = model.query_tokens.expand(vision.shape[0], -1, -1)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=mask)[0]
        out = out.to(model.vision_projection.weight.dtype)
        return torch.nn.functional.normalize(model.vision_projection(out), dim=-1).float().cpu()


def text_embedding(loaded, text: str):
    """The normalised ITC text embedding [D] ([CLS] output of the Q-Former on the text, projected)."""
    import torch

    model = loaded.model
    tokens = loaded.processor.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        embeds = model.embeddings(input_ids=tokens["input_ids"].to(loaded.device))
        out = model.qformer(query_embeds=embeds, query_length=0,
                            attention_mask=tokens["attention_mask"].to(loaded.device))[0]
        out = out.to(model.text_projection.weight.dtype)
        return torch.nn.functional.normalize(model.text_projection(out[:, 0, :]), dim=-1)[0].float().cpu()


def itm_probabilities(loaded, images: list, text: str) -> list[float]:
    """P(match) from the ITM head: softmax over its two logits, as transformers' example computes it."""
    import torch

    inputs = loaded.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    inputs = {k: (v.to(loaded.device, loaded.dtype) if v.is_floating_point() else v.to(loaded.device))
              for k, v in inputs.items()}
    with torch.inference_mode():
        logits = loaded.model(**inputs, use_image_text_matching_head=True).logits_per_image
    return torch.softmax(logits.float(), dim=1)[:, 1].cpu().tolist()


class SearchIndex:
    """ITC embeddings of every image of a folder, cached to one safetensors file and updated incrementally:
    only new or changed files (by size and mtime) are embedded again, removed ones are dropped."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file

    def _read(self, model_key: str):
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.cache_file.is_file():
            return {}, None
        try:
            with safe_open(str(self.cache_file), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("index", "{}"))
            if meta.get("version") != SEARCH_INDEX_VERSION or meta.get("model") != model_key:
                return {}, None
            known = {rel: (mtime_ns, size, row) for row, (rel, mtime_ns, size) in enumerate(meta["files"])}
            return known, load_file(str(self.cache_file))["embeds"]
        except Exception as e:  # a damaged cache is rebuilt, never fatal
            log.warning("search index %s unreadable (%s); rebuilding it", self.cache_file, e)
            return {}, None

    def update(self, loaded, model_key: str, folder: Path, job=None, batch_size: int = 8):
        """Bring the index up to date; returns (paths, embeddings [N, Q, D]) and how many were embedded now."""
        import torch
        from safetensors.torch import save

        from modules.core.fileio import atomic_open

        known, embeds = self._read(model_key)
        paths = list_images(folder, recursive=True)
        rows, fresh, stamps = [], [], []
        for path in paths:
            rel = path.relative_to(folder).as_posix()
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            stamps.append((rel, *stamp))
            old = known.get(rel)
            if old is not None and embeds is not None and (old[0], old[1]) == stamp:
                rows.append(embeds[old[2]])
            else:
                rows.append(None)
                fresh.append(len(rows) - 1)
        for start in range(0, len(fresh), batch_size):
            if job is not None:
                job.step(start, len(fresh))
            chunk = fresh[start:start + batch_size]
            images = []
            for i in chunk:
                try:
                    images.append((i, open_rgb(paths[i])))
                except Exception as e:
                    log.warning("image search: skipping %s (%s)", paths[i], e)
            if images:
                vectors = image_embeddings(loaded, [im for _, im in images])
                for (i, _), vec in zip(images, vectors):
                    rows[i] = vec
        keep = [i for i, row in enumerate(rows) if row is not None]
        paths = [paths[i] for i in keep]
        stamps = [stamps[i] for i in keep]
        table = torch.stack([rows[i] for i in keep]) if keep else torch.zeros(0)
        meta = {"version": SEARCH_INDEX_VERSION, "model": model_key, "folder": str(folder),
                "files": [list(s) for s in stamps]}
        if fresh or len(known) != len(keep):
            with atomic_open(self.cache_file, "wb") as f:
                f.write(save({"embeds": table.contiguous()}, metadata={"index": json.dumps(meta)}))
        return paths, table, len(fresh)


def search_cache_file(cache_dir: Path, folder: Path, model_key: str) -> Path:
    import hashlib

    digest = hashlib.sha256(f"{folder}\n{model_key}".encode()).hexdigest()[:16]
    return cache_dir / f"{digest}.safetensors"


def run_search(ctx: CaptionContext, req: SearchRequest, cache_dir: Path, job=None) -> list[SearchHit]:
    info = ctx.registry.resolve(req.model, purpose="search")
    key = captioner_key(info, ctx.dtype, False)
    with use_captioner(ctx.manager, info, ctx.dtype) as loaded:
        index = SearchIndex(search_cache_file(cache_dir, req.folder, key))
        paths, table, _ = index.update(loaded, key, req.folder, job)
        if not paths:
            return []
        text = text_embedding(loaded, req.query)
        scores = (table @ text).max(dim=1).values.tolist()  # max over the query tokens, as BLIP-2's ITC
        order = sorted(range(len(paths)), key=lambda i: -scores[i])[: req.top_k]
        itm = [None] * len(order)
        if req.rerank and order:
            itm = itm_probabilities(loaded, [open_rgb(paths[i]) for i in order], req.query)
        hits = [SearchHit(paths[i], scores[i], p) for i, p in zip(order, itm)]
    if req.rerank:
        hits.sort(key=lambda h: -(h.itm or 0.0))  # stable: ties keep their ITC order
    return hits


def alignment_scores(ctx: CaptionContext, images: list, texts: list[str], model: str | None = None,
                     batch_size: int = 8) -> tuple[list[float], str]:
    """How well each image matches its text in the retrieval space Image search ranks in (BLIP-2 ITC: the best
    of the image's query vectors against the text's vector, a cosine similarity), and the model's name."""
    info = ctx.registry.resolve(model, purpose="search")
    scores: list[float] = []
    with use_captioner(ctx.manager, info, ctx.dtype) as loaded:
        texts_seen: dict[str, Any] = {}
        for start in range(0, len(images), batch_size):
            table = image_embeddings(loaded, list(images[start:start + batch_size]))
            for row, text in zip(table, texts[start:start + batch_size]):
                if text not in texts_seen:
                    texts_seen[text] = text_embedding(loaded, text)
                scores.append(float((row @ texts_seen[text]).max()))
    return scores, info.name


def run_embeddings(ctx: CaptionContext, req: EmbeddingsRequest, job=None) -> dict[str, Any]:
    """{"model", "kind", "embeddings"}: images -> [N, num_query_tokens, D] (one vector per query token, as the
    search index keeps them), texts -> [N, D]; every vector L2-normalised."""
    info = ctx.registry.resolve(req.model, purpose="search")
    with use_captioner(ctx.manager, info, ctx.dtype) as loaded:
        if req.images:
            rows = []
            for start in range(0, len(req.images), req.batch_size):
                if job is not None:
                    job.step(start, len(req.images))
                rows += list(image_embeddings(loaded, list(req.images[start:start + req.batch_size])))
            return {"model": info.name, "kind": "image", "embeddings": [r.tolist() for r in rows]}
        vectors = []
        for n, text in enumerate(req.texts):
            if job is not None:
                job.step(n, len(req.texts))
            vectors.append(text_embedding(loaded, text).tolist())
        return {"model": info.name, "kind": "text", "embeddings": vectors}


# --------------------------------------------------------------------------------------- evaluation

def run_evaluate(ctx: CaptionContext, req: EvaluateRequest, job=None) -> dict[str, Any]:
    """Caption (or answer) every item and score it against the references with metrics.py."""
    if req.vqa_json is not None:
        items = json.loads(Path(req.vqa_json).read_text(encoding="utf-8"))
        base = Path(req.vqa_json).parent
        info = ctx.registry.resolve(req.model, purpose="vqa")
        answers, truths = [], []
        with use_captioner(ctx.manager, info, ctx.dtype) as loaded:
            for n, item in enumerate(items):
                if job is not None:
                    job.step(n, len(items))
                image = open_rgb(base / item["image"])
                prompt = vqa_prompt(info, item["question"])
                answers.append(generate_text(loaded, [image], prompt, VQA_SETTINGS, with_prompt=False)[0])
                truths.append(list(item["answers"]))
        return {"vqa_accuracy": metrics.vqa_accuracy(answers, truths), "count": len(items),
                "predictions": answers}
    info = ctx.registry.resolve(req.model, purpose="caption")
    pairs = [(p, p.with_suffix(req.extension)) for p in list_images(req.folder, recursive=True)]
    pairs = [(p, r) for p, r in pairs if r.is_file()]
    if not pairs:
        raise CaptionerError(f"no image in {req.folder} has a reference caption file ({req.extension}) beside it")
    predictions, references = [], []
    with use_captioner(ctx.manager, info, ctx.dtype) as loaded:
        for n, (image_path, ref_path) in enumerate(pairs):
            if job is not None:
                job.step(n, len(pairs))
            predictions.append(generate_text(loaded, [open_rgb(image_path)], req.settings.prompt, req.settings)[0])
            references.append([line.strip() for line in ref_path.read_text(encoding="utf-8").splitlines() if line.strip()])
    scores = metrics.caption_scores(predictions, references)
    return {**scores, "count": len(pairs), "predictions": predictions}


# ---------------------------------------------------------------------------------------- the facade

class Captioning:
    """What the UI and the API call: validates, queues the work on the shared job queue, waits when asked."""

    def __init__(self, *, registry: CaptionerRegistry, queue, runtime: Callable[[], Any], cache_dir: Path,
                 default_search_folder: Callable[[], Path], models_dir: Path):
        self.registry = registry
        self.queue = queue
        self._runtime = runtime  # the server's Runtime (device, dtype, model manager), made on first use
        self.cache_dir = cache_dir
        self.default_search_folder = default_search_folder
        self.models_dir = models_dir

    def context(self) -> CaptionContext:
        rt = self._runtime()
        return CaptionContext(registry=self.registry, manager=rt.manager, dtype=rt.dtype)

    def captioners(self) -> list[dict[str, Any]]:
        self.registry.refresh()
        loaded: set[str] = set()
        if "torch" in sys.modules:  # no manager before torch is imported: then nothing is loaded either
            loaded = {r["name"] for r in self._runtime().manager.report() if r["kind"] == "captioner"}
        return [{"name": i.name, "kind": i.kind, "path": str(i.path), "loaded": i.name in loaded,
                 "trained_from": i.trained_from or None} for i in self.registry.list()]

    def submit_caption(self, req: CaptionRequest, owner: str | None = None):
        if req.image is None:
            raise CaptionerError("no image: upload or send an image to caption")
        req.settings.validate()
        self.registry.resolve(req.model, purpose="caption")
        return self.queue.submit(lambda job: run_caption(self.context(), req, job), kind="caption", owner=owner)

    def submit_vqa(self, req: VqaRequest, owner: str | None = None):
        if req.image is None:
            raise CaptionerError("no image: upload an image to ask about")
        if not (req.question or "").strip():
            raise CaptionerError("the question is empty: type a question about the image")
        req.settings.validate()
        self.registry.resolve(req.model, purpose="vqa")
        return self.queue.submit(lambda job: run_vqa(self.context(), req, job), kind="vqa", owner=owner)

    def submit_batch(self, req: BatchCaptionRequest, owner: str | None = None):
        req = replace(req, folder=check_folder(req.folder), extension=normalize_extension(req.extension))
        if not 1 <= req.batch_size <= 64:
            raise CaptionerError(f"batch size must be 1..64, got {req.batch_size}")
        req.settings.validate()
        self.registry.resolve(req.model, purpose="caption")
        return self.queue.submit(lambda job: run_batch(self.context(), req, job), kind="caption-batch", owner=owner)

    def submit_search(self, req: SearchRequest, owner: str | None = None):
        if not (req.query or "").strip():
            raise CaptionerError("the search text is empty: describe the image you are looking for")
        if not 1 <= req.top_k <= 1000:
            raise CaptionerError(f"top_k must be 1..1000, got {req.top_k}")
        self.registry.resolve(req.model, purpose="search")
        if req.folder is None:
            Path(self.default_search_folder()).mkdir(parents=True, exist_ok=True)  # no image made yet: nothing found
        req = replace(req, folder=check_folder(req.folder or self.default_search_folder(), "search folder"))
        return self.queue.submit(lambda job: run_search(self.context(), req, self.cache_dir, job), kind="search",
                                 owner=owner)

    def submit_embeddings(self, req: EmbeddingsRequest, owner: str | None = None):
        if bool(req.images) == bool(req.texts):
            raise CaptionerError("give a non-empty list of images or of texts (one of the two)")
        if len(req.images) + len(req.texts) > 256:
            raise CaptionerError(f"at most 256 items per request, got {len(req.images) + len(req.texts)}")
        if any(not (t or "").strip() for t in req.texts):
            raise CaptionerError("a text is empty: every text needs some words")
        self.registry.resolve(req.model, purpose="search")
        return self.queue.submit(lambda job: run_embeddings(self.context(), req, job), kind="embeddings",
                                 owner=owner)

    def submit_evaluate(self, req: EvaluateRequest, owner: str | None = None):
        if req.vqa_json is not None:
            if not Path(req.vqa_json).is_file():
                raise CaptionerError(f"VQA file {str(req.vqa_json)!r} does not exist")
            self.registry.resolve(req.model, purpose="vqa")
        else:
            req = replace(req, folder=check_folder(req.folder), extension=normalize_extension(req.extension))
            self.registry.resolve(req.model, purpose="caption")
        return self.queue.submit(lambda job: run_evaluate(self.context(), req, job), kind="caption-eval", owner=owner)
