"""Multimodal classification on built-in data: the text names the shape (English or Chinese),
the image shows it in a colour, and the label is the (shape, colour) pair (48 classes), so
both modalities are needed. Fusion: gated multimodal unit over the pooled towers.

Run: python train.py --config configs/mm_classification.py
     python train.py --config configs/mm_classification.py --config.model.fusion.kind=low_rank
"""

from configs import fusion


def get_config():
    c = fusion.get_config()
    c.model.fusion.kind = "gmu"
    return c
