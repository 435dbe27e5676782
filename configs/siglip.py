"""The default recipe trained with the SigLIP sigmoid loss instead of the softmax InfoNCE loss."""

from configs import default


def get_config():
    c = default.get_config()
    c.loss = "sigmoid"
    return c
