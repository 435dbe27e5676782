"""CLIP's byte-level BPE tokenizer, id-for-id equal to `open_clip.tokenize`.

Pretrained CLIP text towers only make sense with the exact ids they were trained on, so this
is a re-implementation of open_clip's default `SimpleTokenizer` (clean="lower") in plain
numpy, without torch. The merges are not shipped with mmjax: they are read at runtime from
the `bpe_simple_vocab_16e6.txt.gz` that the user's open_clip install carries, or from a path.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import itertools
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mmjax.extras import import_optional

MERGES_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
# The merges file has a header line and then more merges than CLIP uses; CLIP keeps the
# first 49152 - 256 - 2 of them so that 256 bytes + 256 word-final bytes + merges + the 2
# special tokens make a 49408-entry vocabulary.
_NUM_MERGES = 49152 - 256 - 2
_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
_CACHE_LIMIT = 1 << 20  # words; bounds memory over a long training run


def default_merges_path() -> Path:
    """The merges file inside the installed open_clip package.

    `find_spec` locates the package without executing its `__init__` (which imports torch).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / MERGES_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CLIP BPE merges ({MERGES_FILENAME}) not found: pass merges_path=... or install "
        'open_clip with `pip install -e ".[interop]"`'
    )


def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    BPE runs on strings, and the merges were learnt on this spelling of bytes: printable
    Latin-1 bytes stand for themselves, the other 68 (controls, space, ...) are moved to
    code points 256 and up, in byte order, so no token contains whitespace or a control char.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(printable)
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in kept:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _import_regex():
    return import_optional("regex", "ClipBpeTokenizer (for \\p{L} classes)")


def _fix_text_fn():
    """ftfy.fix_text when installed (open_clip always applies it), else identity + warning."""
    try:
        import ftfy
    except ImportError:
        warnings.warn(
            "ftfy is not installed: ClipBpeTokenizer skips ftfy.fix_text, so ids can differ "
            'from open_clip on mojibake or curly quotes (pip install -e ".[interop]")',
            stacklevel=3,
        )
        return lambda text: text
    return ftfy.fix_text


class ClipBpeTokenizer:
    """OpenAI CLIP's tokenizer: `encode` writes [SOT, bpe ids..., EOT, 0...].

    Over-long text is cut to `max_len` and its last kept id overwritten by EOT, as open_clip
    does, so the EOT the text tower pools at is always present. Pad is id 0, which is also the
    token "!": padding is told apart by position (after the EOT), never by value.
    """

    pad_id = 0
    bos_id = 49406  # <start_of_text>
    eot_id = 49407  # <end_of_text>
    mask_id = None

    def __init__(self, merges_path: str | Path | None = None, max_len: int = 77):
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 (SOT and EOT), got {max_len}")
        self.max_len = max_len
        path = Path(merges_path) if merges_path is not None else default_merges_path()
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]

        self._byte_encoder = byte_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
        vocab += [_SOT, _EOT]
        self._encoder = {token: i for i, token in enumerate(vocab)}
        self._decoder = vocab
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        if len(vocab) != 49408 or self._encoder[_EOT] != self.eot_id:
            raise ValueError(f"{path} does not look like CLIP's merges ({len(vocab)} tokens)")

        regex = _import_regex()
        # The special tokens come first in the alternation, as in open_clip: a caption that
        # literally contains "<end_of_text>" gets the special id, not the spelled-out text.
        self._pattern = regex.compile(
            rf"{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )
        self._fix_text = _fix_text_fn()
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self._decoder)  # 49408

    def _clean(self, text: str) -> str:
        """open_clip's clean="lower": ftfy, html unescape (twice), whitespace runs to one space,
        lower case."""
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _bpe(self, word: str) -> list[int]:
        """Ids of one pre-token (already in byte-unicode spelling), merges applied lowest rank
        first; all non-overlapping occurrences of the chosen pair merge left to right."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        if word in (_SOT, _EOT):
            return [self._encoder[word]]
        parts = [*word[:-1], word[-1] + "</w>"]
        ranks = self._ranks
        while len(parts) > 1:
            best, best_rank = None, len(ranks)
            for pair in itertools.pairwise(parts):
                rank = ranks.get(pair, best_rank)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(parts)
            while i < n:
                if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self._encoder[p] for p in parts]
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode_ids(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT and without truncation."""
        enc = self._byte_encoder
        ids: list[int] = []
        for piece in self._pattern.findall(self._clean(text)):
            ids.extend(self._bpe("".join(enc[b] for b in piece.encode("utf-8"))))
        return ids

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), max_len]; equal to `open_clip.tokenize(texts, max_len)`."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings; wrap a single text in a list")
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode_ids(text), self.eot_id]
            if len(ids) > self.max_len:
                ids = ids[: self.max_len]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids: after a leading SOT, up to the first EOT (for display)."""
        tokens = np.asarray(ids).tolist()
        if tokens and tokens[0] == self.bos_id:
            tokens = tokens[1:]
        if self.eot_id in tokens:
            tokens = tokens[: tokens.index(self.eot_id)]
        data = bytearray()
        for token in tokens:
            if 0 <= token < self.bos_id:
                piece = self._decoder[token]
                word_end = piece.endswith("</w>")
                chars = piece[:-4] if word_end else piece
                data.extend(self._byte_decoder[c] for c in chars)
                if word_end:
                    data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()
