"""Judging a text→image model on prompts of held-out `shapes` compositions (a colour and shape
never seen together in training, `shapes.HELDOUT_PAIRS`).

Prompt i names held-out pair i mod 8 with a size and position drawn from a generator seeded by
i (the canonical caption, e.g. "a small purple hexagon on the left"); every prompt is sampled
`samples` times. The judge (`image_judge`, not the generator) reads each image's attributes;
the accuracy of each is the fraction of samples that show what the prompt asked for.
`score` is the mean of the colour and position accuracies (the attributes the pixels measure
directly; the task's `task/score`), `CHANCE` the same mean for guessing (1/8, 1/9).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding

from mmjax.data.builtin import shapes
from mmjax.eval import image_judge
from mmjax.eval.embed import jit_encoder, predict_all
from mmjax.models.image_sampling import Sampling
from mmjax.models.text_to_image import TextToImage, generate

SCORED = ("color", "position")
CHANCE = float(np.mean([image_judge.CHANCE[a] for a in SCORED]))


def heldout_prompts(count: int, language: str = "en") -> tuple[list[str], dict[str, np.ndarray]]:
    """(`count` canonical captions of held-out compositions, their attributes {name: [count]});
    language "zh": the same compositions as Chinese full descriptions."""
    pairs = sorted(shapes.HELDOUT_PAIRS, key=lambda p: (p[1], p[0]))
    prompts, wanted = [], {a: [] for a in image_judge.ATTRIBUTES}
    for i in range(count):
        shape, color = pairs[i % len(pairs)]
        rng = np.random.default_rng([0x7E57, i])
        size, position = int(rng.integers(len(shapes.SIZES))), int(rng.integers(9))
        attrs = shapes.Attributes(shape, color, size, position)
        prompts.append(shapes.canonical_caption(attrs, language))
        for a in image_judge.ATTRIBUTES:
            wanted[a].append(getattr(attrs, a))
    return prompts, {a: np.array(v) for a, v in wanted.items()}


def sampling_of(t2i) -> Sampling:
    """The sampling settings of a `text_to_image` config section."""
    return Sampling(float(t2i.temperature), int(t2i.top_k), float(t2i.top_p), float(t2i.guidance))


class Generator:
    """`(params, tokens [M, L], seed) -> uint8 images [M, S, S, 3]` on the training mesh, in
    batches of `batch_size` rows (each batch's key is fold_in(key(seed), its first row), so
    the images depend on the prompts, the seed and the batch size only)."""

    def __init__(self, model: TextToImage, sharding: NamedSharding, sampling, uncond_L, batch):
        self._sharding, self._batch = sharding, batch

        def images(params, inputs):
            key = jax.random.fold_in(jax.random.key(inputs["seed"][0]), inputs["row"][0])
            return generate(model, params, inputs["tokens"], key, sampling, uncond_L)[1]

        self._fn = jit_encoder(images, sharding)

    def __call__(self, params, tokens_ML: np.ndarray, seed: int) -> np.ndarray:
        m = len(tokens_ML)
        inputs = {
            "tokens": tokens_ML,
            "row": np.arange(m, dtype=np.int32),
            "seed": np.full(m, seed, np.int32),
        }
        return predict_all(self._fn, params, inputs, self._batch, self._sharding)


def judged(images_MSS3: np.ndarray, wanted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{attribute: bool [M]}: whether each image shows the wanted attribute."""
    predicted = image_judge.fitted_judge(images_MSS3.shape[1]).predict(images_MSS3)
    return {a: predicted[a] == wanted[a] for a in image_judge.ATTRIBUTES}


class HeldoutEvaluator:
    """`params -> {text_to_image/<attribute>: accuracy}` over `text_to_image.eval_prompts`
    held-out prompts × `eval_samples` samples each (no reranking: every sample counts)."""

    def __init__(self, config, model: TextToImage, sharding, tokenizer):
        t2i = config.text_to_image
        prompts, wanted = heldout_prompts(int(t2i.eval_prompts))
        k = int(t2i.eval_samples)
        self._tokens = np.repeat(tokenizer.encode(prompts), k, axis=0)
        self._wanted = {a: np.repeat(v, k) for a, v in wanted.items()}
        uncond_L = tokenizer.encode([""])[0]
        self._generate = Generator(
            model, sharding, sampling_of(t2i), uncond_L, config.eval.batch_size
        )
        self._seed = int(config.seed)

    def __call__(self, params) -> dict[str, float]:
        images = self._generate(params, self._tokens, self._seed)
        hits = judged(images, self._wanted)
        return {f"text_to_image/{a}": float(np.mean(v)) for a, v in hits.items()}


def score(metrics: dict[str, float]) -> float:
    """The mean accuracy of the SCORED attributes in `HeldoutEvaluator`'s metrics."""
    return float(np.mean([metrics[f"text_to_image/{a}"] for a in SCORED]))
