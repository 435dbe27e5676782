"""SentencePiece tokenizer (SigLIP/T5-style text towers) and a helper to train one.

A thin wrapper: ids come from `sentencepiece.SentencePieceProcessor.encode` unchanged, so
they match any checkpoint trained with the same `.model` file; this module only adds the
special tokens, truncation and padding that give the text tower a fixed-shape int32 batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mmjax.extras import import_optional


def _import_sentencepiece():
    """The `sentencepiece` module, imported only when a SentencePiece tokenizer is used."""
    return import_optional("sentencepiece", "SentencePiece tokenizers")


class SentencePieceTokenizer:
    """`encode` writes [BOS?] pieces... [EOS] PAD... as int32 [N, max_len].

    Over-long text keeps its first pieces and then EOS, so the text tower always finds the
    end marker it pools at. Pad is the model's `<pad>` piece; a model trained without one
    (sentencepiece's default) gets the id `sp_vocab_size` instead, one row past the model's
    own ids, so padding never collides with a real piece (`vocab_size` counts that row).
    """

    def __init__(
        self,
        model_path: str | Path,
        max_len: int,
        add_bos: bool = False,
        add_eos: bool = True,
        pad_id: int | None = None,
    ):
        spm = _import_sentencepiece()
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.max_len = max_len
        if max_len < int(add_bos) + int(add_eos) + 1:
            raise ValueError(f"max_len={max_len} leaves no room for text")
        self.bos_id = self._sp.bos_id()
        self.eot_id = self._sp.eos_id()
        self.mask_id = None
        if add_bos and self.bos_id < 0:
            raise ValueError(f"{model_path} has no BOS piece; use add_bos=False")
        if add_eos and self.eot_id < 0:
            raise ValueError(f"{model_path} has no EOS piece; use add_eos=False")
        sp_size = self._sp.get_piece_size()
        if pad_id is None:
            pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else sp_size
        self.pad_id = int(pad_id)
        self._vocab_size = max(sp_size, self.pad_id + 1)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """SentencePiece ids per text, no special tokens, no truncation."""
        return self._sp.encode(list(texts), out_type=int)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [len(texts), max_len]."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of strings; wrap a single text in a list")
        out = np.full((len(texts), self.max_len), self.pad_id, dtype=np.int32)
        room = self.max_len - int(self.add_bos) - int(self.add_eos)
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eot_id] if self.add_eos else []
        for row, ids in enumerate(self.encode_ids(texts)):
            ids = [*head, *ids[:room], *tail]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of one row of ids, up to the first EOS; special and pad ids dropped."""
        tokens = []
        for token in np.asarray(ids).tolist():
            if self.add_eos and token == self.eot_id:
                break
            if token != self.pad_id and 0 <= token < self._sp.get_piece_size():
                tokens.append(token)
        return self._sp.decode(tokens)


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    **trainer_kwargs,
) -> Path:
    """Trains a SentencePiece model on `texts`; returns the path of `<model_prefix>.model`.

    Ids are laid out pad=0, unk=1, bos=2, eos=3, so padding is 0 as for the other tokenizers.
    `trainer_kwargs` go to `SentencePieceTrainer.train` as they are (e.g. `character_coverage`,
    `byte_fallback=True`, `hard_vocab_limit=False` for a tiny corpus).
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    spm = _import_sentencepiece()
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    options = {
        "pad_id": 0,
        "unk_id": 1,
        "bos_id": 2,
        "eos_id": 3,
        "num_threads": min(4, os.cpu_count() or 1),
        "minloglevel": 2,  # warnings and errors only
        **trainer_kwargs,
    }
    # One sentence per item; newlines inside a text would split it, so fold them to spaces.
    sentences = (text.replace("\n", " ") for text in texts)
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            logstream=quiet,
            **options,
        )
    return model_prefix.with_name(model_prefix.name + ".model")
