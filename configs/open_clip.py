"""Fine-tune an open_clip architecture (and its imported weights) on the built-in data.

Run: python -m mmjax.interop.open_clip --model-config ViT-B-32 --checkpoint W.safetensors --workdir D
     python train.py --config configs/open_clip.py:D/open_clip_config.json --config.init_from=D/params
The argument after ':' is an open_clip model-config JSON path or model name. Captions are
tokenized with CLIP's BPE (the vocabulary file of the installed open_clip package).
"""

from mmjax.interop.open_clip_config import finetune_config


def get_config(model: str = "ViT-B-32"):
    return finetune_config(model)
