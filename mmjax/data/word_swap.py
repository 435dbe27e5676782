"""Hard negative captions made by swapping one attribute word for another of its kind.

"a large red triangle" -> "a large blue triangle": the same sentence with one fact false, which
is the hardest negative a caption has (NegCLIP, Yuksekgonul et al. 2023, built such negatives by
swapping words). In-batch negatives rarely differ from the positive in one attribute only, so a
matching model trained on them alone can pass on the easy cues (colour) and never check the hard
ones (shape); these negatives make every attribute count.

A vocabulary is a tuple of *groups*: words or phrases of one kind (colours, shapes, positions),
any of which can replace any other of its group. The swap picks one matched phrase of the caption
uniformly, and one other member of its group uniformly. English phrases match whole words
(case-insensitive; a capital first letter is kept, and "a"/"an" before the swapped phrase is
fixed); phrases in scripts without spaces (Chinese) match as substrings. Where phrases overlap
the longest wins ("中等大小" before "大"). A caption with no phrase of the vocabulary has no swap.

The swap is not checked against the image: on data with several objects it can produce a caption
that is still true ("a red car next to a blue car" -> "a blue car next to a blue car"). On the
built-in single-object data every swap is false.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from mmjax.data.builtin import shapes
from mmjax.data.colour_permutation import COLOUR_NAMES
from mmjax.errors import ConfigError

VOCABULARIES = {
    # The built-in shapes captions' attributes, English and Chinese (mmjax/data/builtin/shapes.py).
    "shapes": (
        shapes.COLORS,
        shapes.SHAPES,
        shapes.SIZES,
        shapes.POSITION_PHRASES,
        shapes.COLORS_ZH,
        shapes.SHAPES_ZH,
        shapes.SIZES_ZH,
        shapes.POSITIONS_ZH,
    ),
    # Common English attribute words, for captions of photographs.
    "english": (
        COLOUR_NAMES,
        ("one", "two", "three", "four", "five", "six"),
        ("small", "large", "big", "tiny", "huge"),
        ("left", "right"),
        ("above", "below"),
        ("top", "bottom"),
        ("in front of", "behind"),
    ),
}


def vocabulary(name: str) -> tuple[tuple[str, ...], ...]:
    """The word groups named `name`; a ConfigError listing the names otherwise."""
    if name not in VOCABULARIES:
        raise ConfigError(
            f"swap vocabulary {name!r} is unknown; choose one of {sorted(VOCABULARIES)}"
        )
    return VOCABULARIES[name]


def _pattern(phrase: str) -> str:
    escaped = re.escape(phrase)
    return rf"\b{escaped}\b" if phrase.isascii() else escaped


class WordSwap:
    """`WordSwap(groups)(caption, rng)`: the caption with one phrase of the vocabulary replaced
    by another of its group, or None if it has none. Always draws two numbers from `rng`, so
    the stream of later draws does not depend on the caption."""

    def __init__(self, groups: Sequence[Sequence[str]]):
        self._groups = tuple(tuple(g) for g in groups)
        self._group_of: dict[str, int] = {}
        for k, group in enumerate(self._groups):
            if len(group) < 2:
                raise ValueError(f"group {group!r} needs two members to swap between")
            for phrase in group:
                self._group_of.setdefault(phrase.lower(), k)
        phrases = sorted(self._group_of, key=len, reverse=True)  # the longest match wins
        self._regex = re.compile("|".join(map(_pattern, phrases)), re.IGNORECASE)

    def __call__(self, caption: str, rng: np.random.Generator) -> str | None:
        which, replacement = rng.random(), rng.random()
        matches = list(self._regex.finditer(caption))
        if not matches:
            return None
        match = matches[int(which * len(matches))]
        old = match.group(0)
        group = self._groups[self._group_of[old.lower()]]
        others = [p for p in group if p.lower() != old.lower()]
        new = others[int(replacement * len(others))]
        if old[:1].isupper():
            new = new[:1].upper() + new[1:]
        return _fix_article(caption[: match.start()], new) + new + caption[match.end() :]


_ARTICLE = re.compile(r"\b(a|an) $", re.IGNORECASE)


def _fix_article(before: str, word: str) -> str:
    """`before` with a trailing "a "/"an " made right for `word`."""
    found = _ARTICLE.search(before)
    if found is None:
        return before
    article = "an" if word[:1].lower() in "aeiou" else "a"
    if found.group(1)[0].isupper():
        article = article.capitalize()
    return before[: found.start()] + article + " "
