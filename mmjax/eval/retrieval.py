"""Image↔text retrieval recall@K."""

import numpy as np


def recall_at_k(query_QE: np.ndarray, gallery_GE: np.ndarray, targets_Q: np.ndarray, ks) -> dict:
    """For each query, whether its target gallery index ranks in the top k by cosine similarity.

    Ties are broken against the query (a competitor with an equal score ranks ahead), so recall is
    never inflated by degenerate, collapsed embeddings.
    """
    scores_QG = query_QE @ gallery_GE.T
    target_score_Q = scores_QG[np.arange(len(targets_Q)), targets_Q]
    rank_Q = np.sum(scores_QG >= target_score_Q[:, None], axis=1) - 1  # 0 = best
    return {k: float(np.mean(rank_Q < k)) for k in ks}


def retrieval_metrics(img_NE: np.ndarray, txt_NE: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Row i of `img_NE` and `txt_NE` is a pair. Returns retrieval/{i2t,t2i}/r{k}."""
    idx = np.arange(len(img_NE))
    out = {}
    for k, v in recall_at_k(img_NE, txt_NE, idx, ks).items():
        out[f"retrieval/i2t/r{k}"] = v
    for k, v in recall_at_k(txt_NE, img_NE, idx, ks).items():
        out[f"retrieval/t2i/r{k}"] = v
    return out
