"""Prompt text -> CLIP conditioning tensors: 75-token chunks, weights, BREAK, embeddings, schedules, AND.

A1111's rules (docs/a1111-compatibility.md, section 3) over diffusers' text encoders:
- the text is split into runs of weight (`prompt_parser.parse_prompt_attention`), each run tokenized on its
  own; tokens fill chunks of 75, a full chunk moves the words after its last comma (within 20 tokens) to
  the next one, `BREAK` ends a chunk, an embedding's vectors never straddle two chunks;
- each chunk is BOS + 75 + EOS + padding (the tokenizer's pad token, as diffusers pads), encoded on its
  own, then the chunks are concatenated along the token axis: no length limit;
- "Original" emphasis multiplies each token's vector by its weight, then rescales the chunk so its mean is
  the unweighted mean; with every weight 1 nothing is touched, so a short plain prompt gives exactly
  diffusers' `encode_prompt`;
- clip skip: SD1/SD2 take the hidden state `clip_skip` layers from the end through the final layer norm;
  SDXL, as in A1111, ignores it: both encoders give their penultimate hidden state (diffusers' default),
  concatenated, plus the pooled output of the second (from the first chunk); only with the
  `sdxl_clip_l_skip` setting does CLIP-L take the hidden state `clip_skip` from the end. An empty SDXL
  negative prompt is all zeros (A1111, and diffusers' `force_zeros_for_empty_prompt`);
- prompt editing / alternation and `AND` are a `ScheduledConditioning`; `ConditioningSwitch` feeds the
  right tensors to the UNet at each sampler step and combines AND's sub-prompts in CFG as
  uncond + sum(w_i * cfg * (cond_i - uncond)).

The chunking half needs no torch (the UI's token counter uses it); torch is imported where tensors start.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from modules.prompting import prompt_parser

CHUNK_LENGTH = 75
COMMA_BACKTRACK = 20
EMPHASIS_ORIGINAL = "Original"
EMPHASIS_NONE = "No norm"
EMPHASIS_MODES = (EMPHASIS_ORIGINAL, EMPHASIS_NONE)

# The shared tokenizer object (clip_tokenizer.clip_tokenizer) is not safe to call from two threads at once.
_tokenizer_lock = threading.Lock()


class EmbeddingLike(Protocol):
    """What the conditioner needs of a textual inversion embedding (see extra_networks.Embedding)."""
    name: str

    def vectors_for(self, dim: int) -> Any: ...  # [n, dim] tensor, or None when it has none of that width

    @property
    def dims(self) -> set[int]: ...  # the widths it has vectors for

    @property
    def count(self) -> int: ...


@dataclass
class PromptChunk:
    """Up to 75 content tokens with their weights, and where embedding vectors replace token ids."""
    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Any]] = field(default_factory=list)  # (offset in tokens, embedding)


def _embedding_pattern(names: Sequence[str]) -> re.Pattern | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])({alternatives})(?![\w-])", re.IGNORECASE)


class Chunker:
    """Text -> PromptChunks with one tokenizer (torch-free)."""

    def __init__(self, tokenizer, embeddings: dict[str, EmbeddingLike] | None = None,
                 comma_backtrack: int = COMMA_BACKTRACK):
        self.tokenizer = tokenizer
        self.embeddings = {k.lower(): v for k, v in (embeddings or {}).items()}
        self._pattern = _embedding_pattern(list(self.embeddings))
        self.comma_backtrack = comma_backtrack
        with _tokenizer_lock:
            self.comma_token = tokenizer.convert_tokens_to_ids(",</w>")
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id

    def tokenize(self, text: str) -> list[int]:
        with _tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]

    def _pieces(self, text: str) -> list:
        """Token ids and embeddings of one weighted run, in order."""
        if self._pattern is None:
            return self.tokenize(text)
        pieces: list = []
        last = 0
        for m in self._pattern.finditer(text):
            pieces.extend(self.tokenize(text[last:m.start()]))
            pieces.append(self.embeddings[m.group(1).lower()])
            last = m.end()
        pieces.extend(self.tokenize(text[last:]))
        return pieces

    def chunks(self, text: str) -> tuple[list[PromptChunk], int]:
        """The chunks of `text` and its token count (embedding vectors count as tokens)."""
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last: bool = False) -> None:
            nonlocal chunk, token_count, last_comma
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            chunks.append(chunk)
            chunk = PromptChunk()
            last_comma = -1

        for text_run, weight in prompt_parser.parse_prompt_attention(text):
            if text_run == "BREAK" and weight == -1:
                next_chunk()
                continue
            for piece in self._pieces(text_run):
                if isinstance(piece, int):
                    if piece == self.comma_token:
                        last_comma = len(chunk.tokens)
                    elif (self.comma_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                          and len(chunk.tokens) - last_comma <= self.comma_backtrack):
                        # the words after the last comma move on with the rest, so a phrase is not cut in two
                        cut = last_comma + 1
                        moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                        moved_fixes = [(o - cut, e) for o, e in chunk.fixes if o >= cut]
                        chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                        chunk.fixes = [(o, e) for o, e in chunk.fixes if o < cut]
                        next_chunk()
                        chunk.tokens, chunk.multipliers, chunk.fixes = moved_tokens, moved_mults, moved_fixes
                    if len(chunk.tokens) == CHUNK_LENGTH:
                        next_chunk()
                    chunk.tokens.append(piece)
                    chunk.multipliers.append(weight)
                    continue
                count = piece.count
                if len(chunk.tokens) == CHUNK_LENGTH or len(chunk.tokens) + count > CHUNK_LENGTH:
                    next_chunk()  # an embedding is never split across chunks
                chunk.fixes.append((len(chunk.tokens), piece))
                # Placeholders whose vectors are replaced. Id 0, as A1111: SDXL's pooled output is read where
                # the highest id (<|endoftext|>) first stands, so they must never be that id.
                chunk.tokens.extend([0] * count)
                chunk.multipliers.extend([weight] * count)
        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def padded_ids(self, chunk: PromptChunk) -> tuple[list[int], list[float]]:
        """BOS + tokens + EOS + padding to 77, as diffusers' tokenizer call lays them out."""
        ids = [self.id_start] + chunk.tokens + [self.id_end]
        mults = [1.0] + chunk.multipliers + [1.0]
        pad = CHUNK_LENGTH + 2 - len(ids)
        return ids + [self.id_pad] * pad, mults + [1.0] * pad


def strip_for_counting(text: str) -> list[str]:
    """The texts a prompt stands for, for counting: tags out, each AND part, each scheduled variant."""
    text, _ = prompt_parser.parse_extra_networks(text or "")
    texts = []
    for part, _ in prompt_parser.split_and(text):
        for _, variant in prompt_parser.get_learned_conditioning_prompt_schedules([part], 1 << 10)[0]:
            texts.append(variant)
    return texts or [""]


def token_counts(text: str, tokenizer, embeddings: dict | None = None) -> tuple[int, int]:
    """(tokens, limit) as A1111's counter shows them: the longest variant, limit = 75 x its chunks."""
    chunker = Chunker(tokenizer, embeddings)
    best_tokens, best_chunks = 0, 1
    for variant in strip_for_counting(text):
        chunks, count = chunker.chunks(variant)
        if count >= best_tokens:
            best_tokens, best_chunks = count, max(1, len(chunks))
    return best_tokens, best_chunks * CHUNK_LENGTH


# ---------------------------------------------------------------------------------- tensors


@dataclass
class Conditioning:
    """One encoded text: [1, 77 x chunks, D] embeddings and (SDXL) the [1, P] pooled output."""
    embeds: Any
    pooled: Any = None

    @property
    def chunk_count(self) -> int:
        return self.embeds.shape[1] // (CHUNK_LENGTH + 2)


@dataclass
class _Encoder:
    module: Any  # a transformers CLIP text model
    chunker: Chunker
    pooled: bool  # this encoder gives SDXL's pooled output


class TextConditioner:
    """Encodes prompt texts for one checkpoint's text encoder(s) the A1111 way."""

    def __init__(self, components: dict, family: str, clip_skip: int = 1, emphasis: str = EMPHASIS_ORIGINAL,
                 embeddings: dict[str, EmbeddingLike] | None = None, comma_backtrack: int = COMMA_BACKTRACK,
                 sdxl_clip_l_skip: bool = False):
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"unknown emphasis mode {emphasis!r}; use one of {', '.join(EMPHASIS_MODES)}")
        self.family = family
        self.sdxl = family == "sdxl"
        self.clip_skip = max(1, int(clip_skip or 1))
        self.sdxl_clip_l_skip = bool(sdxl_clip_l_skip)
        self.emphasis = emphasis
        self.encoders: list[_Encoder] = []
        pairs = [(tok, enc) for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
                 if components.get(enc) is not None]
        # An embedding is used when it has vectors for exactly these encoders (as A1111: SDXL skips SD1
        # embeddings, SD1 skips SDXL ones).
        dims = {components[enc].config.hidden_size for _, enc in pairs}
        usable = {name: e for name, e in (embeddings or {}).items() if e.dims == dims}
        for tok_key, enc_key in pairs:
            self.encoders.append(_Encoder(components[enc_key], Chunker(components[tok_key], usable, comma_backtrack),
                                          pooled=enc_key == "text_encoder_2"))
        if not self.encoders:
            raise ValueError("this checkpoint has no text encoder")
        self._cache: dict[str, Conditioning] = {}

    @property
    def used_embeddings(self) -> dict[str, EmbeddingLike]:
        return self.encoders[0].chunker.embeddings

    def _hidden(self, enc: _Encoder, ids, fixes):
        import torch
        module = enc.module
        handle = None
        if fixes:
            dim = module.config.hidden_size

            def replace(_m, _inp, out):
                out = out.clone()
                for offset, emb in fixes:
                    vec = emb.vectors_for(dim).to(out.device, out.dtype)
                    out[0, 1 + offset:1 + offset + vec.shape[0]] = vec
                return out

            handle = module.get_input_embeddings().register_forward_hook(replace)
        try:
            with torch.no_grad():
                ids_t = torch.tensor([ids], device=module.device)
                if self.sdxl:
                    out = module(ids_t, output_hidden_states=True)
                    skip_l = self.sdxl_clip_l_skip and not enc.pooled
                    hidden = out.hidden_states[-self.clip_skip if skip_l else -2]
                    pooled = out[0] if enc.pooled else None
                elif self.clip_skip == 1:
                    out = module(ids_t)
                    hidden, pooled = out[0], None
                else:
                    out = module(ids_t, output_hidden_states=True)
                    hidden = module.text_model.final_layer_norm(out.hidden_states[-self.clip_skip]) \
                        if hasattr(module, "text_model") else module.final_layer_norm(out.hidden_states[-self.clip_skip])
                    pooled = None
        finally:
            if handle is not None:
                handle.remove()
        return hidden, pooled

    def encode(self, text: str) -> Conditioning:
        """A text (no AND, no scheduling, tags already stripped) -> its Conditioning, cached per conditioner."""
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        import torch
        per_encoder = [enc.chunker.chunks(text)[0] for enc in self.encoders]
        zs, pooled = [], None
        for i in range(len(per_encoder[0])):
            hiddens, mults = [], None
            for enc, chunks in zip(self.encoders, per_encoder):
                ids, chunk_mults = enc.chunker.padded_ids(chunks[i])
                mults = chunk_mults
                hidden, pooled_i = self._hidden(enc, ids, chunks[i].fixes)
                hiddens.append(hidden)
                if pooled_i is not None and i == 0:
                    pooled = pooled_i
            z = torch.cat(hiddens, dim=-1) if len(hiddens) > 1 else hiddens[0]
            if any(m != 1.0 for m in mults):
                weights = torch.tensor(mults, dtype=torch.float32, device=z.device).reshape(1, -1, 1)
                zf = z.float()
                original_mean = zf.mean()
                zf = zf * weights
                new_mean = zf.mean()
                # A mean that is ~0 next to the values themselves (a layer norm without bias, as in random test
                # encoders) carries no scale: dividing by it would only blow rounding noise up to inf/NaN.
                if self.emphasis == EMPHASIS_ORIGINAL and new_mean.abs() > 1e-4 * zf.abs().mean():
                    zf = zf * (original_mean / new_mean)
                z = zf.to(z.dtype)
            zs.append(z)
        dtype = self.encoders[0].module.dtype
        cond = Conditioning(torch.cat(zs, dim=1).to(dtype), pooled.to(dtype) if pooled is not None else None)
        self._cache[text] = cond
        return cond

    def zeros(self) -> Conditioning:
        """SDXL's conditioning of an empty negative prompt: one chunk of zeros, and a zero pooled output."""
        import torch
        empty = self.encode("")
        return Conditioning(torch.zeros_like(empty.embeds),
                            torch.zeros_like(empty.pooled) if empty.pooled is not None else None)

    def padded(self, cond: Conditioning, chunk_count: int) -> Conditioning:
        """`cond` with encoded empty chunks appended up to chunk_count (A1111 pads cond/uncond alike)."""
        import torch
        missing = chunk_count - cond.chunk_count
        if missing <= 0:
            return cond
        empty = self.encode("").embeds
        return Conditioning(torch.cat([cond.embeds] + [empty] * missing, dim=1), cond.pooled)


@dataclass
class ScheduledConditioning:
    """A request's conditioning over the sampler steps: uncond and each AND part, as [(end_step, cond)]."""
    uncond: list[tuple[int, Conditioning]]
    conds: list[tuple[float, list[tuple[int, Conditioning]]]]

    @property
    def is_static(self) -> bool:
        """One sub-prompt of weight 1 and no step changes: plain prompt_embeds do it, with no UNet hook."""
        return len(self.conds) == 1 and self.conds[0][0] == 1.0 and len(self.conds[0][1]) == 1 and len(self.uncond) == 1

    @staticmethod
    def _at(schedule, step: int) -> Conditioning:
        for end, cond in schedule:
            if step <= end:
                return cond
        return schedule[-1][1]

    def uncond_at(self, step: int) -> Conditioning:
        return self._at(self.uncond, step)

    def conds_at(self, step: int) -> list[tuple[float, Conditioning]]:
        return [(w, self._at(schedule, step)) for w, schedule in self.conds]


def build_conditioning(conditioner: TextConditioner, prompt: str, negative: str, steps: int,
                       hires_steps: int | None = None, use_old_scheduling: bool = False) -> ScheduledConditioning:
    """Encode a request's prompt (AND parts, editing, alternation) and negative prompt (editing), padded
    to one chunk count so every tensor the UNet sees in one step has the same shape."""
    parts = prompt_parser.split_and(prompt)
    texts = [negative] + [text for text, _ in parts]
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules(texts, steps, hires_steps, use_old_scheduling)
    encoded = [[(end, conditioner.encode(text)) for end, text in schedule] for schedule in schedules]
    if conditioner.sdxl and all(text == "" for _, text in schedules[0]):
        encoded[0] = [(end, conditioner.zeros()) for end, _ in schedules[0]]
    most = max(c.chunk_count for schedule in encoded for _, c in schedule)
    encoded = [[(end, conditioner.padded(c, most)) for end, c in schedule] for schedule in encoded]
    return ScheduledConditioning(uncond=encoded[0],
                                 conds=[(w, schedule) for (_, w), schedule in zip(parts, encoded[1:])])


class ConditioningSwitch:
    """Hooks on the UNet for the duration of one sampling pass: at each sampler step it swaps in that
    step's conditioning and evaluates every AND part, handing the pipeline back [uncond, combined cond] so
    its own CFG (uncond + cfg * (cond - uncond)) gives uncond + sum(w_i * cfg * (cond_i - uncond))."""

    def __init__(self, unet, conditioning: ScheduledConditioning, batch_size: int):
        self.unet = unet
        self.conditioning = conditioning
        self.batch = batch_size
        self.step = 0  # the sampler step about to run (0-based); set by the step callback
        self._handles: list = []
        self._parts = 0
        self._layout = ""

    def __enter__(self):
        self._handles = [self.unet.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.unet.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False

    def on_step_end(self, i: int) -> None:
        self.step = i + 1

    def _before(self, _module, args, kwargs):
        import torch
        args = list(args)
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        b = self.batch
        n = sample.shape[0]
        cfg = n == 2 * b
        conds = self.conditioning.conds_at(self.step)
        uncond = self.conditioning.uncond_at(self.step)
        self._parts = len(conds)
        self._weights = [w for w, _ in conds]
        self._layout = "cfg" if cfg else "single"
        cond_sample = sample[b:] if cfg else sample
        uncond_sample = sample[:b] if cfg else sample
        new_sample = torch.cat([uncond_sample] + [cond_sample] * len(conds))
        dtype = self.unet.dtype
        ehs = torch.cat([uncond.embeds.to(sample.device, dtype).expand(b, -1, -1)] +
                        [c.embeds.to(sample.device, dtype).expand(b, -1, -1) for _, c in conds])
        if isinstance(timestep, torch.Tensor) and timestep.ndim > 0 and timestep.shape[0] == n:
            t_u, t_c = (timestep[:b], timestep[b:]) if cfg else (timestep, timestep)
            timestep = torch.cat([t_u] + [t_c] * len(conds))
        if args:
            args[0] = new_sample
            if len(args) > 1:
                args[1] = timestep
            else:
                kwargs["timestep"] = timestep
        else:
            kwargs["sample"], kwargs["timestep"] = new_sample, timestep
        kwargs["encoder_hidden_states"] = ehs
        added = kwargs.get("added_cond_kwargs")
        if added:
            added = dict(added)
            time_ids = added["time_ids"]
            tid_u, tid_c = (time_ids[:b], time_ids[b:]) if cfg else (time_ids, time_ids)
            added["time_ids"] = torch.cat([tid_u] + [tid_c] * len(conds))
            pooled = [uncond.pooled] + [c.pooled for _, c in conds]
            added["text_embeds"] = torch.cat([p.to(sample.device, time_ids.dtype).expand(b, -1) for p in pooled])
            kwargs["added_cond_kwargs"] = added
        return tuple(args), kwargs

    def _after(self, _module, _args, _kwargs, output):
        import torch
        as_tuple = isinstance(output, tuple)
        noise = output[0] if as_tuple else output.sample
        b = self.batch
        uncond = noise[:b]
        parts = [noise[b * (i + 1):b * (i + 2)] for i in range(self._parts)]
        if self._parts == 1 and self._weights[0] == 1.0:
            combined = parts[0]  # editing/alternation only: the cond half as it is
        else:
            combined = uncond + sum(w * (p - uncond) for w, p in zip(self._weights, parts))
        result = torch.cat([uncond, combined]) if self._layout == "cfg" else combined
        if as_tuple:
            return (result,) + tuple(output[1:])
        output.sample = result
        return output


def pipeline_embeds(conditioning: ScheduledConditioning, batch_size: int, sdxl: bool) -> dict[str, Any]:
    """The step-0 tensors as pipeline keyword arguments (shapes the pipeline checks; a switch may swap them)."""
    cond = conditioning.conds_at(0)[0][1]
    uncond = conditioning.uncond_at(0)
    kw = {"prompt_embeds": cond.embeds.repeat(batch_size, 1, 1),
          "negative_prompt_embeds": uncond.embeds.repeat(batch_size, 1, 1)}
    if sdxl:
        kw["pooled_prompt_embeds"] = cond.pooled.repeat(batch_size, 1)
        kw["negative_pooled_prompt_embeds"] = uncond.pooled.repeat(batch_size, 1)
    return kw


def embeddings_in(texts: Sequence[str], embeddings: dict[str, EmbeddingLike]) -> list[EmbeddingLike]:
    """The embeddings written (as whole words) in any of the texts, in name order."""
    pattern = _embedding_pattern(list(embeddings))
    if pattern is None:
        return []
    lowered = {k.lower(): v for k, v in embeddings.items()}
    found = {m.group(1).lower() for text in texts for m in pattern.finditer(text)}
    return [lowered[name] for name in sorted(found)]
