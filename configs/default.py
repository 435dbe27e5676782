"""Default recipe: what `python train.py` trains without `--config` (the package's
`mmjax/default_recipe.py`): ALIGN-style towers (a small ResNet with BatchNorm, a bidirectional
text Transformer) trained contrastively on the built-in `shapes` dataset so that shape, colour
and retrieval are all learned, offline, on 2 CPU cores in under 5 minutes (bf16 matmuls).

Run: python train.py                     (this recipe)
     python train.py --config.loss=sigmoid --config.total_steps=100
Task recipes build on the base configuration `mmjax.config.get_config()` (a ViT image tower)
and override fields (see configs/siglip.py).
"""

from mmjax import default_recipe


def get_config():
    return default_recipe.get_config()
