"""Knowledge distillation: a small ViT student learns from a trained default-recipe teacher.

Run: python train.py                                  (trains the teacher into workdirs/default)
     python train.py --config configs/distill.py      (distill.teacher = workdirs/default)
     python train.py --config configs/distill.py --config.distill.teacher=DIR   (another one)

The teacher has the default run's architecture (distill.teacher_model: the ALIGN-style towers of
`mmjax.default_recipe`, a ResNet image tower with BatchNorm and a bidirectional text
Transformer). Its parameters and BatchNorm running statistics come from the newest checkpoint of
the run in distill.teacher when this run starts and are never updated (no optimizer state, no
backward pass through it; it normalises with the running statistics, as its run's evaluation
did). The student is the base configuration's ViT with half the width and depth in both towers
and the teacher's embed_dim, so that embeddings can be compared directly, trained with the base
configuration's settings. It learns from the captions (contrastive), from the teacher's in-batch
retrieval distributions (distill_logits, temperature distill_temperature) and from the teacher's
embeddings themselves (distill_embed, cosine).
"""

from mmjax import config as base
from mmjax import default_recipe


def get_config():
    c = base.get_config()
    c.distill.teacher = "workdirs/default"  # train.py's workdir for the default recipe
    c.distill.teacher_model = default_recipe.get_config().model
    for tower in (c.model.image, c.model.text):
        tower.update(width=64, depth=2, num_heads=4, mlp_dim=256)
    c.objective.distill_logits = 1.0
    c.objective.distill_embed = 1.0
    return c
