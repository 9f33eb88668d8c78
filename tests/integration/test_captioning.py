"""Captioning, VQA, image search and evaluation over the tiny BLIP-2 and BLIP v1 models: the API routes on a
real server, fidelity against plain transformers, batch caption files, VQA turns, search ranking and the
evaluation report against metrics.py."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from modules.captioning import (
    CAPTION_STYLES,
    VQA_SETTINGS,
    BatchCaptionRequest,
    CaptionerRegistry,
    CaptionRequest,
    CaptionSettings,
    EvaluateRequest,
    SearchRequest,
    VqaRequest,
    metrics,
)
from modules.captioning.service import (
    CaptionContext,
    run_batch,
    run_caption,
    run_evaluate,
    run_search,
    run_vqa,
    vqa_prompt,
)
from modules.model_store.model_manager import ModelManager


def noise_image(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def ctx(tiny_models):
    registry = CaptionerRegistry([tiny_models / "BLIP2", tiny_models / "BLIP"])
    return CaptionContext(registry=registry, manager=ModelManager("cpu", 2**30, 2**30), dtype=torch.float32)


@pytest.fixture(scope="module")
def plain(tiny_models):
    """The tiny captioner loaded with nothing but transformers."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration
    path = tiny_models / "BLIP2" / "tiny-blip2"
    return Blip2ForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def plain_blip(tiny_models):
    """The tiny BLIP v1 captioner loaded with nothing but transformers."""
    from transformers import AutoProcessor, BlipForConditionalGeneration
    path = tiny_models / "BLIP" / "tiny-blip"
    return BlipForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def plain_blip_generate(plain_blip, image, prompt, **kwargs) -> str:
    """BLIP v1 as its model card runs it: the output holds the prompt, so the whole sequence is decoded."""
    model, processor = plain_blip
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return processor.decode(out[0], skip_special_tokens=True).strip()


def plain_generate(plain, image, prompt, **kwargs) -> str:
    model, processor = plain
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


# ------------------------------------------------------------------------------------------ fidelity

def test_caption_equals_plain_transformers_generate(ctx, plain, api):
    image = noise_image(1)
    settings = CaptionSettings(prompt="a photo of", num_beams=3, min_length=4, max_length=12, repetition_penalty=1.3)
    expected = plain_generate(plain, image, "a photo of", num_beams=3, min_new_tokens=4, max_new_tokens=12,
                              repetition_penalty=1.3, length_penalty=1.0, do_sample=False)
    assert expected  # random weights still produce tokens
    caption = run_caption(ctx, CaptionRequest(image=image, model="tiny-blip2", settings=settings))
    assert caption == f"a photo of {expected}"
    # the same through the API (the PNG round trip keeps every pixel)
    r = api.post(api.base + "/interrogate", json={"image": b64(image), "model": "tiny-blip2", "prompt": "a photo of",
                                                  "num_beams": 3, "min_length": 4, "max_length": 12,
                                                  "repetition_penalty": 1.3})
    assert r.status_code == 200, r.text
    assert r.json() == {"caption": caption}
    assert r.headers["X-Task-Id"]


def test_blip_v1_is_found_and_is_the_default_captioner(ctx, tiny_models):
    info = ctx.registry.find("tiny-blip")
    assert info is not None and info.kind == "blip" and info.language_model == "bert"
    assert info.path == (tiny_models / "BLIP" / "tiny-blip").resolve()
    assert info.can_caption and not info.can_answer
    assert ctx.registry.default_captioner().name == "tiny-blip"  # BLIP v1 first, before any BLIP-2
    assert ctx.registry.resolve("clip", purpose="caption").name == "tiny-blip"
    assert ctx.registry.resolve(None, purpose="vqa").name == "tiny-blip2"  # BLIP v1 has no VQA head


@pytest.mark.parametrize("prompt", ["a photo of", ""])
def test_blip_v1_caption_equals_plain_transformers_generate(ctx, plain_blip, api, prompt):
    image = noise_image(5)
    settings = CaptionSettings(prompt=prompt, num_beams=3, min_length=4, max_length=12, repetition_penalty=1.3)
    expected = plain_blip_generate(plain_blip, image, prompt, num_beams=3, min_new_tokens=4, max_new_tokens=12,
                                   repetition_penalty=1.3, length_penalty=1.0, do_sample=False)
    assert expected.startswith(prompt) and len(expected) > len(prompt)  # BLIP v1 continues its prompt
    caption = run_caption(ctx, CaptionRequest(image=image, model="tiny-blip", settings=settings))
    assert caption == expected
    # through the API, by name and by A1111's "clip" (the default captioner: BLIP v1)
    for model in ("tiny-blip", "clip"):
        r = api.post(api.base + "/interrogate", json={"image": b64(image), "model": model, "prompt": prompt,
                                                      "num_beams": 3, "min_length": 4, "max_length": 12,
                                                      "repetition_penalty": 1.3})
        assert r.status_code == 200, r.text
        assert r.json() == {"caption": expected}


def test_nucleus_sampling_follows_the_seed(ctx, plain):
    image = noise_image(2)
    settings = CaptionSettings(nucleus=True, top_p=0.9, seed=7, num_beams=1, min_length=3, max_length=10)
    a = run_caption(ctx, CaptionRequest(image=image, model="tiny-blip2", settings=settings))
    torch.manual_seed(7)
    expected = plain_generate(plain, image, "", do_sample=True, top_p=0.9, num_beams=1, min_new_tokens=3,
                              max_new_tokens=10, repetition_penalty=1.0, length_penalty=1.0)
    assert a == expected
    assert run_caption(ctx, CaptionRequest(image=image, model="tiny-blip2", settings=settings)) == a


def test_vqa_turns_use_blip2_prompt_format(ctx, plain):
    image = noise_image(3)
    info = ctx.registry.find("tiny-blip2")
    assert vqa_prompt(info, "what is it?") == "Question: what is it? Answer:"
    history = (("what colour is it?", "red."), ("is it big?", "no"))
    prompt = vqa_prompt(info, "where is it?", history)
    assert prompt == ("Question: what colour is it? Answer: red. Question: is it big? Answer: no. "
                      "Question: where is it? Answer:")
    answer = run_vqa(ctx, VqaRequest(image=image, question="where is it?", model="tiny-blip2", history=history))
    expected = plain_generate(plain, image, prompt, **VQA_SETTINGS.generate_kwargs())
    assert answer == expected.rstrip(".").strip()
    # each turn changes the prompt, so the model sees the conversation
    first = run_vqa(ctx, VqaRequest(image=image, question="where is it?", model="tiny-blip2"))
    assert first == plain_generate(plain, image, "Question: where is it? Answer:",
                                   **VQA_SETTINGS.generate_kwargs()).rstrip(".").strip()


# -------------------------------------------------------------------------------------------- batch

def test_batch_captions_prefix_suffix_skip_overwrite(ctx, tmp_path, plain):
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        noise_image(10 + i).save(folder / f"img{i}.png")
    noise_image(20).save(folder / "sub" / "deep.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "img2.txt").write_text("hand written", encoding="utf-8")
    style = CAPTION_STYLES["short"]
    req = BatchCaptionRequest(folder=folder, model="tiny-blip2", settings=style, prefix="sks, ", suffix=", photo",
                              batch_size=2)
    summary = run_batch(ctx, req)
    assert sorted(p.name for p in summary.captioned) == ["img0.png", "img1.png"]
    assert [p.name for p in summary.skipped] == ["img2.png"]
    assert [p.name for p, _ in summary.failed] == ["broken.png"] and "cannot read" in summary.failed[0][1]
    assert (folder / "img2.txt").read_text(encoding="utf-8") == "hand written"  # skipped: not touched
    assert not (folder / "sub" / "deep.txt").exists()  # not recursive
    expected = plain_generate(plain, noise_image(10), "", **style.generate_kwargs())
    assert (folder / "img0.txt").read_text(encoding="utf-8") == f"sks, {expected}, photo"
    # overwrite + recursive + another extension
    summary = run_batch(ctx, BatchCaptionRequest(folder=folder, model="tiny-blip2", settings=style, overwrite=True,
                                                 recursive=True, extension=".caption", batch_size=3))
    assert len(summary.captioned) == 4 and not summary.skipped
    assert (folder / "sub" / "deep.caption").is_file()
    assert (folder / "img2.caption").read_text(encoding="utf-8") == \
        plain_generate(plain, noise_image(12), "", **style.generate_kwargs())
    assert not [p for p in folder.rglob("*.tmp")]  # atomic writes leave no temp files


# ------------------------------------------------------------------------------------------- search

def test_search_ranks_like_the_plain_retrieval_model(ctx, tiny_models, tmp_path):
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval
    folder = tmp_path / "gallery"
    folder.mkdir()
    images = [noise_image(30 + i) for i in range(4)] + [Image.new("RGB", (40, 40), (200, 20, 20))]
    for i, im in enumerate(images):
        im.save(folder / f"{i}.png")
    query = "a red cat"
    path = tiny_models / "BLIP2" / "tiny-blip2-itm"
    model, processor = Blip2ForImageTextRetrieval.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    with torch.no_grad():
        inputs = processor(images=images, text=[query] * len(images), return_tensors="pt", padding=True)
        itc = model(**inputs, use_image_text_matching_head=False).logits_per_image[:, 0].tolist()
    cache = tmp_path / "cache"
    hits = run_search(ctx, SearchRequest(query=query, folder=folder, top_k=5, rerank=False), cache)
    expected_order = sorted(range(5), key=lambda i: -itc[i])
    assert [h.path.name for h in hits] == [f"{i}.png" for i in expected_order]
    assert [h.itc for h in hits] == pytest.approx([itc[i] for i in expected_order], abs=1e-5)
    assert len({round(h.itc, 5) for h in hits}) == 5  # the images differ, so do their scores
    # top k with ITM re-ranking: the ITM head's probabilities, as the plain model gives them
    hits = run_search(ctx, SearchRequest(query=query, folder=folder, top_k=2, rerank=True), cache)
    top2 = expected_order[:2]
    with torch.no_grad():
        inputs = processor(images=[images[i] for i in top2], text=[query] * 2, return_tensors="pt", padding=True)
        itm = torch.softmax(model(**inputs, use_image_text_matching_head=True).logits_per_image, 1)[:, 1].tolist()
    assert sorted(h.itm for h in hits) == pytest.approx(sorted(itm), abs=1e-5)
    # the index is cached and updated incrementally: a new image is added, a removed one dropped
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    (folder / "0.png").unlink()
    noise_image(99).save(folder / "new.png")
    hits = run_search(ctx, SearchRequest(query=query, folder=folder, top_k=10, rerank=False), cache)
    assert sorted(h.path.name for h in hits) == ["1.png", "2.png", "3.png", "4.png", "new.png"]


# --------------------------------------------------------------------------------------- evaluation

def test_caption_evaluation_reports_metrics_of_the_model_captions(ctx, plain_blip, tmp_path):
    folder = tmp_path / "eval"
    (folder / "sub").mkdir(parents=True)
    style = CAPTION_STYLES["short"]
    images = {"a.png": noise_image(60), "b.png": noise_image(61), "sub/c.png": noise_image(62)}
    produced = {}
    for name, im in images.items():
        im.save(folder / name)
        produced[name] = plain_blip_generate(plain_blip, im, "", **style.generate_kwargs())
    noise_image(63).save(folder / "no-reference.png")  # no caption file: not evaluated
    assert all(metrics.tokenize(p) for p in produced.values())  # BLIP v1's WordPiece decodes to words
    # references: the model's own caption (a perfect match), a partial one, and unrelated text
    refs = {"a.png": [produced["a.png"], "a red cat sitting on a blue chair"],
            "b.png": [" ".join(produced["b.png"].split()[:3]) + " on a table", "a green tree"],
            "sub/c.png": ["a painting of a lighthouse by the sea"]}
    for name, lines in refs.items():
        (folder / name).with_suffix(".txt").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    report = run_evaluate(ctx, EvaluateRequest(folder=folder, model=None, settings=style))  # the default: BLIP v1
    order = ["a.png", "b.png", "sub/c.png"]  # sorted paths, recursive
    assert report["count"] == 3
    assert report["predictions"] == [produced[n] for n in order]
    predictions, references = [produced[n] for n in order], [refs[n] for n in order]
    bleu = metrics.bleu(predictions, references)
    expected = {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
                "ROUGE-L": metrics.rouge_l(predictions, references), "CIDEr": metrics.cider(predictions, references)}
    assert {k: report[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    # one caption matches its reference exactly, so the scores are not all zero
    assert report["BLEU-1"] > 0 and report["ROUGE-L"] >= 1 / 3 and report["CIDEr"] > 0


def test_vqa_evaluation_reports_vqa_accuracy(ctx, plain, tmp_path):
    questions = [("what is it?", noise_image(70)), ("what colour is it?", noise_image(71))]
    produced = []
    for i, (question, im) in enumerate(questions):
        im.save(tmp_path / f"q{i}.png")
        produced.append(plain_generate(plain, im, f"Question: {question} Answer:", **VQA_SETTINGS.generate_kwargs()))
    decoys = ["zebra crossing", "seventeen umbrellas"]
    assert all(metrics.normalize_answer(p) not in [metrics.normalize_answer(d) for d in decoys] for p in produced)
    # two of ten humans gave the model's answer to the first question, none to the second
    answers = [[produced[0]] * 2 + decoys * 4, decoys * 5]
    items = [{"image": f"q{i}.png", "question": q, "answers": a} for i, ((q, _), a) in enumerate(zip(questions, answers))]
    vqa_json = tmp_path / "vqa.json"
    vqa_json.write_text(json.dumps(items), encoding="utf-8")
    report = run_evaluate(ctx, EvaluateRequest(folder=tmp_path, model="tiny-blip2", vqa_json=vqa_json))
    assert report["count"] == 2 and report["predictions"] == produced
    assert report["vqa_accuracy"] == pytest.approx(metrics.vqa_accuracy(produced, answers), rel=1e-12)
    # by hand: leaving out one of the 2 matches -> 1/3 (2 subsets), else 2/3 (8 subsets): 0.6; second: 0
    assert report["vqa_accuracy"] == pytest.approx((0.6 + 0.0) / 2)


# ---------------------------------------------------------------------------------------------- API

def test_captioners_vqa_and_search_routes(api, api_server, tmp_path):
    r = api.get(api.base + "/captioners")
    assert r.status_code == 200, r.text
    items = {i["name"]: i for i in r.json()}
    assert items["tiny-blip2"]["kind"] == "blip2" and items["tiny-blip2-itm"]["kind"] == "blip2-itm"
    assert items["tiny-blip"]["kind"] == "blip" and items["tiny-blip"]["path"].endswith("/BLIP/tiny-blip")
    assert set(items["tiny-blip2"]) == {"name", "kind", "path", "loaded"}
    image = b64(noise_image(4))
    r = api.post(api.base + "/interrogate", json={"image": image, "model": "clip"})  # "clip": the default captioner
    assert r.status_code == 200 and isinstance(r.json()["caption"], str), r.text
    by_name = api.post(api.base + "/interrogate", json={"image": image, "model": "tiny-blip"})
    assert by_name.status_code == 200 and by_name.json() == r.json()  # the default is BLIP v1
    assert {i["name"]: i["loaded"] for i in api.get(api.base + "/captioners").json()}["tiny-blip"] is True
    r = api.post(api.base + "/vqa", json={"image": image, "question": "what is it?",
                                          "history": [["is it red?", "yes"], {"question": "big?", "answer": "no"}]})
    assert r.status_code == 200 and set(r.json()) == {"answer"}, r.text
    folder = tmp_path / "s"
    folder.mkdir()
    for i in range(3):
        noise_image(50 + i).save(folder / f"{i}.png")
    r = api.post(api.base + "/search", json={"query": "a cat", "folder": str(folder), "top_k": 2})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and all(set(x) == {"path", "score", "itc", "itm"} for x in results)
    assert results[0]["score"] >= results[1]["score"]
    memory = api.get(api.base + "/memory").json()
    assert {m["name"] for m in memory["models"] if m["kind"] == "captioner"} >= {"tiny-blip2", "tiny-blip2-itm"}


@pytest.mark.parametrize("route,body,status,words", [
    ("/interrogate", {"image": "", "model": "tiny-blip2"}, 422, "image is empty"),
    ("/interrogate", {"image": "bm90IGFuIGltYWdl", "model": "tiny-blip2"}, 422, "not a readable image"),
    ("/interrogate", {"image": "IMAGE", "model": "no-such-model"}, 404, "not found"),
    ("/interrogate", {"image": "IMAGE", "model": "tiny-blip2-itm"}, 422, "caption needs"),
    ("/interrogate", {"image": "IMAGE", "model": "tiny-blip2", "num_beams": 0}, 422, "num_beams"),
    ("/vqa", {"image": "IMAGE", "question": "  "}, 422, "question is empty"),
    ("/vqa", {"image": "IMAGE", "question": "q", "model": "tiny-blip"}, 422, "vqa needs"),
    ("/vqa", {"image": "IMAGE", "question": "q", "history": ["x"]}, 422, "history[0]"),
    ("/search", {"query": ""}, 422, "search text is empty"),
    ("/search", {"query": "cat", "folder": "/no/such/folder"}, 422, "does not exist"),
    ("/search", {"query": "cat", "model": "tiny-blip2"}, 422, "search needs"),
])
def test_bad_input_is_4xx_with_a_message(api, route, body, status, words):
    body = {k: (b64(noise_image(0)) if v == "IMAGE" else v) for k, v in body.items()}
    r = api.post(api.base + route, json=body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"error", "detail", "body", "errors"}
    assert words in payload["detail"]
