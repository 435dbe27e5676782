"""Hugging Face BERT checkpoints as mmjax `BertEncoder`s, and the packaged MiniLM's word vectors.

Reads a model folder as `save_pretrained` writes it (config.json, model.safetensors or
pytorch_model.bin, vocab.txt, tokenizer_config.json) with no network and no transformers import.
Weights are matched to the mmjax parameter tree name by name and shape, and loading *fails
loudly*: every checkpoint tensor must land in a parameter and every parameter must get a
tensor, except tensors matched by an explicit `allow_unused` list (the pooler and the position-id
buffer by default). A silently skipped tensor gives a model that runs and is subtly wrong.

    python -m mmjax.interop.hf export-minilm OUT.txt

writes the whole-word rows of the packaged all-MiniLM-L6-v2's input embeddings (384-d) as a
GloVe text file: pretrained word vectors without a download (`export_minilm`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax.extras import minilm_dir
from mmjax.models.bert import BertEncoder, bert_from_config, read_config

# Checkpoint tensors that a BertEncoder has no use for: the [CLS] pooler head (sentence
# embeddings here come from mean pooling) and the position-id buffer (positions are arange(L)).
DEFAULT_ALLOW_UNUSED = (r"pooler\..*", r"embeddings\.position_ids")
_INSTALL_HINT = 'install the interop extra: pip install -e ".[interop]"'


class CheckpointMismatchError(ValueError):
    """The checkpoint and the mmjax parameter tree do not match (names or shapes)."""


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_state_dict(model_dir: str | Path) -> dict[str, np.ndarray]:
    """Checkpoint tensors as numpy arrays, from safetensors (preferred) or a torch .bin file.

    Pickles are never executed: a .bin is read with `torch.load(weights_only=True)`.
    """
    model_dir = Path(model_dir)
    single, index = model_dir / "model.safetensors", model_dir / "model.safetensors.index.json"
    if single.is_file() or index.is_file():
        if single.is_file():
            return _read_safetensors(single)
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in _read_safetensors(model_dir / shard).items()}
    pt = model_dir / "pytorch_model.bin"
    if pt.is_file():
        try:
            import torch
        except ImportError as e:
            raise ModuleNotFoundError(f"reading {pt.name} needs torch; {_INSTALL_HINT}") from e
        state = torch.load(pt, map_location="cpu", weights_only=True)
        # numpy has no bfloat16: widen it (exactly) to float32.
        return {
            k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()
        }
    raise FileNotFoundError(
        f"{model_dir} has none of model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin"
    )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """safetensors.numpy; bfloat16 tensors come back as ml_dtypes arrays, because importing
    ml_dtypes (a JAX dependency) registers that dtype with numpy."""
    import ml_dtypes  # noqa: F401

    try:
        from safetensors.numpy import load_file
    except ImportError as e:
        raise ModuleNotFoundError(f"reading {path.name} needs safetensors; {_INSTALL_HINT}") from e

    return dict(load_file(path))


def _canonical_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips the `bert.` prefix of task-head checkpoints (BertForMaskedLM, ...) and renames
    old TF-converted LayerNorm `gamma`/`beta` to `weight`/`bias`."""
    prefixed = any(k.startswith("bert.embeddings.") for k in state)
    out = {}
    for key, value in state.items():
        if prefixed and key.startswith("bert."):
            key = key[len("bert.") :]
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        out[key] = value
    return out


class _Rule(NamedTuple):
    """One mmjax parameter made from checkpoint tensors of the given (torch-layout) shapes."""

    dest: tuple[str, ...]
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    convert: Callable[..., np.ndarray]


def _rules(model: BertEncoder) -> list[_Rule]:
    """HF name -> mmjax parameter, for every parameter of `model`.

    torch Linear weights are [out, in]; mmjax kernels are [in, out...] with heads split out.
    """
    d, h, m = model.width, model.num_heads, model.mlp_dim
    k = d // h
    same = lambda x: x
    transpose = lambda w: w.T
    w_DHK = lambda w: w.T.reshape(d, h, k)
    b_HK = lambda b: b.reshape(h, k)
    w_HKD = lambda w: w.T.reshape(h, k, d)

    def one(dest, src, shape, convert=same):
        return _Rule(dest, (src,), (shape,), convert)

    def ln(dest, src):
        return [
            one((*dest, "scale"), f"{src}.weight", (d,)),
            one((*dest, "bias"), f"{src}.bias", (d,)),
        ]

    emb = "embeddings."
    rules = [
        one(("word_embedding",), f"{emb}word_embeddings.weight", (model.vocab_size, d)),
        one(("pos_embedding",), f"{emb}position_embeddings.weight", (model.max_len, d)),
        one(("type_embedding",), f"{emb}token_type_embeddings.weight", (model.type_vocab_size, d)),
        *ln(("ln_embed",), f"{emb}LayerNorm"),
    ]
    for i in range(model.depth):
        src, attn = f"encoder.layer.{i}.", (f"layer{i}", "attn")
        names = [f"{src}attention.self.{n}" for n in ("query", "key", "value")]
        if model.fused_qkv:
            rules += [
                _Rule(
                    (*attn, "qkv_kernel"),
                    tuple(f"{n}.weight" for n in names),
                    ((d, d),) * 3,
                    lambda *ws: np.stack([w_DHK(w) for w in ws], axis=2),
                ),
                _Rule(
                    (*attn, "qkv_bias"),
                    tuple(f"{n}.bias" for n in names),
                    ((d,),) * 3,
                    lambda *bs: np.stack([b_HK(b) for b in bs], axis=1),
                ),
            ]
        else:
            for short, n in zip("qkv", names, strict=True):
                rules += [
                    one((*attn, f"{short}_kernel"), f"{n}.weight", (d, d), w_DHK),
                    one((*attn, f"{short}_bias"), f"{n}.bias", (d,), b_HK),
                ]
        out, mlp = f"{src}attention.output.", (f"layer{i}", "mlp")
        rules += [
            one((*attn, "out_kernel"), f"{out}dense.weight", (d, d), w_HKD),
            one((*attn, "out_bias"), f"{out}dense.bias", (d,)),
            *ln((f"layer{i}", "post_attn", "ln"), f"{out}LayerNorm"),
            one((*mlp, "in_kernel"), f"{src}intermediate.dense.weight", (m, d), transpose),
            one((*mlp, "in_bias"), f"{src}intermediate.dense.bias", (m,)),
            one((*mlp, "out_kernel"), f"{src}output.dense.weight", (d, m), transpose),
            one((*mlp, "out_bias"), f"{src}output.dense.bias", (d,)),
            *ln((f"layer{i}", "post_mlp", "ln"), f"{src}output.LayerNorm"),
        ]
    return rules


def abstract_params(model: BertEncoder) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat {path: shape/dtype} of the model's parameters, computed without allocating them."""
    ids_BL = jnp.zeros((1, 2), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids_BL, ids_BL)
    return traverse_util.flatten_dict(nn.unbox(boxed)["params"])


def convert_bert_weights(
    state: Mapping[str, np.ndarray],
    model: BertEncoder,
    allow_unused: Sequence[str] = DEFAULT_ALLOW_UNUSED,
) -> dict[str, Any]:
    """`{"params": ...}` for `model` (arrays in its param_dtype) from an HF state dict.

    Raises CheckpointMismatchError listing, all at once, the tensors the model needs but the
    checkpoint lacks, the checkpoint tensors nothing uses (unless a regex in `allow_unused`
    fully matches their name) and every shape mismatch.
    """
    state = _canonical_names(state)
    expected = abstract_params(model)
    rules = _rules(model)
    missing, mismatched, used, flat = [], [], set(), {}
    for rule in rules:
        absent = [s for s in rule.sources if s not in state]
        missing += [f"{s} (for {'/'.join(rule.dest)})" for s in absent]
        used.update(rule.sources)
        if absent:
            continue
        bad = [
            f"{s}: checkpoint {tuple(state[s].shape)}, expected {shape}"
            for s, shape in zip(rule.sources, rule.shapes, strict=True)
            if tuple(state[s].shape) != shape
        ]
        mismatched += bad
        if not bad:
            flat[rule.dest] = rule.convert(*(np.asarray(state[s]) for s in rule.sources))
    unused = [
        k
        for k in sorted(state)
        if k not in used and not any(re.fullmatch(p, k) for p in allow_unused)
    ]
    # Consistency of the rules with the module itself (a bug here is ours, not the checkpoint's).
    ruled = {r.dest for r in rules}
    no_rule = sorted("/".join(p) for p in expected.keys() ^ ruled)
    mismatched += [
        f"{'/'.join(p)}: converted {v.shape}, module expects {expected[p].shape}"
        for p, v in flat.items()
        if p in expected and v.shape != expected[p].shape
    ]
    problems = [
        ("missing in the checkpoint", missing),
        ("unused checkpoint tensors (pass allow_unused=[regex, ...] to skip on purpose)", unused),
        ("shape mismatches", mismatched),
        ("parameters and conversion rules that do not pair up (an mmjax bug)", no_rule),
    ]
    if any(items for _, items in problems):
        lines = [f"checkpoint does not match BertEncoder(width={model.width}, depth={model.depth})"]
        for title, items in problems:
            if items:
                lines += [f"{title} ({len(items)}):", *(f"  {item}" for item in items)]
        raise CheckpointMismatchError("\n".join(lines))
    dtype = jnp.dtype(model.param_dtype)
    params = {p: jnp.asarray(v.astype(dtype)) for p, v in flat.items()}
    return {"params": traverse_util.unflatten_dict(params)}


def load_bert_model(
    model_dir: str | Path,
    dtype: Any = "float32",
    param_dtype: Any = "float32",
    fused_qkv: bool = True,
    allow_unused: Sequence[str] = DEFAULT_ALLOW_UNUSED,
) -> tuple[BertEncoder, dict[str, Any]]:
    """(model, variables) from an HF model folder; see `convert_bert_weights` for the checks."""
    model_dir = Path(model_dir)
    model = bert_from_config(read_config(model_dir), dtype, param_dtype, fused_qkv)
    return model, convert_bert_weights(read_state_dict(model_dir), model, allow_unused)


def default_max_len(model_dir: str | Path) -> int:
    """The text length the checkpoint was trained for: sentence-transformers' max_seq_length
    when present, else the tokenizer's model_max_length, capped at max_position_embeddings."""
    model_dir = Path(model_dir)
    limit = _read_json(model_dir / "config.json").get("max_position_embeddings", 512)
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        if (model_dir / name).is_file() and key in (cfg := _read_json(model_dir / name)):
            return min(int(cfg[key]), limit)
    return limit


def load_tokenizer(model_dir: str | Path, max_len: int | None = None):
    """mmjax's WordPiece tokenizer for the folder's vocab.txt, with its do_lower_case."""
    from mmjax.data.tokenizers.wordpiece import (
        WordPieceTokenizer,  # lazy: optional for the model alone
    )

    model_dir = Path(model_dir)
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    limit = _read_json(model_dir / "config.json").get("max_position_embeddings", 512)
    max_len = default_max_len(model_dir) if max_len is None else max_len
    if max_len > limit:
        raise ValueError(f"max_len {max_len} exceeds the model's max_position_embeddings {limit}")
    lowercase = bool(tok_cfg.get("do_lower_case", True))
    return WordPieceTokenizer(str(model_dir / "vocab.txt"), max_len=max_len, lowercase=lowercase)


def load_bert(
    model_dir: str | Path,
    dtype: Any = "float32",
    max_len: int | None = None,
    **model_kwargs: Any,
):
    """(model, variables, tokenizer) for an HF BERT folder; `model_kwargs` go to
    `load_bert_model` (param_dtype, fused_qkv, allow_unused)."""
    model, variables = load_bert_model(model_dir, dtype, **model_kwargs)
    return model, variables, load_tokenizer(model_dir, max_len)


class SentencePooling(NamedTuple):
    mode: str  # "mean" or "cls"
    normalize: bool  # L2-normalise the pooled vector


def read_sentence_pooling(model_dir: str | Path) -> SentencePooling:
    """How sentence-transformers turns hidden states into an embedding for this folder
    (modules.json + 1_Pooling/config.json); raises for pooling modes not implemented here."""
    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} has no modules.json: not a sentence-transformers model"
        )
    modules = _read_json(model_dir / "modules.json")
    normalize = any(m["type"].endswith(".Normalize") for m in modules)
    (pooling,) = [m for m in modules if m["type"].endswith(".Pooling")]
    cfg = _read_json(model_dir / pooling["path"] / "config.json")
    modes = [
        k[len("pooling_mode_") :] for k, v in cfg.items() if k.startswith("pooling_mode_") and v
    ]
    if modes == ["mean_tokens"]:
        return SentencePooling("mean", normalize)
    if modes == ["cls_token"]:
        return SentencePooling("cls", normalize)
    raise ValueError(f"pooling modes {modes} are not supported; use mean_tokens or cls_token")


def export_minilm(out_path: str, words=None) -> int:
    """Writes the packaged all-MiniLM-L6-v2's whole-word input embeddings (only `words`, if
    given) in GloVe format; returns the number of words written."""
    try:
        model_dir = minilm_dir()
        table = _read_safetensors(model_dir / "model.safetensors")
    except ImportError as e:
        raise ImportError(
            f"exporting MiniLM word vectors needs the interop extra: pip install -e '.[interop]' "
            f"({e})"
        ) from e
    matrix = table["embeddings.word_embeddings.weight"]
    with open(model_dir / "vocab.txt", encoding="utf-8") as f:
        vocab = [line.rstrip("\n") for line in f]
    wanted = None if words is None else {w.lower() for w in words}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    written = 0
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, token in enumerate(vocab):
            # Whole words only: no word-piece continuations (##x) or [SPECIAL] tokens.
            if not token.isalpha() or (wanted is not None and token not in wanted):
                continue
            f.write(token + " " + " ".join(f"{x:.6f}" for x in matrix[i]) + "\n")
            written += 1
    os.replace(tmp, out_path)  # never leave a half-written file under the final name
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "export-minilm":
        print("usage: python -m mmjax.interop.hf export-minilm OUT.txt", file=sys.stderr)
        return 2
    print(f"wrote {export_minilm(argv[1])} word vectors to {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
