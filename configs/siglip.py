"""The base configuration's tiny CLIP (ViT image tower, `mmjax/config.py`) trained with the SigLIP
sigmoid loss instead of the softmax InfoNCE loss."""

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.loss = "sigmoid"
    return c
