"""Tiny random-weight BLIP-2 captioner (OPT), BLIP-2 retrieval (ITM) and BLIP v1 captioner, built offline for tests and demos.

`make_tiny_captioners(models_dir)` writes `BLIP2/tiny-blip2/` (Blip2ForConditionalGeneration with a
2-layer OPT, its processor and a byte-level BPE tokenizer), `BLIP2/tiny-blip2-itm/`
(Blip2ForImageTextRetrieval with a WordPiece tokenizer) and `BLIP/tiny-blip/` (BlipForConditionalGeneration
with a 2-layer BERT decoder and a WordPiece tokenizer carrying BLIP's `[DEC]` BOS token), in the transformers
folder layout the real checkpoints use, so every code path that loads `Salesforce/blip2-*` or
`Salesforce/blip-image-captioning-*` loads these the same way.

No hub is reachable, so the tokenizers are trained/written here from a fixed corpus: the BPE one is a real
GPT-2-style byte-level BPE (any text tokenizes), the WordPiece one has every letter as a piece (any
word tokenizes). Everything is seeded and small, so the three are written in about a second.
"""
from __future__ import annotations

import os
from pathlib import Path

from modules.core.fileio import atomic_folder

TINY_CAPTIONERS_VERSION = "1"
VERSION_MARKER_FILE = "tiny_models_version.txt"
BLIP2_SUBDIR = "BLIP2"
BLIP_SUBDIR = "BLIP"
TINY_BLIP2 = "tiny-blip2"
TINY_BLIP2_ITM = "tiny-blip2-itm"
TINY_BLIP = "tiny-blip"

NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 32
# CLIP's normalisation, as in BLIP-2's processor config
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

_CORPUS = [
    "a photo of a red cat sitting on a blue chair",
    "Question: what color is the sky? Answer: blue.",
    "Question: how many dogs are there? Short answer: two",
    "a painting of a green tree in the mountains at dusk",
    "an image of a person riding a bicycle down the street",
    "a close up of a yellow flower with water drops",
    "a lighthouse by the sea, a bowl of fruit on a wooden table, a city at night",
]

VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               encoder_hidden_size=32, cross_attention_frequency=1, max_position_embeddings=64)


def _bpe_tokenizer():
    """An OPT-style tokenizer: byte-level BPE, `</s>` (id 2) as BOS/EOS prepended to every text, `<pad>` id 1."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                             unk_token="<unk>")


def _wordpiece_tokenizer(bos_token: str | None = None):
    """A BERT-style uncased WordPiece tokenizer (the Q-Former's) over the corpus words plus every letter.
    With `bos_token` (BLIP v1's "[DEC]") that token is appended to the vocabulary and declared the BOS."""
    from transformers import BertTokenizerFast

    words = sorted({w.strip(".,?:").lower() for line in _CORPUS for w in line.split()} - {""})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", ":", "!", "'", "-"]
    vocab += letters + ["##" + c for c in letters] + [w for w in words if w not in letters]
    extra = {} if bos_token is None else {"bos_token": bos_token}
    vocab += [bos_token] if bos_token is not None else []
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True, **extra)


def _image_processor():
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=IMAGE_MEAN,
                              image_std=IMAGE_STD)


def build_tiny_blip2(seed: int = 0):
    """(model, processor) of a tiny BLIP-2 with an OPT language model. The processor is built first: it
    adds the `<image>` token, whose id the config needs (`image_token_index`)."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    tokenizer = _bpe_tokenizer()
    processor = Blip2Processor(_image_processor(), tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=dict(QFORMER, vocab_size=99),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=37, max_position_embeddings=128, word_embed_proj_dim=32,
                         bos_token_id=2, eos_token_id=2, pad_token_id=1),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    return Blip2ForConditionalGeneration(config).eval(), processor


def build_tiny_blip2_itm(seed: int = 1):
    """(model, processor) of a tiny BLIP-2 image-text retrieval model (ITC embeddings and the ITM head)."""
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

    tokenizer = _wordpiece_tokenizer()
    # No query-token placeholders in the text: the Q-Former reads the text itself (as blip2-itm-vit-g does).
    processor = Blip2Processor(_image_processor(), tokenizer, num_query_tokens=None)
    config = Blip2Config(
        vision_config=VISION,
        qformer_config=dict(QFORMER, vocab_size=len(tokenizer), pad_token_id=0, use_qformer_text_input=True),
        text_config=dict(model_type="opt", vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=8, word_embed_proj_dim=8),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=16,
    )
    torch.manual_seed(seed)
    return Blip2ForImageTextRetrieval(config).eval(), processor


def build_tiny_blip(seed: int = 2):
    """(model, processor) of a tiny BLIP v1 captioner. As in Salesforce/blip-image-captioning-*, the decoder's
    BOS is "[DEC]" (the last vocabulary entry), generation stops at "[SEP]" and pads with "[PAD]" (id 0)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    tokenizer = _wordpiece_tokenizer(bos_token="[DEC]")
    processor = BlipProcessor(_image_processor(), tokenizer)
    config = BlipConfig(
        vision_config=VISION,
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, encoder_hidden_size=VISION["hidden_size"],
                         intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
                         sep_token_id=tokenizer.sep_token_id, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.sep_token_id),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    return BlipForConditionalGeneration(config).eval(), processor


def _is_current(folder: Path) -> bool:
    marker = folder / VERSION_MARKER_FILE
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == TINY_CAPTIONERS_VERSION


def _write_folder(folder: Path, model, processor) -> None:
    """save_pretrained into a temp sibling, then one rename: a reader never sees half a model."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / VERSION_MARKER_FILE).write_text(TINY_CAPTIONERS_VERSION + "\n", encoding="utf-8")


def make_tiny_captioners(models_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the tiny BLIP-2 captioner and retrieval model under `models_dir/BLIP2/` and the tiny BLIP v1
    captioner under `models_dir/BLIP/` (each kept when current)."""
    root = Path(models_dir) / BLIP2_SUBDIR
    paths = {TINY_BLIP2: root / TINY_BLIP2, TINY_BLIP2_ITM: root / TINY_BLIP2_ITM,
             TINY_BLIP: Path(models_dir) / BLIP_SUBDIR / TINY_BLIP}
    if not _is_current(paths[TINY_BLIP2]):
        _write_folder(paths[TINY_BLIP2], *build_tiny_blip2())
    if not _is_current(paths[TINY_BLIP2_ITM]):
        _write_folder(paths[TINY_BLIP2_ITM], *build_tiny_blip2_itm())
    if not _is_current(paths[TINY_BLIP]):
        _write_folder(paths[TINY_BLIP], *build_tiny_blip())
    return paths
