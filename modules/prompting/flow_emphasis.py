"""A1111's emphasis, `(word:1.3)`, `(word)`, `[word]`, for the FLUX and SD3 text encoders.

The prompt is encoded as plain text by the pipeline's own encoder (the syntax removed), so a prompt without
weights gives exactly the pipeline's embeddings; then each token's row of the sequence embeddings is multiplied
by the weight of the text it came from, and the whole is rescaled to its mean before weighting, as A1111 does for
SD's CLIP. Tokens are matched to the text by the fast tokenizers' character offsets. SD3's sequence is CLIP-L|CLIP-G
(77 rows) then T5; FLUX's is T5 alone (its CLIP gives only the pooled vector, which weights do not change, as in
A1111).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from modules.prompting.prompt_parser import parse_prompt_attention

if TYPE_CHECKING:
    import torch


def weighted_text(text: str) -> tuple[str, list[tuple[int, int, float]]]:
    """(the text without emphasis syntax, [(start, end, weight)] character spans of it). BREAK is dropped (it
    only means something for SD's 75-token chunks)."""
    plain, spans = "", []
    for part, weight in parse_prompt_attention(text):
        if weight < 0:  # BREAK
            continue
        spans.append((len(plain), len(plain) + len(part), float(weight)))
        plain += part
    return plain, spans


def has_weights(spans: list[tuple[int, int, float]]) -> bool:
    return any(weight != 1.0 for _, _, weight in spans)


def token_weights(tokenizer, plain: str, spans, length: int) -> "torch.Tensor":
    """The weight of each of the `length` token positions the tokenizer gives `plain` (padded and truncated to
    `length`, as the pipelines tokenize): the weight of the span holding the token's last character; 1 for
    special and padding tokens."""
    import torch
    enc = tokenizer(plain, padding="max_length", max_length=length, truncation=True, return_offsets_mapping=True)
    weights = []
    for start, end in enc["offset_mapping"]:
        weight = 1.0
        if end > start:
            for s, e, w in spans:
                if s <= end - 1 < e:
                    weight = w
                    break
        weights.append(weight)
    return torch.tensor(weights)


def emphasize(z: "torch.Tensor", weights: "torch.Tensor", normalize: bool = True) -> "torch.Tensor":
    """Rows of `z` (batch x tokens x width) times their weights, rescaled to the mean `z` had (A1111's "Original"
    emphasis; `normalize` False is its "No norm")."""
    original = z.mean()
    z = z * weights.to(z.device, z.dtype)[None, :, None]
    return z * (original / z.mean()) if normalize else z
