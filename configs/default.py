"""Default recipe: the package's base configuration (`mmjax/config.py`), a tiny CLIP trained on
the built-in `shapes` dataset, offline, on 2 CPU cores.

Run: python train.py                     (this file is the default --config)
     python train.py --config.loss=sigmoid --config.total_steps=100
Variants build on `mmjax.config.get_config()` and override fields (see configs/siglip.py).
"""

from mmjax import config as base


def get_config():
    return base.get_config()
