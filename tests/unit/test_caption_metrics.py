"""Caption and VQA metrics against values worked out by hand (the arithmetic is in each comment)."""
import math

import pytest

from modules.captioning import metrics


def test_bleu_on_one_sentence():
    # pred "the cat sat on the mat" vs "the cat is on the mat": 1-grams 5/6, 2-grams 3/5 (the cat, on the,
    # the mat), 3-grams 1/4 (on the mat), 4-grams 0/3; equal lengths so no brevity penalty.
    b = metrics.bleu(["the cat sat on the mat"], [["the cat is on the mat"]])
    assert b[0] == pytest.approx(5 / 6)
    assert b[1] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    assert b[2] == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    assert b[3] < 0.01  # no 4-gram matches: ~0 (smoothed, as pycocoevalcap)


def test_bleu_brevity_penalty_and_clipping():
    # "the the the" vs "the cat sat": 1-gram clipped to 1/3; same length -> no penalty.
    assert metrics.bleu(["the the the"], [["the cat sat"]])[0] == pytest.approx(1 / 3)
    # "a cat" vs "a cat on a mat": 1-grams 2/2, brevity penalty exp(1 - 5/2).
    assert metrics.bleu(["a cat"], [["a cat on a mat"]])[0] == pytest.approx(math.exp(1 - 5 / 2))
    # the closest reference length is used: refs of length 2 and 5 -> 2, so no penalty
    assert metrics.bleu(["a cat"], [["a cat on a mat", "a cat"]])[0] == pytest.approx(1.0)


def test_rouge_l():
    # LCS "the cat on the mat" = 5: P = R = 5/6, so F = 5/6.
    assert metrics.rouge_l(["the cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(5 / 6)
    # "a cat" vs "a cat on a mat": P 1, R 2/5; F = (1 + 1.2^2) P R / (R + 1.2^2 P) = 0.976 / 1.84
    assert metrics.rouge_l(["a cat"], [["a cat on a mat"]]) == pytest.approx(0.976 / 1.84)
    # the best reference counts; punctuation and case do not
    assert metrics.rouge_l(["A cat."], [["a dog", "a cat"]]) == pytest.approx(1.0)


def test_cider():
    # Two items, each with one reference: idf(a) = log 2 - log 2 = 0, idf(cat) = idf(dog) = log 2. An exact
    # match has cosine 1 for 1- and 2-grams, 0 for the (absent) 3- and 4-grams: (1 + 1 + 0 + 0) / 4 * 10 = 5.
    assert metrics.cider(["a cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(5.0)
    # A wrong noun shares only "a", whose idf is 0: item score 0, mean (0 + 5) / 2.
    assert metrics.cider(["a dog", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx(2.5)
    # Length penalty exp(-d^2 / 72): "a cat cat" vs "a cat" (d = 1). 1-grams: pred {a: 0, cat: 2L}, ref
    # {cat: L}: cosine min(2L, L) * L / (2L * L) = 1/2; 2-grams pred {a cat: L, cat cat: L} (df of
    # "cat cat" is 0 -> idf log 2), ref {a cat: L}: L^2 / (sqrt(2) L * L) = 1/sqrt(2).
    expected = (0.5 + 1 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72)
    assert metrics.cider(["a cat cat", "a dog"], [["a cat"], ["a dog"]]) == pytest.approx((expected + 5) / 2)


def test_caption_scores_keys():
    scores = metrics.caption_scores(["a cat"], [["a cat"]])
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert scores["BLEU-1"] == pytest.approx(1.0) and scores["ROUGE-L"] == pytest.approx(1.0)


def test_vqa_accuracy_standard_formula():
    humans = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    # "2" (three humans after normalising "two"): leaving out one of the three "2" leaves 2 matches -> 2/3
    # (3 subsets), leaving out a "3" leaves 3 matches -> 1 (7 subsets): (3 * 2/3 + 7) / 10 = 0.9.
    assert metrics.vqa_accuracy(["2"], [humans]) == pytest.approx(0.9)
    assert metrics.vqa_accuracy(["three"], [humans]) == pytest.approx(1.0)
    assert metrics.vqa_accuracy(["four"], [humans]) == 0.0
    assert metrics.vqa_accuracy(["2", "3", "four"], [humans] * 3) == pytest.approx((0.9 + 1 + 0) / 3)
    # one matching human: each subset that keeps it scores 1/3 (9 of 10): 0.3
    assert metrics.vqa_accuracy(["The Dog."], [["dog"] + ["cat"] * 9]) == pytest.approx(0.3)


def test_normalize_answer():
    assert metrics.normalize_answer("The Dog.") == "dog"
    assert metrics.normalize_answer("Two") == "2"
    assert metrics.normalize_answer("1,000") == "1000"
    assert metrics.normalize_answer("3.5") == "3.5"
