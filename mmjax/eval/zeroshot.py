"""Zero-shot classification from text prompts (template ensembles)."""

import numpy as np


def class_embeddings(prompt_emb_CTE: np.ndarray) -> np.ndarray:
    """One unit vector per class: the renormalised mean of its (normalised) prompt embeddings."""
    mean_CE = prompt_emb_CTE.mean(axis=1)
    return mean_CE / np.maximum(np.linalg.norm(mean_CE, axis=-1, keepdims=True), 1e-12)


def prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """All class × template prompts, class-major: prompt (c, t) is at index c * T + t."""
    return [t.format(c) for c in classnames for t in templates]


def topk_accuracy(img_NE: np.ndarray, class_CE: np.ndarray, labels_N: np.ndarray, k: int) -> float:
    """Fraction of images whose true class is among the k most similar classes."""
    if len(labels_N) == 0:
        return float("nan")
    scores_NC = img_NE @ class_CE.T
    topk_Nk = np.argsort(-scores_NC, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(topk_Nk == labels_N[:, None], axis=1)))
