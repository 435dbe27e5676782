"""Shared base of the fusion task recipes (mm_classification, vqa, matching): the base
configuration's towers (a ViT image tower; vqa replaces them with the default run's, frozen),
a bidirectional text tower (every text token is a fusion input), and a `model.fusion` block.

Not a recipe to train by itself: it trains the multimodal classification task (as
configs/mm_classification.py does).
"""

import ml_collections

from mmjax import config as base


def get_config() -> ml_collections.ConfigDict:
    c = base.get_config()
    c.task = "classification"
    c.data.name = "shapes_mmc"
    c.data.num_train = 6000
    c.data.num_val = 1000
    c.total_steps = 300
    c.batch_size = 64
    c.eval_every = 100
    c.checkpoint_every = 100
    c.optim.text_frozen_steps = 0
    c.optim.warmup_steps = 30
    c.model.text.causal = False  # mean-pooled, every token sees the whole text
    c.model.image.depth = 3
    c.model.text.depth = 2
    # kind: early_concat | late_concat | gmu | tensor | low_rank | cross_attention |
    # co_attention | bottleneck | graph (mmjax/models/fusion.py). width: the fused width (pooled
    # fusions' output, early_concat/bottleneck's stream, graph's nodes); depth/num_heads/mlp_dim:
    # the fusion's own Transformer layers (late_concat: mlp_dim is its hidden width; graph:
    # depth message-passing rounds, num_heads relevance and readout heads); rank_dim:
    # tensor fusion's per-modality projection; rank: low-rank fusion's rank; readout: graph's
    # "attention" | "question" | "count" (mmjax/models/graph_fusion.py).
    c.model.fusion = ml_collections.ConfigDict(
        dict(
            kind="cross_attention",
            width=128,
            depth=1,
            num_heads=4,
            mlp_dim=256,
            rank_dim=16,
            rank=4,
            readout="attention",
        )
    )
    return c
