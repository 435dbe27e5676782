"""The seed documents' first multimodal classifier as a recipe: Embedding -> LSTM for the text,
a CNN's pooled image features, Concatenate -> Dense -> softmax. On the built-in multimodal
classification data of configs/mm_classification.py (the text names the shape, the image shows
its colour; 48 (shape, colour) classes), whose Transformer/GMU recipe it sits next to.

Text: a one-layer LSTM over byte embeddings (`model.text.kind=lstm`, mmjax/models/recurrent.py),
its state at the last real token. Image: a small open_clip modified ResNet
(`model.image.kind=resnet`: one bottleneck block per stage, 16 stem channels, BatchNorm),
sized like configs/align.py. Fusion: late concatenation of the two pooled vectors -> Dense ->
GELU -> Dense (`late_concat`), then the classifier head.

Run: python train.py --config configs/seed_lstm_cnn.py
"""

from configs import fusion
from mmjax import default_recipe


def get_config():
    c = fusion.get_config()
    # The default run's image tower (not its weights): fusion's ViT depth would do nothing here.
    c.model.image = default_recipe.get_config().model.image
    c.model.text.update(kind="lstm", width=128, depth=1, embed_dim=64)
    c.model.fusion.kind = "late_concat"
    return c
