"""The CLIP BPE tokenizer (SD1 / SD2 / SDXL), built offline from the shipped MIT vocabulary file."""
from __future__ import annotations

import functools
import gzip
import threading
from typing import TYPE_CHECKING

from modules.core.paths import SD_CONFIGS_DIR

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BPE_VOCAB_PATH = SD_CONFIGS_DIR / "bpe_simple_vocab_16e6.txt.gz"

# OpenAI's CLIP keeps only the first 49152 - 256 - 2 merge lines so that the vocabulary
# (256 bytes + 256 "</w>" bytes + merges + 2 specials) is exactly 49,408 entries.
NUM_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

_lock = threading.Lock()


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in the byte-level BPE order CLIP's ids follow."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            # Bytes without a printable glyph are shifted above 255, as GPT-2/CLIP do.
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(BPE_VOCAB_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 1 is the "#version" header; the next NUM_MERGES lines are the merges CLIP uses.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    byte_symbols = _bytes_to_unicode()
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    return vocab, merges


_cache: dict[str, "CLIPTokenizer"] = {}


def clip_tokenizer(pad_token: str = EOS_TOKEN) -> "CLIPTokenizer":
    """The CLIP tokenizer with the given pad token; SD1 pads with "<|endoftext|>", SD2 and SDXL's
    second tokenizer with "!". Built once per pad token per process; callers must not mutate it."""
    with _lock:
        tokenizer = _cache.get(pad_token)
        if tokenizer is None:
            from modules.core import import_lock
            with import_lock.lock:
                from transformers import CLIPTokenizer

            vocab, merges = _vocab_and_merges()
            tokenizer = CLIPTokenizer(
                vocab=dict(vocab),
                merges=list(merges),
                unk_token=EOS_TOKEN,
                bos_token=BOS_TOKEN,
                eos_token=EOS_TOKEN,
                pad_token=pad_token,
                model_max_length=MODEL_MAX_LENGTH,
            )
            _cache[pad_token] = tokenizer
        return tokenizer
