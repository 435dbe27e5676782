"""Corpus BLEU (Papineni et al. 2002) on whitespace tokens, with several references per
hypothesis: clipped n-gram precisions for n = 1..4 summed over the corpus, their geometric
mean, and the brevity penalty exp(1 - r / c) when the hypotheses' total length c is below r,
the sum over hypotheses of the reference length closest to each (ties: the shorter). No
smoothing: a corpus without any matching 4-gram scores 0."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_bleu(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    matched, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references, strict=True):
        words = hyp.split()
        ref_words = [r.split() for r in refs]
        if not ref_words:
            raise ValueError("every hypothesis needs at least one reference")
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            # Clip each n-gram's count by the most times any single reference has it.
            most = Counter()
            for r in ref_words:
                most |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            total[n - 1] += max(len(words) - n + 1, 0)
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / max_n
    brevity = 1.0 if hyp_len >= ref_len else math.exp(1.0 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)
