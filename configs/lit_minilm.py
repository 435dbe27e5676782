"""LiT: a frozen pretrained text tower (all-MiniLM-L6-v2) and an image tower trained to match it.

Run: python train.py --config configs/lit_minilm.py       (needs: pip install -e ".[interop]")
The text tower is the packaged sentence-transformers MiniLM (6 layers, width 384, mean pooling),
loaded from safetensors at the start of the run and never updated: its parameters have no
optimizer state and no backward pass runs through it. Only the image tower, the text projection
and the temperature train. Captions are tokenized with MiniLM's own WordPiece vocabulary.
"""

from mmjax import config as base


def get_config():
    from mmjax.interop import hf

    c = base.get_config()
    c.model.text.kind = "hf_bert"
    c.model.text.hf_dir = ""  # "" = the packaged all-MiniLM-L6-v2
    c.model.text.frozen = True
    c.model.text.eot_id = 102  # [SEP]; WordPiece pads with [PAD] = 0
    c.model.text.pad_id = 0
    c.optim.frozen_prefixes = ("text/",)
    c.optim.text_frozen_steps = 0  # the tower is frozen for the whole run
    c.data.tokenizer = "wordpiece"
    c.data.tokenizer_path = str(hf.minilm_dir())
    c.data.text_length = 32
    return c
