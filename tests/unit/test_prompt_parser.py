"""The A1111 prompt language parser: each case below is worked out by hand from the rules (contract section 5)."""
from __future__ import annotations

import pytest

from modules.prompting.prompt_parser import (
    get_learned_conditioning_prompt_schedules,
    get_multicond_prompt_list,
    parse_extra_networks,
    parse_prompt_attention,
    split_and,
    text_at_step,
)

R, S = 1.1, 1 / 1.1

ATTENTION_CASES = [
    ("normal text", [["normal text", 1.0]]),
    ("", [["", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", R], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", R]]),
    ("[unbalanced", [["unbalanced", S]]),
    ("unbalanced)", [["unbalanced)", 1.0]]),  # a closer with nothing open is text
    ("a]", [["a]", 1.0]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("\\\\(x)", [["\\", 1.0], ["x", R]]),
    ("a \\ b", [["a \\ b", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", R]]),
    ("((a))", [["a", R * R]]),
    ("[[a]]", [["a", S * S]]),
    ("([a])", [["a", R * S]]),
    ("(a:1.5)", [["a", 1.5]]),
    ("(a:-1)", [["a", -1.0]]),
    ("(a: 0.25 )", [["a", 0.25]]),
    ("((a:2))", [["a", 2 * R]]),
    ("(a (b:2) c)", [["a ", R], ["b", 2 * R], [" c", R]]),
    ("[a (b:2)]", [["a ", S], ["b", 2 * S]]),
    ("a:1.5)", [["a:1.5)", 1.0]]),  # no "(" open: the weight is literal text (merged with its neighbour)
    ("(a:b)", [["a:b", R]]),  # "b" is no number: the colon is text, and ")" closes with 1.1
    ("a, (b), c", [["a, ", 1.0], ["b", R], [", c", 1.0]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.3 * R * R], [" ", R], ["on", 1.0], [" a ", R], ["hill", 0.5 * R],
      [", sun, ", R], ["sky", R ** 4], [".", R]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("BREAK", [["", 1.0], ["BREAK", -1], ["", 1.0]]),
    ("a break b", [["a break b", 1.0]]),  # only the capital word
    ("aBREAK b", [["aBREAK b", 1.0]]),  # only a whole word
    ("(a BREAK b)", [["a", R], ["BREAK", -R], ["b", R]]),
    ("(a)(b:1.1)", [["ab", R]]),  # equal neighbours merge
]


@pytest.mark.parametrize("text,expected", ATTENTION_CASES)
def test_parse_prompt_attention(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


SCHEDULE_CASES = [  # (prompt, steps, expected)
    ("test", 10, [[10, "test"]]),
    ("a [b:3]", 10, [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", 10, [[3, "a "], [10, "a b"]]),
    ("a [b:3 ]", 10, [[3, "a "], [10, "a b"]]),
    ("a [b::3]", 10, [[3, "a b"], [10, "a "]]),
    ("a [[[b]]:2]", 10, [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", 10, [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", 10, [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", 10, [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", 10, [[10, "a [unbalanced"]]),
    ("a [b:.5] c", 10, [[5, "a  c"], [10, "a b c"]]),
    ("a [b:0.25] c", 20, [[5, "a  c"], [20, "a b c"]]),
    ("a [b:c:0.5]", 7, [[3, "a b"], [7, "a c"]]),  # int(3.5) = 3
    ("a [b:c:1.0]", 10, [[10, "a b"]]),  # a decimal 1.0 is the whole run: never switches
    ("a [b:c:1]", 10, [[1, "a b"], [10, "a c"]]),  # the integer 1 is step 1
    ("a [b:c:0]", 10, [[10, "a c"]]),
    ("a [b:c:15]", 10, [[10, "a b"]]),  # clamped to the steps
    ("a [b:c:-2]", 10, [[10, "a c"]]),
    ("((a][:b:c [d:3]", 10, [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", 4, [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"]]),
    ("[fe|]male", 4, [[1, "female"], [2, "male"], [3, "female"], [4, "male"]]),
    ("[fe|||]male", 6, [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"]]),
    ("[a|b|c]", 3, [[1, "a"], [2, "b"], [3, "c"]]),
    ("[[a|b]:c:2]", 4, [[1, "a"], [2, "b"], [3, "c"], [4, "c"]]),
    ("a|b", 10, [[10, "a|b"]]),  # a bare "|" does not parse: the prompt is used as written
    ("a \\", 10, [[10, "a \\"]]),
    ("a \\[b:3\\]", 10, [[10, "a \\[b:3\\]"]]),  # escaped brackets are text
    ("(a [b:2] c)", 10, [[2, "(a  c)"], [10, "(a b c)"]]),
    ("(a:[1.2:1.5:3])", 10, [[3, "(a:1.2)"], [10, "(a:1.5)"]]),  # editing a weight: numbers are plain text
]


@pytest.mark.parametrize("prompt,steps,expected", SCHEDULE_CASES)
def test_prompt_schedules(prompt, steps, expected):
    assert get_learned_conditioning_prompt_schedules([prompt], steps)[0] == expected


def test_hires_scheduling_counts_on_from_the_first_pass():
    g = lambda p: get_learned_conditioning_prompt_schedules([p], 10, 10)[0]
    assert g("a [b:.5] c") == [[10, "a b c"]]  # a fraction below 1 belongs to the first pass
    assert g("a [b:1.5] c") == [[5, "a  c"], [10, "a b c"]]  # half-way through the hires pass
    assert g("a [b:13] c") == [[3, "a  c"], [10, "a b c"]]  # integers count on from the 10 first-pass steps
    old = get_learned_conditioning_prompt_schedules(["a [b:.5] c"], 10, 10, use_old_scheduling=True)[0]
    assert old == [[5, "a  c"], [10, "a b c"]]
    assert get_learned_conditioning_prompt_schedules(["a [b:0.5:c]"], 10, use_old_scheduling=True)[0] \
        == [[10, "a [b:0.5:c]"]]


def test_several_prompts_keep_their_order():
    got = get_learned_conditioning_prompt_schedules(["a", "[b:c:1]", "a"], 2)
    assert got == [[[2, "a"]], [[1, "b"], [2, "c"]], [[2, "a"]]]


def test_text_at_step_uses_the_first_end_not_before_the_step():
    schedule = [[3, "a"], [10, "b"]]
    assert [text_at_step(schedule, s) for s in (0, 3, 4, 9)] == ["a", "a", "b", "b"]


@pytest.mark.parametrize("prompt,expected", [
    ("a", [("a", 1.0)]),
    ("a AND b", [("a ", 1.0), (" b", 1.0)]),
    ("a :0.5 AND b: 2", [("a", 0.5), (" b", 2.0)]),
    ("a AND b :-1.5", [("a ", 1.0), (" b", -1.5)]),
    ("a ANDb", [("a ANDb", 1.0)]),
    ("a and b", [("a and b", 1.0)]),
    ("(a:1.2) AND b", [("(a:1.2) ", 1.0), (" b", 1.0)]),  # an emphasis weight is no AND weight
])
def test_split_and(prompt, expected):
    assert split_and(prompt) == expected


def test_multicond_list_shares_repeated_parts():
    indexes, flat, _ = get_multicond_prompt_list(["a AND b:2", "b:2 AND c"])
    assert flat == ["a ", " b", "b", " c"] and indexes == [[(0, 1.0), (1, 2.0)], [(2, 2.0), (3, 1.0)]]


def test_extra_network_tags_are_stripped_and_listed():
    text, tags = parse_extra_networks("a <lora:x:0.5> b <lora:sub/y:0.2:0.8><hypernet:z:1>")
    assert text == "a  b "
    assert [(t.kind, t.args) for t in tags] == [("lora", ("x", "0.5")), ("lora", ("sub/y", "0.2", "0.8")),
                                                ("hypernet", ("z", "1"))]
    assert parse_extra_networks("no tags <here")[1] == []
