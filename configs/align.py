"""ALIGN-style recipe (Jia et al., 2021): a convolutional image tower and a BERT-style text tower
trained with the softmax contrastive loss, on the built-in `shapes` data, in the default run's
format (the same data, batch, steps (600), loss and evaluation as configs/default.py: 2.4 min
here, about as long as the default run).

Image: open_clip's modified ResNet (`model.image.kind=resnet`, mmjax/models/resnet.py), sized
for 64 px images: one bottleneck block per stage, 16 stem channels (a 2×2×512 final map),
an 8-head attention-pool head to width 128, BatchNorm (running statistics in the train state,
frozen at evaluation). ALIGN's EfficientNet is a different CNN; the modified ResNet is the
convolutional tower this library has. Text: a bidirectional Transformer (`causal=False`,
mean-pooled over the real tokens), as BERT is, trained from scratch over byte tokens.

Run: python train.py --config configs/align.py
"""

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.model.image.update(kind="resnet", layers=(1, 1, 1, 1), resnet_width=16, num_heads=8)
    c.model.image.norm = "batch"
    c.model.text.causal = False
    return c
