"""The offline CLIP tokenizer gives the ids of the real SD tokenizers and survives save/reload."""
from transformers import CLIPTokenizer

from modules.prompting.clip_tokenizer import clip_tokenizer

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def test_known_ids_and_vocabulary():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == CAT_IDS
    assert len(tok) == 49408
    assert tok.bos_token_id == 49406
    assert tok.eos_token_id == 49407
    assert tok.model_max_length == 77
    # Byte-level pieces and word-final merges resolve to the ids OpenAI's CLIP uses.
    assert tok("Hello, World!").input_ids == [49406, 3306, 267, 1002, 256, 49407]


def test_pad_tokens_per_family():
    sd1 = clip_tokenizer()
    sd2 = clip_tokenizer("!")
    assert sd1.pad_token_id == 49407  # SD1: pad with <|endoftext|>
    assert sd2.pad_token_id == 0  # SD2 / SDXL tokenizer_2: pad with "!"
    assert sd2("a photo of a cat").input_ids == CAT_IDS


def test_cached_per_pad_token():
    assert clip_tokenizer() is clip_tokenizer("<|endoftext|>")
    assert clip_tokenizer("!") is clip_tokenizer("!")
    assert clip_tokenizer() is not clip_tokenizer("!")


def test_padding_and_truncation_to_77():
    tok = clip_tokenizer()
    padded = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77
    assert padded[:7] == CAT_IDS
    assert padded[7:] == [49407] * 70

    long = tok("cat " * 200, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(long) == 77
    assert long[0] == 49406 and long[-1] == 49407
    assert set(long[1:-1]) == {2368}


def test_save_pretrained_round_trip(tmp_path):
    texts = ["a photo of a cat", "Ünïcödé, ЁЖ 日本語 🙂 (emphasis:1.2)", ""]
    for pad in ("<|endoftext|>", "!"):
        tok = clip_tokenizer(pad)
        folder = tmp_path / f"tok-{len(pad)}"
        tok.save_pretrained(folder)
        reloaded = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        assert reloaded.pad_token == pad
        assert reloaded.model_max_length == 77
        for text in texts:
            assert reloaded(text).input_ids == tok(text).input_ids
            assert (
                reloaded(text, padding="max_length", max_length=77).input_ids
                == tok(text, padding="max_length", max_length=77).input_ids
            )
