"""Captioning, CoCa-style, on the built-in shapes captions, on the default run's towers: a
causal decoder cross-attending to the image tokens, trained on the weighted sum of the
contrastive and caption losses; evaluated by greedy and beam-search decoding (BLEU-4, and
whether the generated caption names the image's colour, shape, size and position). Two commands:

    python train.py                                  (the default run, into workdirs/default)
    python train.py --config configs/captioning.py   (init_towers_from=workdirs/default)

The towers are the default run's (`mmjax/default_recipe.py`: a small ResNet image tower with
BatchNorm, a bidirectional text Transformer), loaded with their BatchNorm statistics and FROZEN
(`optim.frozen_prefixes`): the decoder reads image tokens that already tell shapes apart. The
beam caption names the shape 0.79 of the time, BLEU-4 0.872, in 503 CPU s on a 2-core AMX host
(0.77 / 0.863 in 346 CPU s on an earlier host and towers; the base config's ViT trained inside
captioning: 0.22, 0.594; README, "Carried to captioning and matching").
Another run's towers: `--config.init_towers_from=DIR` (they must be the default recipe's
towers); the base towers trained in the run: `on_base_towers()`.
"""

import ml_collections

from mmjax import config as base
from mmjax import default_recipe


def on_base_towers():
    """The task's settings on the base config's towers (a ViT and a causal text Transformer,
    trained in the run, no BatchNorm): what the tests' small captioners build on."""
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


def get_config():
    # The pretrained towers only read; the contrastive term trains the projections and the
    # temperature.
    return default_recipe.on_default_towers(on_base_towers(), ("image/", "text/"))
