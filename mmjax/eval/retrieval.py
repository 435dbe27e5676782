"""Image↔text retrieval recall@K, with one caption or several per image.

Everything here reduces to one ranking rule (`positive_ranks`): a query's rank is the number of
*non-matching* gallery items that score at least as high as its best matching item. Ties are
thus broken against the query (an equal-scoring competitor ranks ahead), so degenerate,
collapsed embeddings never inflate recall; and when a query has several matches (an image and
its captions) it is a hit at K as soon as any one of them is in the top K.
"""

from collections.abc import Callable, Sequence

import numpy as np

# Query rows scored at once: bounds the [rows, gallery] score matrix (COCO's 25k captions ×
# 1024 rows is 100 MB of float32) while keeping the matmul large enough to be efficient.
_QUERY_CHUNK = 1024


def ranks_from_match(
    query_QE: np.ndarray,
    gallery_GE: np.ndarray,
    match_rows: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """int [Q]: for each query, how many gallery items that do *not* match it score at least
    as high (dot product) as the best gallery item that does. 0 = a match ranks first.

    `match_rows(start, stop)` is the bool [stop - start, G] match matrix of those queries
    (computed per chunk, so it never exists whole). Every query must have a match.
    """
    # Equal gallery rows (one caption text owned by many images) must tie exactly, but a BLAS
    # matmul may compute equal columns through different kernels (vector body vs remainder)
    # and differ in the last bit; scoring each distinct row once makes their scores identical.
    distinct_UE, column_G = np.unique(gallery_GE, axis=0, return_inverse=True)
    column_G = column_G.reshape(-1)  # numpy 2.0.x returns it with an extra axis
    ranks = np.empty(len(query_QE), dtype=np.int64)
    for start in range(0, len(query_QE), _QUERY_CHUNK):
        stop = min(start + _QUERY_CHUNK, len(query_QE))
        scores_QG = (query_QE[start:stop] @ distinct_UE.T)[:, column_G]
        match_QG = match_rows(start, stop)
        if not match_QG.any(axis=1).all():
            missing = start + int(np.argmin(match_QG.any(axis=1)))
            raise ValueError(f"query {missing} has no match")
        best_Q = np.where(match_QG, scores_QG, -np.inf).max(axis=1)
        ranks[start:stop] = np.sum((scores_QG >= best_Q[:, None]) & ~match_QG, axis=1)
    return ranks


def positive_ranks(
    query_QE: np.ndarray,
    gallery_GE: np.ndarray,
    query_ids_Q: np.ndarray,
    gallery_ids_G: np.ndarray,
) -> np.ndarray:
    """`ranks_from_match` where query q matches gallery item g iff
    `query_ids_Q[q] == gallery_ids_G[g]`."""
    query_ids_Q = np.asarray(query_ids_Q)
    gallery_ids_G = np.asarray(gallery_ids_G)
    if len(query_ids_Q) != len(query_QE) or len(gallery_ids_G) != len(gallery_GE):
        raise ValueError("need one id per query row and one per gallery row")
    return ranks_from_match(
        query_QE, gallery_GE, lambda a, b: query_ids_Q[a:b, None] == gallery_ids_G[None, :]
    )


def recall_from_ranks(ranks_Q: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    return {k: float(np.mean(ranks_Q < k)) for k in ks}


def recall_at_k(query_QE: np.ndarray, gallery_GE: np.ndarray, targets_Q: np.ndarray, ks) -> dict:
    """For each query, whether its one target gallery index ranks in the top k by similarity
    (ties against the query, see the module doc)."""
    ranks = positive_ranks(query_QE, gallery_GE, np.asarray(targets_Q), np.arange(len(gallery_GE)))
    return recall_from_ranks(ranks, ks)


def retrieval_metrics(img_NE: np.ndarray, txt_NE: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Row i of `img_NE` and `txt_NE` is a pair. Returns retrieval/{i2t,t2i}/r{k}."""
    idx = np.arange(len(img_NE))
    out = {}
    for k, v in recall_at_k(img_NE, txt_NE, idx, ks).items():
        out[f"retrieval/i2t/r{k}"] = v
    for k, v in recall_at_k(txt_NE, img_NE, idx, ks).items():
        out[f"retrieval/t2i/r{k}"] = v
    return out


def multi_caption_recall(
    img_NE: np.ndarray,
    txt_ME: np.ndarray,
    caption_image_M: np.ndarray,
    caption_text_M: np.ndarray | None = None,
    ks=(1, 5, 10),
) -> dict[str, float]:
    """Recall@K when image `caption_image_M[m]` owns caption m (each image any number of
    captions). Returns {"i2t_r{k}", "t2i_r{k}"}.

    image→text: one query per image that has a caption; a hit at K if any of its captions ranks
    in the top K. text→image: one query per caption; a hit at K if its image is in the top K.
    Images without captions still compete in the text→image gallery.

    `caption_text_M` (ids of distinct caption texts) makes a caption *text* the unit of
    relevance: two images captioned with the same words (templated captions, "a dog") both
    match that text, so image→text counts the text among each of its owners' captions and
    text→image accepts any image that owns it. Without it, captions match only their own image,
    the standard protocol for datasets whose captions are unique (COCO, Flickr30k).
    """
    caption_image_M = np.asarray(caption_image_M)
    n = len(img_NE)
    if caption_text_M is None:
        caption_text_M = np.arange(len(txt_ME))
    caption_text_M = np.asarray(caption_text_M)
    # owns_NU[i, u]: image i has a caption with text u.
    num_texts = int(caption_text_M.max()) + 1 if len(caption_text_M) else 0
    owns_NU = np.zeros((n, num_texts), dtype=bool)
    owns_NU[caption_image_M, caption_text_M] = True
    has_caption = owns_NU.any(axis=1)
    owns_caption_NM = owns_NU[:, caption_text_M]  # image i owns the text of caption m
    queries = np.flatnonzero(has_caption)
    i2t = ranks_from_match(img_NE[queries], txt_ME, lambda a, b: owns_caption_NM[queries[a:b]])
    t2i = ranks_from_match(txt_ME, img_NE, lambda a, b: owns_caption_NM[:, a:b].T)
    out = {f"i2t_r{k}": v for k, v in recall_from_ranks(i2t, ks).items()}
    out.update({f"t2i_r{k}": v for k, v in recall_from_ranks(t2i, ks).items()})
    return out
