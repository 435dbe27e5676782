"""ALIGN-style recipe (Jia et al., 2021): the default run's towers (a convolutional image tower
and a BERT-style text tower, `mmjax.default_recipe.align_towers`) trained with the base
configuration's softmax contrastive loss, data, batch, 600 steps and evaluation, without the
default run's shape settings (colour-permuted images, partial captions, learning rate, frozen
text warm-up): the "ALIGN towers" row of the README table "What made the default run learn".

Image: open_clip's modified ResNet (`model.image.kind=resnet`, mmjax/models/resnet.py), sized
for 64 px images: one bottleneck block per stage, 16 stem channels (a 2×2×512 final map),
an 8-head attention-pool head to width 128, BatchNorm (running statistics in the train state,
frozen at evaluation). ALIGN's EfficientNet is a different CNN; the modified ResNet is the
convolutional tower this library has. Text: a bidirectional Transformer (`causal=False`,
mean-pooled over the real tokens), as BERT is, trained from scratch over byte tokens.

Run: python train.py --config configs/align.py
"""

from mmjax import config as base
from mmjax import default_recipe


def get_config():
    return default_recipe.align_towers(base.get_config())
