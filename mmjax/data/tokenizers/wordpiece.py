"""BERT WordPiece tokenizer, id-for-id equal to HF's (Rust `tokenizers`) BERT pipeline.

For text towers initialised from BERT-family checkpoints (MiniLM, BERT, ...), which expect
exactly the ids their HF tokenizer produces. Only the `vocab.txt` is needed at runtime, and
no HF package. Where the Rust pipeline and Google's original Python BERT code disagree, this
follows the Rust one (what `AutoTokenizer` loads): per-character lowercasing (no Greek final
sigma), accents stripped before lowercasing, Unicode White_Space as whitespace.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_CHARS_PER_WORD = 100  # longer words become [UNK] without trying to split them

# Unicode White_Space (what Rust's `char::is_whitespace` tests); \t \n \r included.
_WHITESPACE = frozenset(
    chr(c)
    for c in (
        *range(0x09, 0x0E),
        0x20,
        0x85,
        0xA0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    )
)
# Dropped by text cleaning. Not Cn: HF keeps unassigned code points (they end up as [UNK]).
_REMOVED_CATEGORIES = frozenset(("Cc", "Cf", "Co", "Cs"))
# CJK Unified Ideographs blocks that BERT splits into one token per character (no spaces in
# Chinese text); Japanese kana and Korean hangul are not in them and stay whole words.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),  # HF's bound; Google's original BERT code has 0x2B820
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


# HF's Rust normaliser classifies characters with Unicode 8.0 tables, Python with its own newer
# ones. Found by probing every code point against `tokenizers` 0.23: characters assigned after
# 8.0 are plain letters to HF (kept, not split, not stripped), whatever their category now; the
# gaps inside these ranges hold no punctuation/mark/format character in Unicode 14, so widening
# over them only also covers characters that later versions add there.
_NEWER_THAN_UNICODE_8 = (
    (0x61D, 0x61D), (0x7FD, 0x7FD), (0x890, 0x8E2), (0x9FD, 0x9FE), (0xA76, 0xA76),
    (0xAFA, 0xAFF), (0xB55, 0xB55), (0xC04, 0xC3C), (0xC77, 0xC77), (0xC84, 0xC84),
    (0xD00, 0xD00), (0xD3B, 0xD3C), (0xD81, 0xD81), (0xEBA, 0xEBA), (0x180F, 0x1886),
    (0x1ABF, 0x1ACE), (0x1B7D, 0x1B7E), (0x1DF6, 0x1DFB), (0x2E43, 0x2E5D), (0xA82C, 0xA82C),
    (0xA8C5, 0xA8C5), (0xA8FF, 0xA8FF), (0xA9BD, 0xA9BD), (0x10D24, 0x10F89),
    (0x11070, 0x11074), (0x110C2, 0x110CD), (0x111CF, 0x111CF), (0x1123E, 0x1123E),
    (0x1133B, 0x1133B), (0x11438, 0x1145E), (0x11660, 0x1166C), (0x116B9, 0x116B9),
    (0x1182F, 0x11FFF), (0x12FF1, 0x13438), (0x16E97, 0x16F4F), (0x16FE2, 0x16FE4),
    (0x1CF00, 0x1CF46), (0x1E000, 0x1E2EF), (0x1E944, 0x1E95F),
)  # fmt: skip
_CATEGORY_OVERRIDES = {cp: "Cn" for lo, hi in _NEWER_THAN_UNICODE_8 for cp in range(lo, hi + 1)}
# Characters whose category changed since 8.0.
_CATEGORY_OVERRIDES.update({0x166D: "Po", 0x1734: "Mn", 0x111C9: "Po"})


def _category(ch: str) -> str:
    """General category as HF's Unicode 8.0 tables have it (see `_CATEGORY_OVERRIDES`)."""
    return _CATEGORY_OVERRIDES.get(ord(ch)) or unicodedata.category(ch)


# The per-character steps are context free, so they are memoised per character (bounded by
# the number of distinct characters seen): the Unicode lookups then run once per character.
@functools.cache
def _is_punctuation(ch: str) -> bool:
    # ASCII symbols such as $ + < = > ^ ` | ~ count as punctuation too (BERT's rule).
    return (ch.isascii() and not ch.isalnum() and 33 <= ord(ch) <= 126) or (
        _category(ch).startswith("P")
    )


@functools.cache
def _clean_char(ch: str) -> str:
    if ch in "\t\n\r":
        return " "
    if ch == "\ufffd" or _category(ch) in _REMOVED_CATEGORIES:
        return ""  # \0, other controls (\v, \f, U+0085 too), ZWJ, BOM, private use
    if ch in _WHITESPACE:
        return " "
    return f" {ch} " if _is_cjk(ord(ch)) else ch


@functools.cache
def _strip_lower_char(ch: str) -> str:
    return "" if _category(ch) == "Mn" else ch.lower()


# Pure-ASCII text (most captions) needs no per-character Unicode lookups: cleaning is one
# `translate` (\t \n \r to spaces, other controls dropped), NFD and accent stripping change
# nothing, and every printable non-alphanumeric ASCII character is punctuation.
_ASCII_CLEAN = str.maketrans(
    {**{chr(c): None for c in (*range(0x20), 0x7F)}, **dict.fromkeys("\t\n\r", " ")}
)
_ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[!-/:-@\[-`{-~]")


def load_vocab(vocab_path: str | Path) -> dict[str, int]:
    """token -> id, the id being the 0-based line number of `vocab.txt`."""
    with open(vocab_path, encoding="utf-8") as f:
        tokens = f.read().split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    return {token.rstrip("\r"): i for i, token in enumerate(tokens)}


class WordPieceTokenizer:
    """`encode` writes [CLS] pieces... [SEP] [PAD]... (the attention mask is `ids != pad_id`).

    Over-long text keeps its first `max_len - 2` pieces, then [SEP], like HF's truncation.
    The special token strings ("[MASK]", "[SEP]", ...; case-sensitive) written in a caption
    are matched before normalisation and map to their ids, as HF's added tokens do.
    """

    def __init__(self, vocab_path: str | Path, max_len: int = 64, lowercase: bool = True):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        self.max_len = max_len
        self.lowercase = lowercase
        self._vocab = load_vocab(vocab_path)
        missing = [t for t in SPECIAL_TOKENS if t != "[MASK]" and t not in self._vocab]
        if missing:
            raise ValueError(f"{vocab_path} lacks the special tokens {missing}")
        self._id_to_token = {i: t for t, i in self._vocab.items()}
        self._specials = [t for t in SPECIAL_TOKENS if t in self._vocab]
        self.pad_id = self._vocab["[PAD]"]
        self.unk_id = self._vocab["[UNK]"]
        self.cls_id = self._vocab["[CLS]"]
        self.sep_id = self._vocab["[SEP]"]
        self.bos_id = self.cls_id
        self.eot_id = self.sep_id  # the text tower pools at (or after) the end marker
        self.mask_id = self._vocab.get("[MASK]")
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return max(self._vocab.values()) + 1

    def _normalize(self, text: str) -> str:
        """Drop NUL/U+FFFD/control chars, whitespace to ' ', pad CJK ideographs with spaces,
        then (when lowercasing) NFD + drop combining marks, lower case char by char."""
        text = "".join(map(_clean_char, text))
        if self.lowercase:
            # NFD on the whole text: canonical reordering of marks can span characters.
            text = "".join(map(_strip_lower_char, unicodedata.normalize("NFD", text)))
        return text

    def _words(self, text: str) -> list[str]:
        """Whitespace split, then every punctuation char becomes a word of its own."""
        words = []
        for chunk in text.split(" "):
            start = 0
            for i, ch in enumerate(chunk):
                if _is_punctuation(ch):
                    if i > start:
                        words.append(chunk[start:i])
                    words.append(ch)
                    start = i + 1
            if start < len(chunk):
                words.append(chunk[start:])
        return words

    def _word_ids(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces, "##" marking continuations; [UNK] for the whole
        word if some position matches nothing."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        if len(word) > MAX_CHARS_PER_WORD:
            return [self.unk_id]
        ids, start, vocab = [], 0, self._vocab
        while start < len(word):
            end, found = len(word), None
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                found = vocab.get(piece)
                if found is not None:
                    break
                end -= 1
            if found is None:
                ids = [self.unk_id]
                break
            ids.append(found)
            start = end
        if len(self._cache) >= 1 << 20:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _segments(self, text: str) -> list[tuple[str, bool]]:
        """(piece, is_special) from splitting raw text at special token strings."""
        segments = [(text, False)]
        for special in self._specials:
            split = []
            for piece, is_special in segments:
                if is_special or special not in piece:
                    split.append((piece, is_special))
                    continue
                parts = piece.split(special)
                for k, part in enumerate(parts):
                    if k:
                        split.append((special, True))
                    split.append((part, False))
            segments = split
        return segments

    def encode_ids(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS]/[SEP] and without truncation."""
        ids: list[int] = []
        for piece, is_special in self._segments(text):
            if is_special:
                ids.append(self._vocab[piece])
            elif piece.isascii():  # fast path, same result as the general one
                text = piece.translate(_ASCII_CLEAN)
                for word in _ASCII_WORDS.findall(text.lower() if self.lowercase else text):
                    ids.extend(self._word_ids(word))
            elif piece:
                for word in self._words(self._normalize(piece)):
                    ids.extend(self._word_ids(word))
        return ids

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """input_ids int32 [N, max_len]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings; wrap a single text in a list")
        ids = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            body = self.encode_ids(text)[: self.max_len - 2]
            ids[row, : len(body) + 2] = [self.cls_id, *body, self.sep_id]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids, special tokens dropped, "##" pieces glued on (for display;
        lower-cased and accent-stripped, so not the original text)."""
        words: list[str] = []
        for token in np.asarray(ids).tolist():
            if token == self.sep_id:
                break
            piece = self._id_to_token.get(token, "[UNK]")
            if token in (self.cls_id, self.pad_id):
                continue
            if piece.startswith("##") and words:
                words[-1] += piece[2:]
            else:
                words.append(piece)
        return " ".join(words)
