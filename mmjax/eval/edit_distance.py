"""Character and word error rates: Levenshtein distance between a hypothesis and its
reference, summed over a corpus and divided by the reference length."""

from __future__ import annotations

from collections.abc import Sequence


def edit_distance(hypothesis: Sequence, reference: Sequence) -> int:
    """The fewest insertions, deletions and substitutions that turn `hypothesis` into
    `reference` (any sequences of comparable items: characters, words)."""
    previous = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, 1):
        current = [i]
        for j, r in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r)))
        previous = current
    return previous[-1]


def _rate(pairs) -> float:
    errors = total = 0
    for hyp, ref in pairs:
        errors += edit_distance(hyp, ref)
        total += len(ref)
    return errors / max(total, 1)


def cer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus character error rate: Σ edit distance / Σ reference characters (spaces count;
    with Chinese, each character is one unit). Can exceed 1 for long hypotheses."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return _rate(zip(hypotheses, references, strict=True))


def wer(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate over whitespace-separated words."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return _rate((h.split(), r.split()) for h, r in zip(hypotheses, references, strict=True))
