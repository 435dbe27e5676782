"""VQA as answer classification on built-in scenes: two shapes (left and right column) and a
generated question ("what color is the shape on the left?", "how many red shapes are there?",
"which side is the star on?", ...), 21 answers. Fusion: text layers cross-attending to the
image patches (single-stream cross-attention).

Run: python train.py --config configs/vqa.py
"""

from configs import fusion


def get_config():
    c = fusion.get_config()
    c.data.name = "shapes_vqa"
    c.data.num_train = 10000
    c.total_steps = 600
    c.eval_every = 200
    c.checkpoint_every = 200
    c.model.fusion.kind = "cross_attention"
    c.model.fusion.depth = 2
    return c
