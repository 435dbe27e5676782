"""Pretrained word vectors in the Word2Vec / GloVe text format, a word tokenizer over their
vocabulary, and an offline source of real vectors.

Format: one word per line followed by its D floats, separated by spaces; Word2Vec files start
with a "COUNT DIM" header line, GloVe files do not (both are read). Lines whose number of floats
differs from the first vector's, or that do not parse, are skipped and counted; a repeated word
keeps its first vector.

Offline vectors: `python -m mmjax.interop.hf export-minilm OUT.txt` writes the whole-word rows
of the input embedding table of the all-MiniLM-L6-v2 model packaged on PyPI (the `interop`
extra), 384-d: pretrained vectors without a download. `vectors_path` says where a run keeps them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import os
import re

import numpy as np

from mmjax.data.builtin.common import resolve_data_dir

PAD, UNK = 0, 1
_WORD = re.compile(r"\w+", re.UNICODE)
_VOTE_LINES = 1000


@dataclasses.dataclass(frozen=True)
class WordVectors:
    words: tuple[str, ...]
    vectors: np.ndarray  # float32 [len(words), D]
    skipped_lines: int = 0
    duplicates: int = 0


def _parts(line: str) -> list[str]:
    # Split on " " only: some GloVe words hold other whitespace (e.g. a no-break space).
    return line.rstrip().split(" ")


def load_word_vectors(path: str, lowercase: bool = True, max_words: int | None = None):
    """Reads a Word2Vec/GloVe text file (see the module doc).

    The dimension is the header's or, without one, the most common value count among the first
    `_VOTE_LINES` lines, so that one malformed first line cannot decide it. Raises ValueError
    for a file without readable vectors, a header that disagrees with the lines, or a file
    where fewer lines are readable than skipped (not word vectors, or mixed dimensions)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no word-vector file at {path}")
    words, rows, seen = [], [], set()
    skipped = duplicates = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
        head = _parts(first)
        header_dim = None
        if len(head) == 2 and all(p.isdigit() for p in head):
            header_dim = int(head[1])  # Word2Vec header: count, dimension
        else:
            f = itertools.chain([first], f)
        voters = list(itertools.islice(f, _VOTE_LINES))
        counts = collections.Counter(len(_parts(v)) - 1 for v in voters if v.strip())
        counts.pop(0, None)  # a word alone on its line has no vector
        if not counts:
            raise ValueError(f"{path} has no readable word vectors")
        dim = counts.most_common(1)[0][0]
        if header_dim is not None and header_dim != dim:
            raise ValueError(
                f"{path}: its header says {header_dim} dimensions but its lines hold {dim} values"
            )
        for line in itertools.chain(voters, f):
            parts = _parts(line)
            if len(parts) < 2:
                skipped += bool(line.strip())
                continue
            word, values = parts[0], parts[1:]
            try:
                vector = np.asarray(values, dtype=np.float32)
            except ValueError:
                skipped += 1
                continue
            if len(vector) != dim or not np.all(np.isfinite(vector)):
                skipped += 1
                continue
            word = word.lower() if lowercase else word
            if word in seen:
                duplicates += 1
                continue
            seen.add(word)
            words.append(word)
            rows.append(vector)
            if max_words and len(words) >= max_words:
                break
    if not words or skipped > len(words) + duplicates:
        raise ValueError(
            f"{path}: {skipped} lines skipped (not {dim} finite floats after the word), "
            f"{len(words)} read; is it a Word2Vec/GloVe text file of one dimension?"
        )
    return WordVectors(tuple(words), np.stack(rows), skipped, duplicates)


class WordTokenizer:
    """Lower-cased `\\w+` words -> ids: 0 padding, 1 unknown, 2 + i the i-th vector's word.
    A `mmjax.data.tokenizers.Tokenizer` without markers (no BOS/EOT/mask: the CNN needs none)."""

    pad_id, unk_id = PAD, UNK
    bos_id = eot_id = mask_id = None

    def __init__(self, words, max_len: int):
        self.words = tuple(words)
        self.max_len = max_len
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}

    @property
    def vocab_size(self) -> int:
        return len(self.words) + 2

    def split(self, text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def encode(self, texts) -> np.ndarray:
        ids = np.full((len(texts), self.max_len), PAD, np.int32)
        for row, text in enumerate(texts):
            tokens = [self._ids.get(w, UNK) for w in self.split(text)][: self.max_len]
            ids[row, : len(tokens)] = tokens
        return ids

    def decode(self, ids) -> str:
        """The words of one row of ids ("[UNK]" for unknown ones), padding dropped."""
        ids = [i for i in np.asarray(ids).tolist() if i != PAD]
        return " ".join("[UNK]" if i == UNK else self.words[i - 2] for i in ids)


def embedding_table(vectors: WordVectors, seed: int, random: bool = False) -> np.ndarray:
    """float32 [2 + n, D] initial embeddings: row 0 (pad) zero, row 1 (unknown) small random;
    with `random=True` every word row is random too (the no-pretraining baseline), at the
    pretrained rows' scale."""
    rng = np.random.default_rng(seed)
    n, d = vectors.vectors.shape
    scale = float(np.std(vectors.vectors))
    words = rng.normal(0.0, scale, (n, d)) if random else vectors.vectors
    unk = rng.normal(0.0, scale, (1, d))
    return np.concatenate([np.zeros((1, d)), unk, words]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def cached_vectors(path: str) -> WordVectors:
    """`load_word_vectors(path)`, read once for the several parts of a run that need it (one
    file kept: a GloVe file of 400k words is 0.5 GB)."""
    return load_word_vectors(path)


def vectors_path(configured: str, data_dir: str, dataset: str, words) -> str:
    """The word-vector file of a run: `configured` (a path), or, when "", the file under
    `<data_dir>/word_vectors/` that holds the packaged MiniLM's vectors of `dataset`'s `words`
    (which may not exist yet: `mmjax.interop.hf.export_minilm` writes it)."""
    if configured:
        return os.path.abspath(configured)
    # The name carries the words: a changed word list exports afresh, never reusing a cached
    # file that lacks the new words.
    digest = hashlib.sha1(" ".join(sorted(words)).encode()).hexdigest()[:10]
    name = f"minilm_{dataset}_{digest}.txt"
    return os.path.join(resolve_data_dir(data_dir), "word_vectors", name)
