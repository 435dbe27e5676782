"""Zero-shot classification from text prompts (template ensembles)."""

import numpy as np

from mmjax.eval import retrieval

# Used for datasets without a prompts file in mmjax/data/prompts.
GENERIC_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of the {}.",
    "a blurry photo of a {}.",
    "a drawing of a {}.",
)


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


def true_class_ranks(img_NE: np.ndarray, prompt_emb_CTE: np.ndarray, labels_N: np.ndarray):
    """int [N]: each image's true-class rank (0 = top-1). A class embedding is the renormalised
    mean of its templates' embeddings; ties count against the image, as in retrieval."""
    class_CE = class_embeddings(prompt_emb_CTE)
    return retrieval.positive_ranks(img_NE, class_CE, labels_N, np.arange(len(class_CE)))


def topk_accuracies(ranks_N: np.ndarray, num_classes: int) -> dict[str, float]:
    """top1, and top5 where there are at least 5 classes (else it is trivially 1)."""
    return {f"top{k}": float(np.mean(ranks_N < k)) for k in (1, 5) if k == 1 or num_classes >= k}
