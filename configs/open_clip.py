"""Fine-tune an open_clip architecture (and its imported weights) on the built-in data.

Run: python -m mmjax.interop.open_clip --model-config ViT-B-32 --checkpoint W.safetensors --workdir D
     python train.py --config configs/open_clip.py:D/open_clip_config.json --config.init_from=D/params
The argument after ':' is an open_clip model-config JSON path or model name. Captions are
tokenized with CLIP's BPE (the vocabulary file of the installed open_clip package).
"""

from mmjax.interop.open_clip_config import load_open_clip_config, mmjax_config_from_open_clip


def get_config(model: str = "ViT-B-32"):
    config, _ = mmjax_config_from_open_clip(load_open_clip_config(model))
    config.data.tokenizer = "clip_bpe"
    config.optim.learning_rate = 1e-5  # fine-tuning pretrained weights
    config.optim.warmup_steps = 20
    return config
