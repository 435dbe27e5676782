"""Captioning, CoCa-style, on the built-in shapes captions: the contrastive towers plus a causal
decoder cross-attending to the image patches, trained on the weighted sum of both losses;
evaluated by greedy and beam-search decoding (BLEU-4, and whether the generated caption names
the image's colour, shape, size and position).

Run: python train.py --config configs/captioning.py
"""

import ml_collections

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.task = "captioning"
    c.total_steps = 600
    c.eval_every = 300  # decoding is the expensive part of an evaluation
    c.optim.text_frozen_steps = 0  # the decoder needs the caption signal from step 0
    # Mostly the canonical description, so there is one caption style to learn to generate.
    c.data.first_caption_prob = 0.8
    c.captioning = ml_collections.ConfigDict(
        dict(
            contrastive_weight=1.0,
            caption_weight=1.0,
            decoder_depth=2,  # width, heads and MLP as the text tower's
            beam_size=3,
            eval_examples=300,  # validation images captioned at each evaluation
        )
    )
    return c
