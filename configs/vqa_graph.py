"""VQA (configs/vqa.py) with graph reasoning fusion: the image patches (an 8x8 grid, edges to
their grid neighbours) and the question's tokens are the nodes of one graph; two rounds of
relation-typed message passing with learned text<->image relevance edges, then an attention
readout (mmjax/models/graph_fusion.py).

Run: python train.py --config configs/vqa_graph.py
"""

from configs import vqa


def get_config():
    c = vqa.get_config()
    c.model.fusion.kind = "graph"
    c.model.fusion.depth = 2  # message-passing rounds
    return c
