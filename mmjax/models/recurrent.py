"""Recurrent text tower: token embeddings -> stacked LSTM or GRU layers (optionally bidirectional)
-> the final state of the last real token.

Each layer is a flax `nn.RNN`, a `scan` over time: the step is compiled once, so compile time
and program size do not grow with the text length. The real length of each row is passed as
`seq_lengths`, so the forward state stops at the last real token and the backward direction
starts there (flax reverses only the first `seq_lengths` steps), never at padding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.models.layers import Precision, dense, param

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


def real_lengths(tokens_BL: jax.Array, pad_id: int, eot_id: int | None) -> jax.Array:
    """int32 [B]: the tokens up to and including the first `eot_id`, or up to the last non-pad
    token where a row has none (as the causal Transformer tower reads them: in CLIP's BPE the
    pad id 0 is also a character, so a pad id inside the text is not the end)."""
    length = tokens_BL.shape[1]
    not_pad_BL = tokens_BL != pad_id
    last_B = jnp.max(jnp.where(not_pad_BL, jnp.arange(length)[None] + 1, 0), axis=1)
    if eot_id is None:
        return last_B.astype(jnp.int32)
    is_eot_BL = tokens_BL == eot_id
    eot_B = jnp.argmax(is_eot_BL, axis=1) + 1
    return jnp.where(jnp.any(is_eot_BL, axis=1), eot_B, last_B).astype(jnp.int32)


def _cell(kind: str, features: int, dtype, param_dtype) -> nn.RNNCellBase:
    """A cell whose parameters carry logical axis names: input kernels (embed, mlp), recurrent
    kernels (None, mlp) (one mesh axis cannot shard both dims), biases (mlp). Unbound
    (`parent=None`): the `nn.RNN` that runs it owns it, so its parameters sit under the RNN's
    name."""
    init = nn.initializers
    return CELLS[kind](
        features,
        kernel_init=nn.with_logical_partitioning(init.lecun_normal(), ("embed", "mlp")),
        recurrent_kernel_init=nn.with_logical_partitioning(init.orthogonal(), (None, "mlp")),
        bias_init=nn.with_logical_partitioning(init.zeros_init(), ("mlp",)),
        dtype=dtype,
        param_dtype=param_dtype,
        parent=None,
    )


def _final_hidden(carry) -> jax.Array:
    """The hidden state h of a cell's carry: LSTM carries (c, h), GRU carries h."""
    return carry[1] if isinstance(carry, tuple) else carry


class RecurrentTextTower(Precision):
    """tokens_BL -> (pooled_BD, tokens_BLD), D = `width`.

    `kind` "lstm" (`nn.OptimizedLSTMCell`) or "gru" (`nn.GRUCell`), `depth` stacked layers.
    Unidirectional: each layer has `width` units and pooled_BD is the last layer's state at the
    last real token. `bidirectional`: each direction has `width // 2` units; a layer's outputs
    are [forward; backward] per position, and pooled_BD is [forward state at the last real
    token; backward state at the first token]. The embedding table `token_embedding`
    [vocab_size, embed_dim] (embed_dim 0 = width) is what pretrained word vectors replace
    (see `mmjax.tasks.weights`). Token outputs at padding are zero; padding never changes any
    output. The recurrence runs in float32 state whatever `dtype` (the cells' GEMMs take
    `dtype` inputs); outputs are in `dtype`.
    """

    kind: str
    vocab_size: int
    width: int
    depth: int = 1
    embed_dim: int = 0
    bidirectional: bool = False
    pad_id: int = 0
    eot_id: int | None = 2
    # No gradient into the table: pretrained word vectors of words never seen in training keep
    # their place next to the seen ones (the task also gives the table no optimizer state).
    freeze_embeddings: bool = False

    @nn.compact
    def __call__(self, tokens_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.kind not in CELLS:
            raise ValueError(f"recurrent kind must be one of {', '.join(CELLS)}, got {self.kind!r}")
        if self.bidirectional and self.width % 2:
            raise ValueError(f"a bidirectional tower needs an even width, got {self.width}")
        e = self.embed_dim or self.width
        table = self.param(
            "token_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, e),
            self.param_dtype,
        )
        if self.freeze_embeddings:
            table = jax.lax.stop_gradient(table)
        lengths_B = real_lengths(tokens_BL, self.pad_id, self.eot_id)
        valid_BL = jnp.arange(tokens_BL.shape[1])[None] < lengths_B[:, None]
        x_BLD = jnp.take(table, tokens_BL, axis=0).astype(self.dtype)
        units = self.width // 2 if self.bidirectional else self.width
        for i in range(self.depth):
            directions = [False, True] if self.bidirectional else [False]
            outputs, finals = [], []
            for reverse in directions:
                name = f"layer{i}_{'backward' if reverse else 'forward'}"
                cell = _cell(self.kind, units, self.dtype, self.param_dtype)
                rnn = nn.RNN(cell, return_carry=True, reverse=reverse, keep_order=True, name=name)
                carry, y_BLU = rnn(x_BLD, seq_lengths=lengths_B)
                outputs.append(y_BLU)
                finals.append(_final_hidden(carry))
            x_BLD = jnp.concatenate(outputs, axis=-1).astype(self.dtype)
            # Outputs past the real length are the frozen state repeated: zero them so the next
            # layer (and a fusion reading the tokens) sees padding as padding.
            x_BLD = jnp.where(valid_BL[..., None], x_BLD, jnp.zeros((), self.dtype))
            x_BLD = nn.with_logical_constraint(x_BLD, ("batch", "length", "act_embed"))
        pooled_BD = jnp.concatenate(finals, axis=-1).astype(self.dtype)
        return pooled_BD, x_BLD


class RecurrentClassifier(nn.Module):
    """tokens_BL -> float32 logits [B, num_classes]: a `RecurrentTextTower` (named `tower`;
    its `token_embedding` is what pretrained word vectors replace) and a linear head on its
    pooled state. The word-vector counterpart of `mmjax.models.text_cnn.TextCNN`."""

    tower: RecurrentTextTower
    num_classes: int

    @nn.compact
    def __call__(self, tokens_BL: jax.Array) -> jax.Array:
        pooled_BD, _ = self.tower(tokens_BL)
        d = pooled_BD.shape[-1]
        init = nn.initializers
        head = param(
            self,
            "head_kernel",
            init.lecun_normal(),
            (d, self.num_classes),
            ("mlp", None),
            jnp.float32,
        )
        bias = param(self, "head_bias", init.zeros, (self.num_classes,), (None,), jnp.float32)
        return dense(pooled_BD, head, self.tower.dtype, bias=bias, out_dtype=jnp.float32)
