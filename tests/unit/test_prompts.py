"""Conditioning: A1111's chunks, weights, BREAK, embeddings and AND/editing over the tiny text encoder,
checked against diffusers' own encode_prompt where the two must agree."""
from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from modules.networks.embeddings import Embedding
from modules.prompting import prompts


@pytest.fixture(scope="module")
def pipe(tiny_models):
    p = StableDiffusionPipeline.from_pretrained(tiny_models / "Stable-diffusion" / "tiny-sd15-diffusers",
                                                local_files_only=True, safety_checker=None,
                                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def conditioner(pipe, **kw):
    return prompts.TextConditioner(dict(pipe.components), "sd1", **kw)


def plain(pipe, text):
    cond, _ = pipe.encode_prompt(text, "cpu", 1, False)
    return cond


def test_short_plain_prompt_equals_encode_prompt_exactly(pipe):
    c = conditioner(pipe)
    for text in ["a photo of a cat, highly detailed", "", "x" * 30, "word " * 75]:
        assert torch.equal(c.encode(text).embeds, plain(pipe, text))


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(pipe):
    te = pipe.text_encoder
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids, output_hidden_states=True).hidden_states
        expected = te.final_layer_norm(hidden[-2])
    got = conditioner(pipe, clip_skip=2).encode("a cat").embeds
    assert torch.equal(got, expected)
    assert not torch.equal(got, conditioner(pipe).encode("a cat").embeds)


def test_long_prompts_are_chunked_with_no_limit(pipe):
    c = conditioner(pipe)
    words = "cat " * 200  # one token per word
    cond = c.encode(words)
    chunks, count = c.encoders[0].chunker.chunks(words)
    assert count == 200 and [len(ch.tokens) for ch in chunks] == [75, 75, 50]
    assert cond.embeds.shape == (1, 3 * 77, 32)
    # each chunk is encoded on its own, as a prompt of just those tokens would be
    first = pipe.tokenizer.decode(chunks[0].tokens)
    assert torch.equal(cond.embeds[:, :77], plain(pipe, first))


def test_comma_backtrack_moves_the_last_phrase(pipe):
    c = conditioner(pipe)
    text = "a, " * 30 + "b c d e f g h i j k l m n o p q r"  # 60 tokens, then the last comma at 59
    chunker = c.encoders[0].chunker
    chunks, _ = chunker.chunks(text + " s t u v w x y z")
    # 60 + 25 = 85 tokens: the chunk fills at 75, the last comma is 16 tokens back, so the phrase moves on
    assert [len(ch.tokens) for ch in chunks] == [60, 25]
    no_backtrack = prompts.Chunker(pipe.tokenizer, comma_backtrack=0).chunks(text + " s t u v w x y z")[0]
    assert [len(ch.tokens) for ch in no_backtrack] == [75, 10]


def test_break_ends_a_chunk(pipe):
    c = conditioner(pipe)
    cond = c.encode("a cat BREAK a dog")
    assert cond.embeds.shape[1] == 154
    assert torch.equal(cond.embeds[:, :77], plain(pipe, "a cat"))
    assert torch.equal(cond.embeds[:, 77:], plain(pipe, "a dog"))


def test_weights_scale_tokens_and_keep_the_mean(pipe):
    # The tiny encoder's final layer norm has no bias, so its outputs average ~0 and there is no mean to
    # keep; real CLIP's has one. Give a copy a bias so the rescale has something to work with.
    import copy
    components = dict(pipe.components)
    components["text_encoder"] = copy.deepcopy(pipe.text_encoder)
    with torch.no_grad():
        components["text_encoder"].final_layer_norm.bias.fill_(0.3)
    biased = type("P", (), {"components": components})
    c = conditioner(biased)
    base = c.encode("a cat").embeds
    weighted = c.encode("a (cat:1.5)").embeds
    assert torch.allclose(weighted.mean(), base.mean(), atol=1e-6)
    # token 2 ("cat") is scaled by 1.5 before the rescale; the others only by the rescale factor
    factor = base.mean() / (base * torch.tensor([1, 1, 1.5] + [1] * 74).reshape(1, -1, 1)).mean()
    assert torch.allclose(weighted[0, 2], base[0, 2] * 1.5 * factor, atol=1e-6)
    assert torch.allclose(weighted[0, 1], base[0, 1] * factor, atol=1e-6)
    no_norm = conditioner(biased, emphasis="No norm").encode("a (cat:1.5)").embeds
    assert torch.allclose(no_norm[0, 2], base[0, 2] * 1.5) and torch.equal(no_norm[0, 1], base[0, 1])
    with pytest.raises(ValueError):
        conditioner(pipe, emphasis="Bogus")
    # a mean of ~0 is not divided by (it would only turn rounding noise into inf/NaN)
    zero_mean = conditioner(pipe).encode("a (cat:1.5)").embeds
    assert torch.isfinite(zero_mean).all() and zero_mean.abs().max() < 100


def test_an_embedding_is_its_vectors_in_place_of_tokens(pipe):
    cat_id = pipe.tokenizer.convert_tokens_to_ids("cat</w>")
    vector = pipe.text_encoder.get_input_embeddings().weight[cat_id].detach().clone()
    emb = Embedding("my-emb", None, {32: vector.reshape(1, 32)})
    c = conditioner(pipe, embeddings={"my-emb": emb})
    assert torch.equal(c.encode("a my-emb").embeds, c.encode("a cat").embeds)
    assert not torch.equal(c.encode("a my-emb-x").embeds, c.encode("a cat").embeds)  # whole words only


def test_an_embedding_never_straddles_two_chunks(pipe):
    emb = Embedding("five", None, {32: torch.randn(5, 32)})
    chunker = prompts.Chunker(pipe.tokenizer, {"five": emb})
    chunks, count = chunker.chunks("x " * 72 + "five")
    assert [len(ch.tokens) for ch in chunks] == [72, 5] and count == 75 + 5
    assert chunks[1].fixes == [(0, emb)]


def test_wrong_width_embeddings_are_left_as_words(pipe):
    emb = Embedding("wide", None, {768: torch.randn(1, 768)})
    c = conditioner(pipe, embeddings={"wide": emb})
    assert c.used_embeddings == {}
    assert torch.equal(c.encode("a wide").embeds, plain(pipe, "a wide"))


def test_token_counts_for_the_ui(tiny_models):
    from modules.prompting.clip_tokenizer import clip_tokenizer
    tok = clip_tokenizer()
    assert prompts.token_counts("", tok) == (0, 75)
    assert prompts.token_counts("a cat", tok) == (2, 75)
    assert prompts.token_counts("a cat <lora:x:1>", tok) == (2, 75)
    assert prompts.token_counts("a BREAK b", tok) == (76, 150)
    assert prompts.token_counts("[a:b c d:3]", tok) == (3, 75)  # the longest variant counts
    assert prompts.token_counts("w " * 80, tok) == (80, 150)


def test_conditioning_is_padded_to_one_chunk_count(pipe):
    c = conditioner(pipe)
    sc = prompts.build_conditioning(c, "a BREAK b BREAK c", "blurry", 10)
    assert sc.is_static
    assert sc.uncond_at(0).embeds.shape == sc.conds_at(0)[0][1].embeds.shape == (1, 231, 32)
    assert torch.equal(sc.uncond_at(0).embeds[:, 77:154], plain(pipe, ""))
    edited = prompts.build_conditioning(c, "[a:b:3] AND c:0.5", "", 10)
    assert not edited.is_static
    assert [w for w, _ in edited.conds_at(0)] == [1.0, 0.5]
    assert torch.equal(edited.conds_at(3)[0][1].embeds, plain(pipe, "a"))
    assert torch.equal(edited.conds_at(4)[0][1].embeds, plain(pipe, "b"))


def test_the_switch_feeds_each_step_its_conditioning_and_combines_and(pipe):
    """Real pipeline and UNet: record what the UNet is given at each step under the switch."""
    c = conditioner(pipe)
    sc = prompts.build_conditioning(c, "[cat:dog:1] AND tree :0.5", "", 4)
    seen = []
    from diffusers import EulerDiscreteScheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # one UNet call per step
    switch = prompts.ConditioningSwitch(pipe.unet, sc, 1)
    with switch:
        # registered after the switch's own hook, so it sees what the switch hands the UNet
        rec = pipe.unet.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()), with_kwargs=True)
        try:
            with torch.inference_mode():
                pipe(**prompts.pipeline_embeds(sc, 1, False), num_inference_steps=4, height=64, width=64,
                     generator=torch.Generator().manual_seed(0), output_type="latent",
                     callback_on_step_end=lambda p, i, t, kw: (switch.on_step_end(i), kw)[1])
        finally:
            rec.remove()
    assert len(seen) == 4 and all(s.shape[0] == 3 for s in seen)  # uncond, cat/dog, tree
    cat, dog, tree, empty = (plain(pipe, t) for t in ("cat", "dog", "tree", ""))
    assert [torch.equal(s[1:2], cat) for s in seen] == [True, True, False, False]  # steps 0 and 1 <= 1
    assert all(torch.equal(s[1:2], dog) for s in seen[2:])
    assert all(torch.equal(s[2:3], tree) and torch.equal(s[0:1], empty) for s in seen)
    assert len(pipe.unet._forward_pre_hooks) == 0 and len(pipe.unet._forward_hooks) == 0  # hooks removed


def test_and_weights_combine_in_cfg(pipe):
    """The switch hands the pipeline [uncond, uncond + sum(w_i (cond_i - uncond))], so its CFG gives
    uncond + cfg * sum(w_i (cond_i - uncond))."""
    c = conditioner(pipe)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    sc = prompts.build_conditioning(c, "cat :0.7 AND dog :0.4", "", 4)
    switch = prompts.ConditioningSwitch(pipe.unet, sc, 1)
    ehs = torch.cat([plain(pipe, ""), plain(pipe, "cat")])
    with torch.no_grad():
        with switch:
            out = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=ehs, return_dict=False)[0]
        u, ca, do = (pipe.unet(latents, t, encoder_hidden_states=plain(pipe, x), return_dict=False)[0]
                     for x in ("", "cat", "dog"))
    assert torch.allclose(out[0:1], u, atol=1e-5)
    assert torch.allclose(out[1:2], u + 0.7 * (ca - u) + 0.4 * (do - u), atol=1e-5)


def test_captions_written_into_text_boxes_lose_non_printing_characters():
    from modules.ui.common import clean_text
    assert clean_text("a\x00 cat\u200b on\n\ta  mat\x1b") == "a cat on a mat"
    assert clean_text("") == "" and clean_text("naïve café ✓") == "naïve café ✓"
