"""A judge of generated `shapes` images that is not the generator: which colour, position, size
and shape an image shows, read from its pixels and from ground-truth renders.

The object is what stands out from the background: the background colour is the median of the
image's border, and a pixel's distance from it, over the image's 99th percentile of that
distance, is its coverage (anti-aliased edges and blurry samples get partial coverage).
- colour: the mean of the well-covered pixels (coverage > 0.75), nearest `shapes.COLOR_RGB`;
- position: the coverage-weighted centroid, in the 3×3 grid;
- size: the covered area (coverage > 0.5), nearest class mean of log-area on ground-truth
  renders (supervised: the areas come from `shapes.render`, not from the formulas);
- shape: a k-nearest-neighbour classifier (k = 5, cosine) over the coverage in a box around
  the centroid scaled to the object's size, resampled to 16×16, fitted on ground-truth renders
  of the `shapes` train split.

`Judge.fit(image_size)` renders the references (~1 s for 1,200 at 64 px);
`judge.predict(images_MSS3)` returns {attribute: int [M]}. The accuracy of the judge itself on
ground-truth validation renders is what `tests/test_text_to_image.py` checks.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from PIL import Image

from mmjax.data.builtin import shapes

ATTRIBUTES = ("color", "position", "size", "shape")
# The accuracy of guessing each attribute (uniform classes).
CHANCE = {
    "color": 1 / len(shapes.COLORS),
    "position": 1 / len(shapes.POSITIONS),
    "size": 1 / len(shapes.SIZES),
    "shape": 1 / len(shapes.SHAPES),
}
_CROP = 16  # side of the shape features
_K = 5


def coverage(images_MSS3: np.ndarray) -> np.ndarray:
    """float32 [M, S, S] in [0, 1]: how much each pixel belongs to the object."""
    x = images_MSS3.astype(np.float32)
    border = np.concatenate(
        [x[:, 0], x[:, -1], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1
    )  # [M, 4S-4, 3]
    background_M3 = np.median(border, axis=1)
    dist_MSS = np.linalg.norm(x - background_M3[:, None, None], axis=-1)
    top_M = np.percentile(dist_MSS.reshape(len(x), -1), 99, axis=1)
    return np.clip(dist_MSS / np.maximum(top_M, 1e-3)[:, None, None], 0.0, 1.0)


def _centroids(cov_MSS: np.ndarray) -> np.ndarray:
    """[M, 2] (row, col) coverage-weighted centroids of the well-covered pixels."""
    w = np.where(cov_MSS > 0.5, cov_MSS, 0.0)
    s = cov_MSS.shape[1]
    grid = np.arange(s, dtype=np.float32) + 0.5
    total = np.maximum(w.sum(axis=(1, 2)), 1e-6)
    rows = (w.sum(axis=2) * grid).sum(axis=1) / total
    cols = (w.sum(axis=1) * grid).sum(axis=1) / total
    return np.stack([rows, cols], axis=1)


def _shape_features(cov_MSS: np.ndarray, centers_M2: np.ndarray, area_M: np.ndarray):
    """[M, 16·16] unit-norm, centred coverage in a box of side ~2.6·√area around the centroid."""
    feats = []
    for cov, (r, c), area in zip(cov_MSS, centers_M2, area_M, strict=True):
        half = max(2.0, 1.3 * np.sqrt(max(area, 1.0)))
        box = (c - half, r - half, c + half, r + half)  # PIL: (left, upper, right, lower)
        image = Image.fromarray(cov.astype(np.float32), mode="F")
        crop = image.transform(
            (_CROP, _CROP), Image.Transform.EXTENT, box, Image.Resampling.BILINEAR
        )
        f = np.asarray(crop, dtype=np.float32).reshape(-1)
        f = f - f.mean()
        feats.append(f / max(np.linalg.norm(f), 1e-6))
    return np.stack(feats)


def _measure(images_MSS3: np.ndarray):
    cov = coverage(images_MSS3)
    area = (cov > 0.5).sum(axis=(1, 2)).astype(np.float32)
    centers = _centroids(cov)
    return cov, area, centers


@dataclasses.dataclass(frozen=True)
class Judge:
    image_size: int
    log_area_by_size: np.ndarray  # [3] class means of log(area / S²) on references
    shape_bank: np.ndarray  # [R, 256] reference features
    shape_labels: np.ndarray  # [R]

    @classmethod
    def fit(cls, image_size: int, references: int = 1200, seed: int = 12345) -> Judge:
        """Fits the size and shape parts on `references` ground-truth train-split renders."""
        images, labels = reference_renders(image_size, references, seed)
        cov, area, centers = _measure(images)
        log_area = np.log(np.maximum(area, 1.0) / image_size**2)
        means = np.array([log_area[labels["size"] == k].mean() for k in range(len(shapes.SIZES))])
        bank = _shape_features(cov, centers, area)
        return cls(image_size, means, bank, labels["shape"])

    def predict(self, images_MSS3: np.ndarray) -> dict[str, np.ndarray]:
        """{attribute: int class indices [M]} of uint8 images [M, S, S, 3] at the fitted size."""
        if images_MSS3.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"the judge reads {self.image_size} px RGB images, got {images_MSS3.shape}"
            )
        cov, area, centers = _measure(images_MSS3)
        x = images_MSS3.astype(np.float32)
        strong = (cov > 0.75)[..., None]
        mean_M3 = (x * strong).sum(axis=(1, 2)) / np.maximum(strong.sum(axis=(1, 2)), 1)
        color = np.argmin(
            np.linalg.norm(mean_M3[:, None] - shapes.COLOR_RGB[None], axis=-1), axis=1
        )
        cell = np.clip((centers / (self.image_size / 3)).astype(int), 0, 2)
        position = 3 * cell[:, 0] + cell[:, 1]
        log_area = np.log(np.maximum(area, 1.0) / self.image_size**2)
        size = np.argmin(np.abs(log_area[:, None] - self.log_area_by_size[None]), axis=1)
        sims = _shape_features(cov, centers, area) @ self.shape_bank.T
        nearest = np.argsort(-sims, axis=1)[:, :_K]
        votes = self.shape_labels[nearest]
        shape = np.array([np.bincount(v, minlength=len(shapes.SHAPES)).argmax() for v in votes])
        return {"color": color, "position": position, "size": size, "shape": shape}


def reference_renders(image_size: int, count: int, seed: int, split: str = "train"):
    """(uint8 images [count, S, S, 3], {attribute: int [count]}) rendered by `shapes`."""
    images, labels = [], {a: [] for a in ATTRIBUTES}
    for i in range(count):
        image, _, attrs = shapes.generate_example(split, i, image_size=image_size, seed=seed)
        images.append(image)
        for a in ATTRIBUTES:
            labels[a].append(getattr(attrs, a))
    return np.stack(images), {a: np.array(v) for a, v in labels.items()}


@functools.lru_cache(maxsize=4)
def fitted_judge(image_size: int) -> Judge:
    """The judge for `image_size` px images, fitted once per process."""
    return Judge.fit(image_size)


def accuracies(predicted: dict[str, np.ndarray], wanted: dict[str, np.ndarray]) -> dict:
    """{attribute: fraction of images whose predicted class is the wanted one}."""
    return {a: float(np.mean(predicted[a] == wanted[a])) for a in ATTRIBUTES}
