"""Tokenizers: the `Tokenizer` protocol every one follows, and `ByteTokenizer`: UTF-8 bytes as
tokens, so any language works with no vocab file.

`build_tokenizer` also builds the vocabulary-file tokenizers that pretrained text towers need
(CLIP BPE, BERT WordPiece, SentencePiece); their modules are imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

TOKENIZERS = ("bytes", "clip_bpe", "wordpiece", "sentencepiece")


@runtime_checkable
class Tokenizer(Protocol):
    """Texts -> fixed-length rows of ids, and back.

    `encode(texts)` returns int32 [len(texts), max_len]: `bos_id`, the text's ids, `eot_id`, then
    `pad_id` up to `max_len` (over-long text is truncated so that the end marker stays); the
    text towers pool at the end marker and recompute the attention mask as `ids != pad_id`.
    `decode(row)` gives the text of one row, up to the end marker (for display). `mask_id` is the
    id masked language modelling writes (None: the vocabulary has none); `bos_id`/`eot_id` are
    None only for a tokenizer that writes no markers (the word tokenizer of text CNNs).
    """

    max_len: int
    pad_id: int
    bos_id: int | None
    eot_id: int | None
    mask_id: int | None

    @property
    def vocab_size(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
    """Token ids are UTF-8 bytes shifted past three special ids.

    `encode` writes [BOS, bytes..., EOT, PAD...]. The text tower pools at the EOT position,
    found as the last non-pad token, so EOT is always present: over-long text is truncated
    (at a character boundary, never inside a multi-byte character) to make room for it.
    """

    pad_id = 0
    bos_id = 1
    eot_id = 2
    _offset = 3  # byte b has id b + 3

    def __init__(self, max_len: int):
        if max_len < 3:
            raise ValueError(f"max_len must be >= 3 (BOS, one byte, EOT), got {max_len}")
        self.max_len = max_len

    @property
    def vocab_size(self) -> int:
        # 3 special ids + 256 bytes = 259, rounded up to a multiple of 8 so the embedding and
        # output matrices tile evenly on accelerators.
        return -(-(self._offset + 256) // 8) * 8

    @property
    def mask_id(self) -> int:
        # The last id: no byte uses it (259 ids are used, the vocabulary is padded to 264).
        return self.vocab_size - 1

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), max_len]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings; wrap a single text in a list")
        ids = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        room = self.max_len - 2  # BOS and EOT
        for row, text in enumerate(texts):
            data = _truncate_utf8(text.encode("utf-8"), room)
            n = len(data)
            ids[row, 0] = self.bos_id
            ids[row, 1 : n + 1] = (
                np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self._offset
            )
            ids[row, n + 1] = self.eot_id
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids, up to the first EOT (for debugging and display)."""
        data = bytearray()
        for token in np.asarray(ids).tolist():
            if token == self.eot_id:
                break
            if self._offset <= token < self._offset + 256:
                data.append(token - self._offset)
        return data.decode("utf-8", errors="replace")


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    """The longest prefix of `data` of at most `limit` bytes that ends on a character boundary."""
    if len(data) <= limit:
        return data
    cut = limit
    # Continuation bytes look like 0b10xxxxxx; back up until the first dropped byte starts a
    # character, so the kept prefix holds whole characters only.
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut]


def build_tokenizer(kind: str, max_len: int, path: str | None = None) -> Tokenizer:
    """The tokenizer `kind` (one of `TOKENIZERS`) with sequences of `max_len` ids.

    `path`: ignored for "bytes"; for "clip_bpe" the merges file (None: the one inside the
    installed open_clip); for "wordpiece" a `vocab.txt` or a folder holding one; for
    "sentencepiece" the `.model` file.
    """
    if kind == "bytes":
        return ByteTokenizer(max_len)
    if kind == "clip_bpe":
        from mmjax.data.tokenizers.clip_bpe import ClipBpeTokenizer

        return ClipBpeTokenizer(path, max_len=max_len)
    if kind == "wordpiece":
        from mmjax.data.tokenizers.wordpiece import WordPieceTokenizer

        if path is None:
            raise ValueError("the wordpiece tokenizer needs path=<vocab.txt or its folder>")
        vocab = Path(path) / "vocab.txt" if Path(path).is_dir() else Path(path)
        return WordPieceTokenizer(vocab, max_len=max_len)
    if kind == "sentencepiece":
        from mmjax.data.tokenizers.sentencepiece import SentencePieceTokenizer

        if path is None:
            raise ValueError("the sentencepiece tokenizer needs path=<file.model>")
        return SentencePieceTokenizer(path, max_len)
    raise ValueError(f"unknown tokenizer {kind!r}: must be one of {TOKENIZERS}")
