"""The A1111 prompt language as pure text functions (no torch): emphasis, BREAK, editing, alternation, AND, tags.

Names follow A1111's `modules/prompt_parser.py`, which extension authors call:
- `parse_prompt_attention(text) -> [[text, weight], ...]`
- `get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps=None, use_old_scheduling=False)`
  `-> [[[end_step, text], ...], ...]`
- `get_multicond_prompt_list(prompts) -> (indexes, flat_prompts, prompt_flat_list)` plus `split_and(prompt)`;
- `parse_extra_networks(prompt) -> (prompt without tags, [ExtraNetworkTag, ...])`.

The scheduling grammar (the one A1111 writes for lark) is parsed here by a small recursive-descent parser:

    start     := (prompt | stray "[" "]" "(" ")" ":")*
    prompt    := (emphasized | scheduled | alternate | plain | whitespace)*
    emphasized:= "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
    scheduled := "[" [prompt ":"] prompt ":" [ws] NUMBER [ws] "]"
    alternate := "[" prompt ("|" [prompt])+ "]"
    plain     := ([^\\[]():|] | "\\" any)+

A prompt that does not parse (a bare "|" at the top level, a trailing backslash) is used as it is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# ------------------------------------------------------------------------------------- emphasis

_RE_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""", re.X)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1


def parse_prompt_attention(text: str) -> list[list]:
    """Split `text` into [text, weight] runs: `(x)` x1.1, `[x]` /1.1, `(x:w)` sets w, escapes are literal,
    unclosed brackets close at the end, BREAK becomes ["BREAK", -1], equal neighbours merge."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_RE_BREAK.split(chunk)):
            if i > 0:
                res.append(["BREAK", -1])
            res.append([part, 1.0])

    for m in _RE_ATTENTION.finditer(text):
        chunk, weight = m.group(0), m.group(1)
        if chunk.startswith("\\") and len(chunk) == 2:
            res.append([chunk[1], 1.0])  # \( \) \[ \] \\ are literal characters
        elif chunk == "(":
            round_brackets.append(len(res))
        elif chunk == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets and _is_number(weight):
            multiply_range(round_brackets.pop(), float(weight))
        elif chunk == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_MULTIPLIER)
        elif chunk == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_MULTIPLIER)
        else:
            add_text(chunk)

    for pos in round_brackets:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_MULTIPLIER)

    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- scheduling grammar

class _ParseError(Exception):
    pass


@dataclass
class _Scheduled:
    before: list | None
    after: list
    when_text: str
    when: int = 0  # resolved against the step count


@dataclass
class _Alternate:
    options: list[list] = field(default_factory=list)


_PLAIN_STOP = set("[]():|")
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+)")
_WS = re.compile(r"\s+")


class _Parser:
    def __init__(self, text: str):
        self.text = text

    def parse(self) -> list:
        nodes, pos = [], 0
        while pos < len(self.text):
            items, pos = self.prompt(pos)
            nodes.extend(items)
            if pos < len(self.text):
                ch = self.text[pos]
                if ch in "[]():":
                    nodes.append(ch)  # stray brackets and colons are literal at the top level only
                    pos += 1
                else:
                    raise _ParseError(f"unexpected {ch!r} at {pos}")
        return nodes

    def prompt(self, pos: int) -> tuple[list, int]:
        """Greedy: a prompt never holds a stray bracket, so the longest match is the only one."""
        nodes: list = []
        text = self.text
        while pos < len(text):
            ch = text[pos]
            if ch in "([":
                parsed = self.construct(pos)
                if parsed is None:
                    break
                node, pos = parsed
                nodes.extend(node)
            elif ch in "]):|":
                break
            else:
                start = pos
                while pos < len(text) and text[pos] not in _PLAIN_STOP:
                    if text[pos] == "\\":
                        if pos + 1 >= len(text):
                            raise _ParseError("a backslash ends the prompt")
                        pos += 2
                    else:
                        pos += 1
                nodes.append(text[start:pos])
        return nodes, pos

    def construct(self, pos: int):
        text = self.text
        if text[pos] == "(":
            inner, p = self.prompt(pos + 1)
            if p < len(text) and text[p] == ")":
                return ["(", *inner, ")"], p + 1
            if p < len(text) and text[p] == ":":
                second, p2 = self.prompt(p + 1)
                if p2 < len(text) and text[p2] == ")":
                    return ["(", *inner, ":", *second, ")"], p2 + 1
            return None
        # "[": scheduled (two or one prompt), alternate, or emphasized
        first, p = self.prompt(pos + 1)
        if p < len(text) and text[p] == ":":
            number = self.number_close(p + 1)
            if number is not None:
                when_text, end = number
                return [_Scheduled(None, first, when_text)], end
            second, p2 = self.prompt(p + 1)
            if p2 < len(text) and text[p2] == ":":
                number = self.number_close(p2 + 1)
                if number is not None:
                    when_text, end = number
                    return [_Scheduled(first, second, when_text)], end
            return None
        if p < len(text) and text[p] == "|":
            options = [first]
            while p < len(text) and text[p] == "|":
                option, p = self.prompt(p + 1)
                options.append(option)
            if p < len(text) and text[p] == "]":
                return [_Alternate(options)], p + 1
            return None
        if p < len(text) and text[p] == "]":
            return ["[", *first, "]"], p + 1
        return None

    def number_close(self, pos: int):
        """`[ws] NUMBER [ws] "]"` at pos: (number text, position after "]") or None."""
        m = _WS.match(self.text, pos)
        if m:
            pos = m.end()
        m = _NUMBER.match(self.text, pos)
        if not m:
            return None
        number, pos = m.group(0), m.end()
        m = _WS.match(self.text, pos)
        if m:
            pos = m.end()
        if pos < len(self.text) and self.text[pos] == "]":
            return number, pos + 1
        return None


def _walk(nodes: list):
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            if node.before:
                yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _text_at(nodes: list, step: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_text_at(node.before or [], step) if step <= node.when else _text_at(node.after, step))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def get_learned_conditioning_prompt_schedules(prompts: list[str], steps: int, hires_steps: int | None = None,
                                              use_old_scheduling: bool = False) -> list[list[list]]:
    """For each prompt, [[end_step, text], ...]: the text to use up to and including end_step.

    An integer `when` is a step, a decimal a fraction of the steps. For the hires pass (hires_steps given,
    new scheduling) integers count on from the first pass's steps and fractions from 1.0, so `[a:b:1.5]`
    switches half-way through the hires pass.
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, float_offset, total = 0, 0.0, steps
    else:
        int_offset, float_offset, total = steps, 1.0, hires_steps

    def schedule(prompt: str) -> list[list]:
        try:
            tree = _Parser(prompt).parse()
        except _ParseError:
            return [[total, prompt]]
        ends = {total}
        for node in _walk(tree):
            if isinstance(node, _Alternate):
                ends.update(range(1, total + 1))
                continue
            value = float(node.when_text)
            if use_old_scheduling:
                value = value * total if value < 1 else value
            elif "." in node.when_text:
                value = (value - float_offset) * total
            else:
                value = value - int_offset
            node.when = min(total, int(value))
            if node.when >= 1:
                ends.add(node.when)
        return [[end, _text_at(tree, end)] for end in sorted(ends)]

    cache = {prompt: schedule(prompt) for prompt in set(prompts)}
    return [[list(entry) for entry in cache[prompt]] for prompt in prompts]


def text_at_step(schedule: list[list], step: int) -> str:
    """The text of a schedule in force at 0-based sampler step `step` (A1111: the first end_step >= step)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[-1][1]


# ---------------------------------------------------------------------------------------- AND

_RE_AND = re.compile(r"\bAND\b")
_RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """`a AND b :0.5` -> [("a", 1.0), ("b", 0.5)]: sub-prompts combined in CFG with their weights."""
    parts = []
    for sub in _RE_AND.split(prompt):
        m = _RE_WEIGHT.search(sub)
        text, weight = (m.group(1), float(m.group(2))) if m and m.group(2) is not None else (sub, 1.0)
        parts.append((text, weight))
    return parts


def get_multicond_prompt_list(prompts: list[str]):
    """A1111's shape: per prompt the [(index into flat list, weight)], the flat list and its index map."""
    res_indexes, prompt_flat_list, prompt_indexes = [], [], {}
    for prompt in prompts:
        indexes = []
        for text, weight in split_and(prompt):
            index = prompt_indexes.get(text)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


# ------------------------------------------------------------------------------ extra networks

_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<kind:arg1:arg2...>` tag as written in the prompt."""
    kind: str
    args: tuple[str, ...]
    text: str


def parse_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Strip every `<kind:args>` tag from the prompt; return the rest and the tags in order."""
    tags: list[ExtraNetworkTag] = []

    def found(m: re.Match) -> str:
        tags.append(ExtraNetworkTag(m.group(1), tuple(m.group(2).split(":")), m.group(0)))
        return ""

    return _RE_EXTRA_NET.sub(found, prompt), tags
