"""Image tokenizer: a VQ-VAE (`mmjax.models.vqvae`) trained to reconstruct the images of any
image dataset (`shapes` by default) through a grid of discrete codes: the tokens a text→image
prior writes (`load_image_tokenizer` reads a finished run for it).

Loss: `vqvae.recon` × the mean squared error in the normalised input space, + `vqvae.codebook`
× codebook loss + `vqvae.commitment` × commitment loss + `vqvae.restart` × the dead-code
restart pull (`mmjax.losses.vq`); the straight-through estimator carries the reconstruction
gradient through the quantiser to the encoder. Logged per step: `train/mse` (pixels in
[0, 1]), `train/loss/<term>`, `train/codes_used` and `train/perplexity` (of the batch).

Reported on the validation split: `image_tokenizer/psnr` (dB, 10·log10(1 / MSE) with the MSE
over every pixel and channel in [0, 1], reconstructions clipped to [0, 1]), `image_tokenizer/
mse`, `image_tokenizer/codes_used` (fraction of the codebook chosen at least once) and
`image_tokenizer/perplexity` (exp of the entropy of the code frequencies). `task/score` is the
PSNR; `task/chance` the PSNR of predicting the mean training image for every image.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.data import pipeline, sources
from mmjax.errors import ConfigError
from mmjax.eval.embed import EvalImages, jit_encoder, predict_all
from mmjax.losses import vq
from mmjax.models.vqvae import VQVAE, build_vqvae, to_pixels
from mmjax.tasks.contrastive import EVAL_SETTINGS
from mmjax.train import pretrained
from mmjax.train.task import Task, headline
from mmjax.train.validate import refuse_overrides

NAME = "image_tokenizer"
MAKE_ONE = "python train.py --config configs/image_tokenizer.py --workdir {}"
# Training images averaged into the mean image of `task/chance` (a sample is plenty for a mean).
_MEAN_IMAGE_SAMPLES = 2000
LOSS_TERMS = ("recon", "codebook", "commitment", "restart")


def pixel_mse(recon_BHWC: jax.Array, images_BHWC: jax.Array) -> jax.Array:
    """Per-image mean squared error of pixels in [0, 1] (reconstruction clipped), float32 [B]."""
    err = jnp.square(to_pixels(recon_BHWC) - to_pixels(images_BHWC))
    return jnp.mean(err, axis=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class VQObjective:
    """The weighted VQ-VAE loss (see the module doc); weights named as LOSS_TERMS."""

    model: VQVAE
    weights: dict[str, float]

    def __call__(self, params, batch, step=None):
        images = batch["image"]
        out = self.model.apply({"params": params}, images)
        d = out.z_BhwD.shape[-1]
        z_ND, q_ND = out.z_BhwD.reshape(-1, d), out.q_BhwD.reshape(-1, d)
        counts_K = vq.code_counts(out.codes_Bhw, self.model.codebook_size)
        terms = {
            "recon": jnp.mean(jnp.square(out.images_BHWC - images.astype(jnp.float32))),
            "codebook": vq.codebook_loss(z_ND, q_ND),
            "commitment": vq.commitment_loss(z_ND, q_ND),
            "restart": vq.restart_loss(z_ND, q_ND, out.codebook_KD, counts_K),
        }
        loss = sum(self.weights[k] * v for k, v in terms.items() if self.weights[k] > 0)
        usage = vq.usage_stats(counts_K)
        logs = {f"train/loss/{k}": v for k, v in terms.items()}
        logs["train/mse"] = jnp.mean(pixel_mse(jax.lax.stop_gradient(out.images_BHWC), images))
        logs["train/codes_used"] = usage["used_fraction"]
        logs["train/perplexity"] = usage["perplexity"]
        return loss, logs


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio (dB) of a mean squared error of values in [0, 1]."""
    return float(10.0 * np.log10(1.0 / max(mse, 1e-12)))


class ImageTokenizerTask(Task):
    name = NAME
    metric_name = "psnr"
    # Its network is configured by `vqvae.*`; a tower setting would be silently ignored.
    unread_model_settings = ("model",)

    def validate(self, config):
        why = f"task={self.name} evaluates reconstructions and trains no towers"
        refuse_overrides(config, (*EVAL_SETTINGS, "init_towers_from"), why)
        why = f"task={self.name} is configured by vqvae.*"
        refuse_overrides(config, self.unread_model_settings, why)
        kind = sources.BUILTIN.get(config.data.name, "image_text")
        if kind != "image_text":
            raise ConfigError(
                f"task={self.name} trains on images; data.name={config.data.name!r} holds "
                f"{kind}: use an image dataset (shapes, digits, a built folder, a tfds one)"
            )
        v = config.vqvae
        if not v.channels or min(v.channels) < 1:
            raise ConfigError(f"vqvae.channels={tuple(v.channels)} must be positive widths")
        if int(v.codebook_size) < 2 or int(v.code_dim) < 2 or int(v.res_blocks) < 0:
            raise ConfigError(
                f"vqvae.codebook_size={v.codebook_size} and vqvae.code_dim={v.code_dim} must "
                f"be >= 2, vqvae.res_blocks={v.res_blocks} >= 0"
            )
        down = 2 ** len(v.channels)
        if config.data.image_size % down:
            raise ConfigError(
                f"data.image_size={config.data.image_size} is not divisible by {down} (one "
                f"stride-2 level per vqvae.channels entry, {len(v.channels)}); change either"
            )
        for term in LOSS_TERMS:
            if v[term] < 0:
                raise ConfigError(f"vqvae.{term}={v[term]} must be >= 0")
        if v.recon <= 0:
            raise ConfigError(f"vqvae.recon={v.recon} must be > 0: the tokenizer must learn")

    def build_model(self, config, vocab_size):
        return build_vqvae(config)

    def example_batch(self, config):
        size = config.data.image_size
        return {"image": np.zeros((1, size, size, 3), np.float32)}

    def model_inputs(self, batch):
        return (batch["image"],)

    def objective(self, model, config, mesh, rules):
        return VQObjective(model, {k: float(config.vqvae[k]) for k in LOSS_TERMS})

    def train_iterator(self, config, process_index, process_count):
        d = config.data
        return pipeline.train_batches(
            sources.open_source(d, d.name, d.split),
            pipeline.DecodeImage(d),
            config,
            process_index,
            process_count,
            batch_map=pipeline.normalize_batch,
        )

    def evaluator(self, config, model, batch_sharding):
        return ReconstructionEvaluator(config, model, batch_sharding)


class ReconstructionEvaluator:
    """PSNR, MSE and codebook usage on the validation split (see the module doc)."""

    def __init__(self, config, model: VQVAE, sharding):
        d = config.data
        val = sources.open_source(d, d.name, "validation")
        self.images = EvalImages(val, d.image_size)[:]
        train = sources.open_source(d, d.name, d.split)
        rows = np.arange(min(len(train), _MEAN_IMAGE_SAMPLES))
        mean_image = to_pixels(EvalImages(train, d.image_size, rows)[:]).mean(axis=0)
        chance_mse = float(jnp.mean(jnp.square(to_pixels(self.images) - mean_image[None])))
        self.chance = psnr(chance_mse)
        self.codebook_size = model.codebook_size
        self.batch_size, self.sharding = config.eval.batch_size, sharding

        def reconstruct(params, images):
            codes = model.apply({"params": params}, images, method=VQVAE.encode)
            recon = model.apply({"params": params}, codes, method=VQVAE.decode)
            return pixel_mse(recon, images), codes

        self._reconstruct = jit_encoder(reconstruct, sharding)

    def __call__(self, params) -> dict:
        mse_B, codes = predict_all(
            self._reconstruct, params, self.images, self.batch_size, self.sharding
        )
        mse = float(np.mean(mse_B))  # equal pixels per image: the mean over every pixel
        usage = vq.usage_stats(vq.code_counts(jnp.asarray(codes), self.codebook_size))
        out = {
            f"{NAME}/psnr": psnr(mse),
            f"{NAME}/mse": mse,
            f"{NAME}/codes_used": float(usage["used_fraction"]),
            f"{NAME}/perplexity": float(usage["perplexity"]),
        }
        return {**out, **headline(out[f"{NAME}/psnr"], self.chance)}


def _config_of(workdir: str, make: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        raise ConfigError(
            f"{workdir} has no readable config.json: not a training run; make an image "
            f"tokenizer with `{make}`"
        ) from None
    if saved.get("task") != NAME:
        raise ConfigError(
            f"{workdir} is a run of task={saved.get('task')!r}, not an image tokenizer; make "
            f"one with `{make}`"
        )
    return ml_collections.ConfigDict(saved)


def load_image_tokenizer(workdir: str, setting: str = "image_tokenizer_from") -> tuple[VQVAE, dict]:
    """(model, variables) of the image tokenizer run in `workdir`: its config.json and newest
    checkpoint's parameters (host arrays; `mmjax.train.pretrained.read_params`). ConfigError,
    naming `setting` and the command that makes one, for a workdir that does not exist, is not
    an image_tokenizer run or has no checkpoint yet. Tokens per image side: the data's image size
    / `model.downsample` (`vqvae.grid_size(config)`)."""
    workdir = os.path.abspath(workdir)
    make = MAKE_ONE.format(workdir)
    if not os.path.isdir(workdir):
        raise ConfigError(
            f"{setting}={workdir!r} does not exist; make an image tokenizer with `{make}`"
        )
    config = _config_of(workdir, make)
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(s.isdigit() for s in os.listdir(checkpoints)):
        raise ConfigError(
            f"{setting}={workdir!r}: the run has no checkpoint yet; train it with `{make}`"
        )
    _, params = pretrained.read_params(workdir, setting)
    return build_vqvae(config), {"params": params}


TASK = ImageTokenizerTask()
