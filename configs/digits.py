"""A tiny CLIP on real pixels: scikit-learn's 1,797 handwritten digits (8×8, upsampled to
32 px), captioned in English and Chinese, offline.

Run: python train.py --config configs/digits.py
Evaluates zero-shot digit classification from prompt templates, image↔text retrieval with
all 7 captions of each image, and a 10-shot linear probe on the frozen image features.
"""

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.data.name = "digits"
    c.data.image_size = 32
    c.data.text_length = 40  # longest caption: 27 bytes ("the digit 7 written by hand")
    c.model.image.patch_size = 4  # 8×8 patches of 4×4 px, as many tokens as the shapes model
    c.total_steps = 600
    c.eval_every = 200
    # The random-text warm start helps shapes learn position and size (see README); digits
    # have one attribute, so the text tower trains from the first step.
    c.optim.text_frozen_steps = 0
    c.eval.tasks = ("zeroshot:digits", "retrieval:digits", "linear_probe:digits")
    return c
