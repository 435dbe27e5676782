"""The default recipe with a VSE++ triplet term next to the contrastive loss.

Run: python train.py --config configs/triplet.py
The triplet term (objective.triplet, margin objective.triplet_margin on cosine similarity) takes
the hardest in-batch negative of every image and every caption: a hinge that only cares about
the one most confusable pair, where InfoNCE spreads its gradient over all negatives.
"""

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.objective.triplet = 1.0
    c.objective.triplet_margin = 0.2
    return c
