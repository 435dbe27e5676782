"""Text→image generation, DALL-E style: a decoder-only Transformer prior over [caption tokens;
image tokens], the image tokens being the codes of a frozen image tokenizer trained first
(`task=image_tokenizer`), read from `config.image_tokenizer_from` (its run directory).

Loss: `text_to_image.text_weight` · text cross-entropy + `text_to_image.image_weight` · image
cross-entropy (DALL-E: 1/8 and 7/8; `train/loss/text`, `train/loss/image`). With probability
`text_to_image.text_drop_prob` an example's caption is replaced by the empty one, so the same
model is also the unconditional prior that classifier-free guidance needs.

Evaluated (`mmjax.eval.generated_images`) on prompts of held-out colour–shape compositions,
`eval_samples` samples each with the config's sampling settings, judged from the pixels:
`text_to_image/{color,position,size,shape}`; `task/score` the mean of colour and position
accuracy, `task/chance` that of guessing. `python -m mmjax.generate` samples, reranks and judges
a trained run.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses
from mmjax.data import pipeline
from mmjax.errors import ConfigError
from mmjax.eval import generated_images
from mmjax.eval.generated_images import HeldoutEvaluator, sampling_of
from mmjax.models.image_prior import TextImagePrior
from mmjax.models.text_to_image import TextToImage
from mmjax.tasks.contrastive_objective import weigh
from mmjax.train import pretrained
from mmjax.train.task import Task, headline
from mmjax.train.validate import refuse_overrides

MAKE_TOKENIZER = "python train.py --config configs/image_tokenizer.py --workdir WORKDIR"
# Settings of the base config this task never reads: changing one would do nothing.
_UNREAD_MODEL = ("model.image", "model.embed_dim")
_UNUSED = (*_UNREAD_MODEL, "eval.tasks", "init_towers_from")


@functools.lru_cache(maxsize=4)
def _tokenizer_run(workdir: str):
    from mmjax.tasks.image_tokenizer import load_image_tokenizer

    return load_image_tokenizer(workdir)


def image_tokenizer(config):
    """(VQVAE, its variables) of `config.image_tokenizer_from`; ConfigError naming the command
    that makes one when it is unset or not an image tokenizer run."""
    workdir = config.get("image_tokenizer_from", "")
    if not workdir:
        raise ConfigError(
            f"image_tokenizer_from is not set; train an image tokenizer first ({MAKE_TOKENIZER})"
            " and set --config.image_tokenizer_from=WORKDIR"
        )
    return _tokenizer_run(os.path.abspath(workdir))


@dataclasses.dataclass(frozen=True)
class TextToImageObjective:
    model: TextToImage
    weights: dict
    drop_prob: float
    empty_L: np.ndarray  # the unconditional (empty) caption's tokens
    pad_id: int
    seed: int

    def __call__(self, params, batch, step):
        text_BL = batch["tokens"]
        if self.drop_prob > 0:
            key = jax.random.fold_in(jax.random.key(self.seed), step)
            drop_B = jax.random.bernoulli(key, self.drop_prob, (text_BL.shape[0],))
            text_BL = jnp.where(drop_B[:, None], jnp.asarray(self.empty_L)[None], text_BL)
        text_logits, image_logits, codes_BN = self.model.apply(
            {"params": params}, batch["image"], text_BL
        )
        terms = {
            "text": losses.text_nll(text_logits, text_BL, self.pad_id),
            "image": losses.image_nll(image_logits, codes_BN),
        }
        accuracy = jnp.mean(jnp.argmax(image_logits, axis=-1) == codes_BN)
        return weigh(terms, self.weights, {"train/image_token_accuracy": accuracy})


class TextToImageTask(Task):
    name = "text_to_image"
    metric_name = "color_position"
    draws_captions = True  # pipeline.caption_batches
    unread_model_settings = _UNREAD_MODEL

    def validate(self, config):
        if "text_to_image" not in config:
            raise ConfigError(
                "task=text_to_image needs the text_to_image section of its recipe; "
                "use --config configs/text_to_image.py"
            )
        refuse_overrides(config, _UNUSED, f"task={self.name} has its own model")
        if config.optim.text_frozen_steps > 0:
            raise ConfigError(
                f"optim.text_frozen_steps={config.optim.text_frozen_steps}: task={self.name} "
                "has no text tower to freeze; set it to 0"
            )
        if config.data.name != "shapes":  # the judge reads shapes' attributes
            raise ConfigError(
                f"task={self.name} trains and is judged on data.name='shapes', got "
                f"{config.data.name!r}"
            )
        t = config.text_to_image
        if not 0.0 <= t.text_drop_prob < 1.0 or min(t.text_weight, t.image_weight) < 0:
            raise ConfigError(
                "text_to_image.text_drop_prob must be in [0, 1) and text_weight, image_weight >= 0"
            )
        try:
            sampling_of(t)
        except ValueError as e:
            raise ConfigError(f"text_to_image.{e}") from None
        if t.guidance != 1.0 and t.text_drop_prob == 0:
            raise ConfigError(
                f"text_to_image.guidance={t.guidance} needs the unconditional model: train with "
                "text_to_image.text_drop_prob > 0 (e.g. 0.15) or set guidance=1"
            )
        model, _ = image_tokenizer(config)
        size, down = int(config.data.image_size), model.downsample
        if size % down:
            raise ConfigError(
                f"data.image_size={size} is not a multiple of the image tokenizer's "
                f"{down} pixels per token"
            )

    def build_model(self, config, vocab_size):
        tokenizer, _ = image_tokenizer(config)
        t = config.text_to_image
        grid = int(config.data.image_size) // tokenizer.downsample
        prior = TextImagePrior(
            text_vocab=vocab_size,
            codebook_size=tokenizer.codebook_size,
            text_length=int(config.data.text_length),
            image_tokens=grid * grid,
            width=int(t.width),
            depth=int(t.depth),
            num_heads=int(t.num_heads),
            mlp_dim=int(t.mlp_dim),
            activation=config.model.activation,
            dtype=jnp.dtype(config.dtype),
        )
        return TextToImage(prior, tokenizer)

    def example_batch(self, config):
        s, length = config.data.image_size, config.data.text_length
        return {
            "image": np.zeros((1, s, s, 3), np.float32),
            "tokens": np.zeros((1, length), np.int32),
        }

    def init_variables(self, model, config, key):
        inputs = self.model_inputs(self.example_batch(config))
        return model.init(key, *inputs, method=TextToImage.initialize)

    def model_inputs(self, batch):
        return batch["image"], batch["tokens"]

    def frozen_prefixes(self, config):
        return ("tokenizer/",)

    def pretrained(self, config, abstract_params):
        _, variables = image_tokenizer(config)
        workdir = os.path.abspath(config.image_tokenizer_from)
        tokenizer = pretrained.Pretrained(
            path=("tokenizer",),
            params=variables["params"],
            misfit=f"image_tokenizer_from={workdir!r}: its model does not fit",
            loaded=f"Image tokenizer (frozen) loaded from {workdir}",
        )
        return [*pretrained.from_settings(config, keep=("tokenizer",)), tokenizer]

    def objective(self, model, config, mesh, rules):
        t = config.text_to_image
        tok = self.tokenizer(config)
        return TextToImageObjective(
            model,
            {"text": float(t.text_weight), "image": float(t.image_weight)},
            float(t.text_drop_prob),
            tok.encode([""])[0],
            tok.pad_id,
            int(config.seed),
        )

    def train_iterator(self, config, process_index, process_count):
        return pipeline.caption_batches(config, process_index, process_count)

    def evaluator(self, config, model, batch_sharding):
        judge = HeldoutEvaluator(config, model, batch_sharding, self.tokenizer(config))

        def evaluate(params):
            out = judge(params)
            return {**out, **headline(generated_images.score(out), generated_images.CHANCE)}

        return evaluate


TASK = TextToImageTask()
