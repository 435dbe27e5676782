"""Knowledge distillation: a smaller student learns from a trained default-recipe teacher.

Run: python train.py                                  (trains the teacher into workdirs/default)
     python train.py --config configs/distill.py      (distill.teacher = workdirs/default)
     python train.py --config configs/distill.py --config.distill.teacher=DIR   (another one)

The teacher has the default recipe's architecture (distill.teacher_model); its parameters come
from the newest checkpoint of the run in distill.teacher when this run starts and are never
updated (no optimizer state, no backward pass through it). The student has half the width and
depth in both towers (about 1/8 of the tower parameters) and the teacher's embed_dim, so that
embeddings can be compared directly. It learns from the captions (contrastive), from the
teacher's in-batch retrieval distributions (distill_logits, temperature distill_temperature)
and from the teacher's embeddings themselves (distill_embed, cosine).
"""

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.distill.teacher = "workdirs/default"  # train.py's workdir for the default recipe
    c.distill.teacher_model = base.get_config().model
    for tower in (c.model.image, c.model.text):
        tower.update(width=64, depth=2, num_heads=4, mlp_dim=256)
    c.objective.distill_logits = 1.0
    c.objective.distill_embed = 1.0
    return c
