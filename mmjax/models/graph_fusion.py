"""Graph reasoning fusion: one graph over the image tokens and the text tokens, a few rounds of
relation-typed message passing, an attention-pooled readout.

Nodes: the N image tokens (patches, tubelets or a feature map's cells) and the L text tokens,
each projected to `width` and tagged with a learned node-type embedding. Edges, by relation
(each with its own message weights, R-GCN style):
  - spatial: image node ↔ its neighbours on the token grid (static edge list, see `grid_edges`),
    mean over the valid neighbours;
  - text: every valid text node → every text node (the towers already encode word order, and a
    complete graph keeps the text nodes exchangeable);
  - relevance: learned soft text↔image edges recomputed every round, multi-head scaled dot
    products of the nodes' current states; text nodes take a softmax over the image nodes,
    image nodes a softmax over the text nodes (static shapes: every pair is an edge whose weight
    the model learns; masked pairs weigh zero).
Update: gated residual, h ← LayerNorm(h + σ(W_g[h; m]) ⊙ gelu(W_u[h; m])), with m the sum of
the node's relation messages. Readout: attention pooling over the valid nodes of both kinds.

The spatial relation runs as `jax.ops.segment_sum` over the edge list (`edges="segment"`) or as
a dense masked adjacency matmul (`edges="dense"`, the default: faster at these graph sizes, see
the README's Tasks section). Both give equal outputs.
Relabelling nodes changes nothing: text nodes are exchangeable, and image nodes permuted
together with their edge list (`image_edges`) permute the fused tokens only.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models.fusion_attention import (
    Fusion,
    FusionOutput,
    Streams,
    typed_projections,
    zero_padding,
)
from mmjax.models.layers import LayerNorm, dense, param

ACT = ("batch", "length", "act_embed")
READOUTS = ("attention", "question", "count")
LECUN = nn.initializers.lecun_normal()


def grid_edges(grid: tuple[int, ...]) -> np.ndarray:
    """int32 [E, 2] (source, destination) pairs joining each cell of a row-major grid of any
    rank to its axis-aligned neighbours (both directions)."""
    index = np.arange(math.prod(grid)).reshape(grid)
    pairs = []
    for axis in range(len(grid)):
        a = np.moveaxis(index, axis, 0)
        src, dst = a[:-1].ravel(), a[1:].ravel()
        pairs += [np.stack([src, dst], 1), np.stack([dst, src], 1)]
    if not pairs:
        return np.zeros((0, 2), np.int32)
    return np.concatenate(pairs).astype(np.int32)


def square_grid(n: int) -> tuple[int, ...]:
    """(s, s) for n = s², else (n,): a chain."""
    s = math.isqrt(n)
    return (s, s) if s * s == n else (n,)


class GraphFusion(Fusion):
    """See the module doc. pooled_BD: [B, width]; fused tokens [B, N, width], [B, L, width],
    zero at padding. `grid`: the image tokens' grid (row-major, N = prod(grid); () = a square
    grid of N, or a chain if N is not a square). `image_edges`: an explicit edge list in place
    of the grid's."""

    width: int
    depth: int  # message-passing rounds
    num_heads: int = 4  # heads of the relevance edges and of the readout
    grid: tuple[int, ...] = ()
    image_edges: tuple[tuple[int, int], ...] | None = None
    edges: str = "dense"  # "dense" | "segment": how the spatial relation aggregates
    # "attention": attention pooling over all nodes with learned queries. "question": that, plus
    # a question-guided product (see `_question_product`): a comparison of the question with the
    # image summary it selects. "count": "question" plus a sigmoid-gated sum over the image
    # tokens (see `_question_count`): how many tokens match the question, which a softmax pick
    # (normalised over the tokens) cannot say.
    readout: str = "attention"

    def _edges(self, n: int) -> np.ndarray:
        if self.image_edges is not None:
            return np.asarray(self.image_edges, np.int32).reshape(-1, 2)
        grid = tuple(self.grid) or square_grid(n)
        if math.prod(grid) != n:
            raise ValueError(f"GraphFusion grid {grid} does not hold the {n} image tokens")
        return grid_edges(grid)

    def _kernel(self, name: str, shape, axes, init=LECUN) -> jax.Array:
        return param(self, name, init, shape, axes, self.param_dtype)

    @nn.compact
    def fuse(self, s: Streams, return_attention: bool) -> FusionOutput:
        if self.edges not in ("dense", "segment"):
            raise ValueError(f"GraphFusion edges must be 'dense' or 'segment', got {self.edges!r}")
        if self.readout not in READOUTS:
            raise ValueError(f"GraphFusion readout must be one of {READOUTS}, got {self.readout!r}")
        if self.width % self.num_heads:
            raise ValueError(f"GraphFusion width {self.width} is not divisible by {self.num_heads}")
        n = s.image_tokens_BND.shape[1]
        edges_E2 = self._edges(n)
        img_valid_BN, txt_valid_BL = s.image_valid_BN, s.text_valid_BL
        img_BND, txt_BLD = typed_projections(
            self, s.image_tokens_BND, s.text_tokens_BLD, self.width
        )
        # Node states: batch-sharded, features replicated (as the Transformer's residual
        # stream); see `_update` for why this is not left to XLA's propagation.
        img_BND = nn.with_logical_constraint(zero_padding(img_BND, img_valid_BN), ACT)
        txt_BLD = nn.with_logical_constraint(zero_padding(txt_BLD, txt_valid_BL), ACT)
        for r in range(self.depth):
            m_img, m_txt = self._messages(f"round{r}", img_BND, txt_BLD, s, edges_E2)
            img_BND = self._update(f"round{r}_image", img_BND, m_img, img_valid_BN)
            txt_BLD = self._update(f"round{r}_text", txt_BLD, m_txt, txt_valid_BL)
        nodes_BVD = jnp.concatenate([img_BND, txt_BLD], axis=1)
        valid_BV = jnp.concatenate([img_valid_BN, txt_valid_BL], axis=1)
        pooled_BD = self._readout(nodes_BVD, valid_BV)
        if self.readout in ("question", "count"):
            pooled_BD = pooled_BD + self._question_product(s)
        if self.readout == "count":
            pooled_BD = pooled_BD + self._question_count(s)
        return FusionOutput(
            pooled_BD,
            image_tokens_BND=img_BND,
            text_tokens_BLD=txt_BLD,
        )

    def _relation(self, name: str, x_BSD: jax.Array) -> jax.Array:
        """The messages a relation's source nodes send: x W_name, float32 accumulation."""
        w = self._kernel(f"{name}_kernel", (self.width, self.width), ("embed", "mlp"))
        return dense(x_BSD, w, self.dtype, out_dtype=jnp.float32)

    def _spatial(self, msg_BND: jax.Array, valid_BN: jax.Array, edges_E2: np.ndarray):
        """Mean of the valid grid neighbours' messages, float32 [B, N, D]."""
        n = msg_BND.shape[1]
        msg_BND = jnp.where(valid_BN[..., None], msg_BND, 0.0)
        src_E, dst_E = edges_E2[:, 0], edges_E2[:, 1]
        if self.edges == "dense":
            adj_NN = np.zeros((n, n), np.float32)  # adj[dst, src]
            np.add.at(adj_NN, (dst_E, src_E), 1.0)
            adj_NN = jnp.asarray(adj_NN)
            total_BND = jnp.einsum("ts,BsD->BtD", adj_NN, msg_BND)
            count_BN = jnp.einsum("ts,Bs->Bt", adj_NN, valid_BN.astype(jnp.float32))
        else:  # segment_sum over the edge axis, nodes moved to the front
            per_edge_EBD = jnp.take(jnp.moveaxis(msg_BND, 1, 0), src_E, axis=0)
            total_BND = jnp.moveaxis(jax.ops.segment_sum(per_edge_EBD, dst_E, n), 0, 1)
            valid_EB = jnp.take(valid_BN.T.astype(jnp.float32), src_E, axis=0)
            count_BN = jax.ops.segment_sum(valid_EB, dst_E, n).T
        return total_BND / jnp.maximum(count_BN, 1.0)[..., None]

    def _messages(self, name, img_BND, txt_BLD, s: Streams, edges_E2):
        """Each node's summed incoming messages (float32): image nodes from their neighbours
        and (relevance) the text, text nodes from the text and (relevance) the image."""
        img_valid_BN, txt_valid_BL = s.image_valid_BN, s.text_valid_BL
        h, k = self.num_heads, self.width // self.num_heads
        spatial_BND = self._spatial(
            self._relation(f"{name}_spatial", img_BND), img_valid_BN, edges_E2
        )
        txt_msg_BLD = jnp.where(txt_valid_BL[..., None], self._relation(f"{name}_text", txt_BLD), 0)
        count_B1 = jnp.maximum(jnp.sum(txt_valid_BL, axis=1, keepdims=True), 1)
        text_mean_BD = jnp.sum(txt_msg_BLD, axis=1) / count_B1.astype(jnp.float32)
        # Relevance: one score per (text, image) pair and head, from the current states.
        q_BLHK = self._heads(f"{name}_query", txt_BLD)
        k_BNHK = self._heads(f"{name}_key", img_BND)
        scores_BHLN = jnp.einsum("BLHK,BNHK->BHLN", q_BLHK, k_BNHK) / math.sqrt(k)
        pair_BLN = txt_valid_BL[:, :, None] & img_valid_BN[:, None, :]
        to_text_BHLN = _masked_softmax(scores_BHLN, pair_BLN[:, None], axis=3)
        to_image_BHLN = _masked_softmax(scores_BHLN, pair_BLN[:, None], axis=2)
        v_img_BNHK = self._relation(f"{name}_image_to_text", img_BND).reshape(
            *img_BND.shape[:2], h, k
        )
        v_txt_BLHK = self._relation(f"{name}_text_to_image", txt_BLD).reshape(
            *txt_BLD.shape[:2], h, k
        )
        from_image_BLD = jnp.einsum("BHLN,BNHK->BLHK", to_text_BHLN, v_img_BNHK)
        from_text_BND = jnp.einsum("BHLN,BLHK->BNHK", to_image_BHLN, v_txt_BLHK)
        m_img_BND = spatial_BND + from_text_BND.reshape(spatial_BND.shape)
        m_txt_BLD = text_mean_BD[:, None] + from_image_BLD.reshape(txt_msg_BLD.shape)
        return m_img_BND, m_txt_BLD

    def _heads(self, name: str, x_BSD: jax.Array) -> jax.Array:
        h, k = self.num_heads, self.width // self.num_heads
        w = self._kernel(f"{name}_kernel", (self.width, h, k), ("embed", "heads", "kv"))
        return dense(x_BSD, w, self.dtype, out_dtype=jnp.float32)

    def _update(self, name, x_BSD, m_BSD, valid_BS):
        """Gated residual update, zero at padding."""
        # Pinned, as are the node states on entry (`fuse`). Left to XLA's sharding propagation
        # (jax 0.10.2, CPU), `x + f(x @ W)` with the batch over data x fsdp and W's output
        # dimension over fsdp (on data=2 x fsdp=2 x tensor=2) came out with the rows of the
        # (data 0, fsdp 1) and (data 1, fsdp 0) shards swapped in one operand: wrong outputs and
        # gradients for those rows, not rounding (test_graph_fusion_sharded).
        xm_BSI = jnp.concatenate([x_BSD, m_BSD.astype(self.dtype)], axis=-1)
        xm_BSI = nn.with_logical_constraint(xm_BSI, ACT)
        axes = ("mlp", "embed")
        gate_w = self._kernel(f"{name}_gate_kernel", (2 * self.width, self.width), axes)
        gate_b = param(
            self,
            f"{name}_gate_bias",
            nn.initializers.zeros,
            (self.width,),
            ("norm",),
            self.param_dtype,
        )
        up_w = self._kernel(f"{name}_update_kernel", (2 * self.width, self.width), axes)
        gate = jax.nn.sigmoid(dense(xm_BSI, gate_w, self.dtype, bias=gate_b, out_dtype=jnp.float32))
        update = jax.nn.gelu(dense(xm_BSI, up_w, self.dtype, out_dtype=jnp.float32))
        y_BSD = x_BSD.astype(jnp.float32) + gate * update
        y_BSD = LayerNorm(self.dtype, self.param_dtype, name=f"{name}_norm")(y_BSD)
        return nn.with_logical_constraint(zero_padding(y_BSD, valid_BS), ACT)

    def _readout(self, nodes_BVD: jax.Array, valid_BV: jax.Array) -> jax.Array:
        """Multi-head attention pooling over the valid nodes: a learned query per head."""
        h, k = self.num_heads, self.width // self.num_heads
        query_HK = param(
            self,
            "readout_query",
            nn.initializers.normal(0.02),
            (h, k),
            ("heads", "kv"),
            self.param_dtype,
        )
        keys_BVHK = self._heads("readout_key", nodes_BVD)
        scores_BHV = jnp.einsum("BVHK,HK->BHV", keys_BVHK, query_HK.astype(jnp.float32))
        weights_BHV = _masked_softmax(scores_BHV / math.sqrt(k), valid_BV[:, None], axis=2)
        values_BVHK = nodes_BVD.astype(jnp.float32).reshape(*nodes_BVD.shape[:2], h, k)
        pooled_BHK = jnp.einsum("BHV,BVHK->BHK", weights_BHV, values_BVHK)
        pooled_BD = pooled_BHK.reshape(pooled_BHK.shape[0], self.width)
        return nn.with_logical_constraint(pooled_BD.astype(self.dtype), ("batch", "act_embed"))

    def _question_product(self, s: Streams) -> jax.Array:
        """(W_i·image summary) ⊙ (W_t·question), [B, width], from the towers' own outputs: the
        question is the text tower's pooled output, the image summary attention pooling over the
        image tower's tokens with per-head queries from the question. A low-rank bilinear
        (MLB-style) term: "is there a red shape?" is a product of the question's colour and the
        image's colours, which neither stream carries alone. Reading the towers' outputs, not
        the nodes, keeps contrastively pretrained towers' alignment of colour words with image
        colours (`init_towers_from`), which the random node projections would scramble."""
        scores_BHN, values_BNHK = self._question_scores("question", s.image_tokens_BND, s)
        weights_BHN = _masked_softmax(scores_BHN, s.image_valid_BN[:, None], axis=2)
        image_BHK = jnp.einsum("BHN,BNHK->BHK", weights_BHN, values_BNHK)
        image_BD = image_BHK.reshape(image_BHK.shape[0], -1)
        image_BD = self._project("question_image", image_BD, (self.width,), ("mlp",))
        text_BD = self._project("question_text", s.text_pooled_BD, (self.width,), ("mlp",))
        return nn.with_logical_constraint(
            (image_BD * text_BD).astype(self.dtype), ("batch", "act_embed")
        )

    def _question_count(self, s: Streams) -> jax.Array:
        """W_o [Σ_n g_n v_n; Σ_n g_n], [B, width]: per head, every image token is scored against
        the question and gated by a sigmoid, g_n = σ(q·k_n/√K + b), independently of the other
        tokens; the gates and the gated values are summed, not averaged. So two matching shapes
        give twice one's gate mass and none gives ~0: "how many red shapes?" (0/1/2) and "is
        there a red shape?", which a softmax pick (weights summing to one) cannot express. The
        values keep the towers' token content (a ResNet token carries its position), for "which
        side is the star on?". Reads the towers' outputs, as `_question_product` does."""
        # Pinned to the batch sharding as the node states are (`_update`): left to XLA, the
        # image tokens' gradient came out with rows mixed between shards on data=2 x fsdp=2 x
        # tensor=2 (test_graph_fusion_sharded).
        img_BND = nn.with_logical_constraint(s.image_tokens_BND, ACT)
        scores_BHN, values_BNHK = self._question_scores("count", img_BND, s)
        h = self.num_heads
        bias_H = param(
            self, "count_bias", nn.initializers.zeros, (h,), ("heads",), self.param_dtype
        )
        scores_BHN = scores_BHN + bias_H.astype(jnp.float32)[None, :, None]
        summed_BHK, count_BH = gated_sum(scores_BHN, values_BNHK, s.image_valid_BN)
        summed_BD = summed_BHK.reshape(summed_BHK.shape[0], -1)
        features_BF = jnp.concatenate([summed_BD, count_BH], axis=-1)
        # Zero at initialisation: the readout starts as "question"'s, whose colour questions
        # break through early; a random projection of the gate sums delayed that (README, VQA).
        zero = {"init": nn.initializers.zeros}
        out_BD = self._project("count_out", features_BF, (self.width,), ("mlp",), **zero)
        return nn.with_logical_constraint(out_BD.astype(self.dtype), ("batch", "act_embed"))

    def _question_scores(self, prefix: str, img_BND: jax.Array, s: Streams):
        """(scores [B, H, N] float32, values [B, N, H, K] float32): per head, the question (the
        text tower's pooled output) against every image token, q·k_n/√K, with the tokens split
        into heads as the values; `prefix` names the query/key projections of one readout."""
        question_BD, h = s.text_pooled_BD, self.num_heads
        if question_BD is None:
            raise ValueError(
                f"GraphFusion readout={self.readout!r} needs the text tower's pooled output"
            )
        d_img = img_BND.shape[-1]
        if d_img % h:
            raise ValueError(f"GraphFusion image width {d_img} is not divisible by {h} heads")
        k = d_img // h
        query_BHK = self._project(f"{prefix}_query", question_BD, (h, k), ("heads", "kv"))
        keys_BNHK = self._project(f"{prefix}_key", img_BND, (h, k), ("heads", "kv"))
        scores_BHN = jnp.einsum("BNHK,BHK->BHN", keys_BNHK, query_BHK) / math.sqrt(k)
        values_BNHK = img_BND.astype(jnp.float32).reshape(*img_BND.shape[:2], h, k)
        return scores_BHN, values_BNHK

    def _project(self, name, x_BSD, out: tuple[int, ...], axes, **init) -> jax.Array:
        """x W for an input of any width (a tower's, not `width`), float32 accumulation."""
        w = self._kernel(f"{name}_kernel", (x_BSD.shape[-1], *out), ("embed", *axes), **init)
        return dense(x_BSD.astype(self.dtype), w, self.dtype, out_dtype=jnp.float32)


def gated_sum(scores_BHN: jax.Array, values_BNHK: jax.Array, valid_BN: jax.Array):
    """Per head, the sigmoid gates of the valid tokens, g = σ(scores), summed over the tokens
    with and without their values: (Σ_n g_n v_n [B, H, K], Σ_n g_n [B, H]), float32. Not
    normalised over the tokens (a count, not a pick); padded tokens weigh zero."""
    gates_BHN = jnp.where(valid_BN[:, None], jax.nn.sigmoid(scores_BHN.astype(jnp.float32)), 0.0)
    summed_BHK = jnp.einsum("BHN,BNHK->BHK", gates_BHN, values_BNHK.astype(jnp.float32))
    return summed_BHK, jnp.sum(gates_BHN, axis=-1)


def _masked_softmax(scores: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
    """Softmax over `axis` of the entries where `mask` holds; masked entries and all-masked
    rows give zeros (a padded text node has no relevance edges). No infinities anywhere: the
    backward pass of a sharded program stays exact."""
    scores = jnp.where(mask, scores, 0.0)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(mask, scores, -1e30), axis=axis, keepdims=True))
    e = jnp.where(mask, jnp.exp(scores - top), 0.0)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


__all__ = ["READOUTS", "GraphFusion", "gated_sum", "grid_edges", "square_grid"]
