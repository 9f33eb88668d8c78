"""Caption and VQA metrics in pure Python: BLEU-1..4, ROUGE-L, CIDEr(-D) as the COCO caption evaluation
computes them, and the standard VQA accuracy (min(#humans that agree / 3, 1), averaged over the 10
leave-one-out subsets of the answers). METEOR and SPICE need Java and are not offered.
"""
from __future__ import annotations

import math
import re
from collections import Counter

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower case, punctuation removed, split on white space (the COCO PTB tokenizer, simplified)."""
    return _PUNCT.sub(" ", text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(predictions: list[str], references: list[list[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n (clipped n-gram precision, geometric mean, brevity penalty against the
    reference closest in length), as pycocoevalcap's Bleu scorer with its "closest" option."""
    matches = [0] * max_n
    totals = [0] * max_n
    pred_len = ref_len = 0
    for pred, refs in zip(predictions, references):
        p = tokenize(pred)
        rs = [tokenize(r) for r in refs]
        pred_len += len(p)
        ref_len += min((abs(len(r) - len(p)), len(r)) for r in rs)[1] if rs else 0
        for n in range(1, max_n + 1):
            counts = _ngrams(p, n)
            max_ref: Counter = Counter()
            for r in rs:
                max_ref |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in counts.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if pred_len == 0:
        return [0.0] * max_n
    bp = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    scores, log_sum = [], 0.0
    tiny = 1e-9  # pycocoevalcap's smoothing: an n-gram order without matches gives ~0, not a math error
    for n in range(max_n):
        precision = (matches[n] + tiny) / (totals[n] + tiny) if totals[n] else tiny
        log_sum += math.log(max(precision, tiny))
        scores.append(bp * math.exp(log_sum / (n + 1)))
    return scores


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(predictions: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """Mean over items of ROUGE-L F (precision and recall: the best LCS ratio over the references,
    F = (1 + beta^2) P R / (R + beta^2 P), beta 1.2 as in the COCO evaluation)."""
    total = 0.0
    for pred, refs in zip(predictions, references):
        p = tokenize(pred)
        precs, recs = [], []
        for r in (tokenize(x) for x in refs):
            lcs = _lcs(p, r)
            precs.append(lcs / len(p) if p else 0.0)
            recs.append(lcs / len(r) if r else 0.0)
        pm, rm = max(precs, default=0.0), max(recs, default=0.0)
        total += ((1 + beta**2) * pm * rm / (rm + beta**2 * pm)) if pm and rm else 0.0
    return total / len(predictions) if predictions else 0.0


def cider(predictions: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (what COCO reports as CIDEr): tf-idf n-gram vectors (idf over this set's references),
    cosine with clipped counts and a Gaussian length penalty, averaged over n = 1..4 and references, x10."""
    refs_tok = [[tokenize(r) for r in refs] for refs in references]
    preds_tok = [tokenize(p) for p in predictions]
    count = len(predictions)
    if not count:
        return 0.0
    df: Counter = Counter()
    for refs in refs_tok:
        seen = set()
        for r in refs:
            for k in range(1, n + 1):
                seen |= set(_ngrams(r, k))
        df.update(seen)
    log_count = math.log(float(count))

    def vec(tokens):
        out = []
        for k in range(1, n + 1):
            grams = _ngrams(tokens, k)
            v = {g: tf * (log_count - math.log(max(1.0, df[g]))) for g, tf in grams.items()}
            norm = math.sqrt(sum(x * x for x in v.values()))
            out.append((v, norm))
        return out, len(tokens)

    total = 0.0
    for pred, refs in zip(preds_tok, refs_tok):
        vp, lp = vec(pred)
        score = [0.0] * n
        for r in refs:
            vr, lr = vec(r)
            delta = lp - lr
            for k in range(n):
                (a, na), (b, nb) = vp[k], vr[k]
                dot = sum(min(x, b[g]) * b[g] for g, x in a.items() if g in b)
                if na and nb:
                    score[k] += dot / (na * nb) * math.exp(-(delta**2) / (2 * sigma**2))
        total += (sum(score) / n) / max(1, len(refs)) * 10.0
    return total / count


def caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    b = bleu(predictions, references)
    return {"BLEU-1": b[0], "BLEU-2": b[1], "BLEU-3": b[2], "BLEU-4": b[3],
            "ROUGE-L": rouge_l(predictions, references), "CIDEr": cider(predictions, references)}


_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer normalisation (lower case, punctuation, number words, articles)."""
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?!<=\d)\.(?!\d)", "", text)  # full stops, but not decimal points
    text = re.sub(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:']", " ", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean over questions of the VQA accuracy: for each of the human answers left out in turn,
    min(1, matches among the others / 3); averaged over those subsets."""
    if not predictions:
        return 0.0
    total = 0.0
    for pred, humans in zip(predictions, answers):
        p = normalize_answer(pred)
        gt = [normalize_answer(a) for a in humans]
        if not gt:
            continue
        accs = []
        for i in range(len(gt)):
            others = gt[:i] + gt[i + 1:]
            accs.append(min(1.0, sum(a == p for a in others) / 3.0))
        total += sum(accs) / len(accs)
    return total / len(predictions)
