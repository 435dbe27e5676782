"""VQA as answer classification on built-in scenes: two shapes (left and right column) and a
generated question ("what color is the shape on the left?", "how many red shapes are there?",
"which side is the star on?", ...), 21 answers, on the default run's towers. Two commands:

    python train.py                              (the default run, into workdirs/default)
    python train.py --config configs/vqa.py      (init_towers_from=workdirs/default)

The towers are the default run's (`mmjax/default_recipe.py`: a small ResNet image tower with
BatchNorm, a bidirectional text Transformer), loaded from its run and FROZEN
(`optim.frozen_prefixes`): contrastive pretraining gave them colour and shape features that
fine-tuning at the fusion's learning rate loses, and towers trained from scratch inside VQA
learn the colour questions only (README, VQA). Fusion: graph reasoning
(mmjax/models/graph_fusion.py): the image tokens (a grid, edges to their grid neighbours) and
the question's tokens are the nodes of one graph; two rounds of relation-typed message passing
with learned text<->image relevance edges, then an attention readout plus a question-guided
bilinear term and a sigmoid-gated sum over the image tokens that counts what matches the
question (`readout="count"`). Another run's towers: `--config.init_towers_from=DIR` (they must
be the default recipe's towers); another fusion: `--config.model.fusion.kind=cross_attention
--config.model.fusion.readout=attention`.
"""

from configs import fusion
from mmjax import default_recipe


def get_config():
    c = fusion.get_config()
    c.data.name = "shapes_vqa"
    c.data.num_train = 10000
    default_recipe.on_default_towers(c, ("image/", "text/"))  # the pretrained towers only read
    c.model.fusion.kind = "graph"
    c.model.fusion.depth = 2  # message-passing rounds
    c.model.fusion.readout = "count"
    c.total_steps = 1000
    c.eval_every = 200
    c.checkpoint_every = 200
    return c
