"""Few-shot linear probes: logistic regression on frozen, L2-normalised image embeddings.

K examples per class ("shots") are drawn from the train split, deterministically from a seed
(`config.seed`); K more per class from the same draw, disjoint from the shots, form the held-out
part that picks the inverse regularisation strength C from a small log grid. The final probe is
fit on the K shots only, and the test split is only ever predicted, never used for a choice, so
the reported accuracy is an honest K-shot number.

These functions know nothing of datasets or models: the `linear_probe:DATASET[:SPLIT]`
evaluator of `mmjax.eval.evaluators` feeds them embeddings.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

# Inverse regularisation strengths tried. Unit-norm features give small logits, so the useful
# range sits above the usual C=1; one point per decade keeps the search to six fits.
C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-2, 4))
# Examples read per call while drawing shots: large enough to amortise the source's per-call
# overhead, small enough that a balanced dataset stops soon after every class is full.
_DRAW_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class FewShotDraw:
    """Train-split rows (indices) for fitting and for choosing C, and their labels."""

    shots: np.ndarray
    shot_labels: np.ndarray
    heldout: np.ndarray
    heldout_labels: np.ndarray


def draw_few_shot(
    source,
    shots: int,
    *,
    heldout: int,
    seed: int,
    num_classes: int | None = None,
) -> FewShotDraw:
    """Visits the train split `source` in a seeded random order and keeps, per class, the first
    `shots` examples as training shots and the next `heldout` for choosing C.

    With `num_classes` known it stops as soon as every class is full, so a large split (ImageNet)
    is read only as far as needed; otherwise it reads the whole split. A class with fewer
    examples gets what there is (shots first).
    """
    if shots < 1 or heldout < 0:
        raise ValueError(f"need shots >= 1 and heldout >= 0, got {shots=} {heldout=}")
    order = np.random.default_rng(seed).permutation(len(source))
    per_class = shots + heldout
    taken: dict[int, int] = {}  # label -> examples kept so far
    shot_rows, shot_labels, held_rows, held_labels = [], [], [], []
    for start in range(0, len(order), _DRAW_CHUNK):
        rows = order[start : start + _DRAW_CHUNK].tolist()
        for row, example in zip(rows, source.__getitems__(rows), strict=True):
            label = int(example["label"])
            count = taken.get(label, 0)
            if count < shots:
                shot_rows.append(row)
                shot_labels.append(label)
            elif count < per_class:
                held_rows.append(row)
                held_labels.append(label)
            taken[label] = count + 1
        if num_classes is not None and len(taken) >= num_classes:
            if min(taken.values()) >= per_class:
                break
    arrays = (shot_rows, shot_labels, held_rows, held_labels)
    return FewShotDraw(*(np.asarray(a, dtype=np.int64) for a in arrays))


def _fit(features: np.ndarray, labels: np.ndarray, c: float) -> LogisticRegression:
    # lbfgs minimises the multinomial (softmax) cross-entropy for more than two classes, the
    # standard CLIP probe. A few-shot fit at large C may stop short of full convergence; its
    # predictions are still what the held-out set judges, so the warning is only noise.
    model = LogisticRegression(C=c, solver="lbfgs", max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(features, labels)
    return model


def select_c(
    shot_x: np.ndarray,
    shot_y: np.ndarray,
    heldout_x: np.ndarray,
    heldout_y: np.ndarray,
    grid: Sequence[float] = C_GRID,
) -> float:
    """The C of `grid` whose probe, fit on the shots, is most accurate on the held-out train
    examples; ties go to the smallest C (the strongest regularisation). Only train-split
    features ever reach this function."""
    if len(heldout_y) == 0:
        raise ValueError(
            "no held-out train examples to choose C with; the train split is too small"
        )
    accuracies = [np.mean(_fit(shot_x, shot_y, c).predict(heldout_x) == heldout_y) for c in grid]
    return float(grid[int(np.argmax(accuracies))])


def linear_probe(
    shot_x: np.ndarray,
    shot_y: np.ndarray,
    heldout_x: np.ndarray,
    heldout_y: np.ndarray,
    test_x: np.ndarray,
) -> tuple[np.ndarray, float]:
    """(test predictions, chosen C): C by `select_c` on train data, then one fit on the shots."""
    if len(np.unique(shot_y)) < 2:
        raise ValueError("the few-shot draw holds a single class; a probe needs at least two")
    c = select_c(shot_x, shot_y, heldout_x, heldout_y)
    return _fit(shot_x, shot_y, c).predict(test_x), c
