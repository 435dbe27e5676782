"""VQA (configs/vqa.py) with graph reasoning fusion: the image tokens (a grid, edges to their
grid neighbours) and the question's tokens are the nodes of one graph; two rounds of
relation-typed message passing with learned text<->image relevance edges, then an attention
readout plus a question-guided bilinear term (`readout="question"`,
mmjax/models/graph_fusion.py).

The towers are configs/align.py's (a small ResNet image tower, a 4-layer bidirectional text
tower), so they can start from an ALIGN run: contrastive pretraining aligns colour words with
image colours, which the existence and counting questions compare. Two commands:

    python train.py --config configs/align.py --workdir runs/align
    python train.py --config configs/vqa_graph.py --config.init_towers_from=runs/align

Without `init_towers_from` the towers start from scratch (README, VQA: the relational
questions then stay at their blind baselines in this budget).
"""

from configs import align, vqa


def get_config():
    c = vqa.get_config()
    c.model.image = align.get_config().model.image  # the ResNet tower init_towers_from loads
    c.model.text.depth = align.get_config().model.text.depth
    c.model.fusion.kind = "graph"
    c.model.fusion.depth = 2  # message-passing rounds
    c.model.fusion.readout = "question"
    return c
