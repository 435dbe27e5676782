"""A built-in sentiment dataset that needs word meaning: short reviews whose label is carried
by one adjective, with the adjectives split between train and validation. A classifier that
only learns the training words cannot score the validation ones; pretrained word vectors
place the unseen adjectives near the seen ones of the same polarity.

Every sentence is a function of (seed, split, index). Labels: 0 negative, 1 positive.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("negative", "positive")
# (train adjectives, validation adjectives) per class; all are whole words of MiniLM's vocab
# (a test checks: "mediocre" and "lousy" are not, they split into word pieces).
ADJECTIVES = {
    1: (
        ("good", "great", "excellent", "wonderful", "amazing"),
        ("fantastic", "superb", "brilliant", "lovely", "delightful", "pleasant", "perfect"),
    ),
    0: (
        ("bad", "terrible", "awful", "horrible", "poor"),
        ("dreadful", "boring", "disappointing", "pathetic", "miserable", "unpleasant", "dull"),
    ),
}
_THINGS = ("movie", "book", "meal", "hotel", "concert", "game", "show", "service", "trip", "album")
_TEMPLATES = (
    "the {thing} was {adj}",
    "what a {adj} {thing}",
    "i found the {thing} {adj}",
    "honestly a {adj} {thing} overall",
    "we thought the {thing} was {adj} from start to end",
    "{adj}",
    "my friends said the {thing} is {adj}",
)
SPLITS = ("train", "validation")


def example(split: str, index: int, seed: int) -> tuple[str, int]:
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    label = int(rng.integers(2))
    words = ADJECTIVES[label][SPLITS.index(split)]
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    adj = words[rng.integers(len(words))]
    return template.format(thing=_THINGS[rng.integers(len(_THINGS))], adj=adj), label


def load(split: str, num: int, seed: int) -> tuple[list[str], np.ndarray]:
    texts, labels = zip(*(example(split, i, seed) for i in range(num)), strict=True)
    return list(texts), np.array(labels, np.int32)


def vocabulary() -> set[str]:
    """Every word the dataset can produce (to export only the vectors it needs)."""
    words = {w for t in _TEMPLATES for w in t.replace("{thing}", "").replace("{adj}", "").split()}
    words |= set(_THINGS)
    for train, val in ADJECTIVES.values():
        words |= set(train) | set(val)
    return words
