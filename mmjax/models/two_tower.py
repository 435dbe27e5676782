"""CLIP/SigLIP-style two-tower model: an image tower and a text tower in one embedding space."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax.errors import ConfigError
from mmjax.models.layers import ACTIVATIONS, REMAT_POLICIES, Dtype, dense, param
from mmjax.models.recurrent import CELLS as RECURRENT_KINDS
from mmjax.models.recurrent import RecurrentTextTower
from mmjax.models.resnet import check_resnet_config, resnet_from_config
from mmjax.models.text import TextTransformer
from mmjax.models.vision import ViT

# model.text.kind values: a Transformer trained here, a pretrained BERT, or a recurrent tower.
TEXT_KINDS = ("transformer", "hf_bert", *RECURRENT_KINDS)

# model.image.kind values: a Vision Transformer or open_clip's modified ResNet.
IMAGE_KINDS = ("vit", "resnet")

# Top-level parameter subtrees of TwoTower's optional training-only parts (see its docstring).
TRAINING_PARTS = ("discriminator", "teacher")


class TwoTower(nn.Module):
    """Image and text towers with linear projections to a shared `embed_dim`.

    `__call__` returns `(img_emb_BE, txt_emb_BE, aux)`: L2-normalised float32 embeddings and an aux
    dict with `logit_scale` (exp of the learned log-scale, float32), `logit_bias` (float32, used by
    the sigmoid loss), the pre-normalisation embedding norms and, with `return_tokens=True`, the
    towers' token streams `image_tokens_BND` and `text_tokens_BLD` (for the decoder or fusion of
    a model that holds this one: `coca.CoCa`, `matching_model.MatchingModel`).

    `discriminator` and `teacher` are parts only some training objectives read (adversarial
    alignment, distillation; see `mmjax.tasks.contrastive`). They live in the model's parameters
    so the one optimizer, sharding and checkpoint carry them, under their own top-level names:
    the towers' parameter paths stay those of a plain two-tower model. `__call__` runs them only
    at `init`, to create their parameters; objectives apply them as submodules.
    """

    image: ViT
    text: nn.Module  # TextTransformer or bert.BertTextTower: (tokens) -> (pooled, tokens)
    embed_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    discriminator: nn.Module | None = None  # embeddings [B, E] -> modality logits [B]
    teacher: nn.Module | None = None  # a TwoTower, frozen: distilled into this one

    def setup(self):
        def projection(name: str, width: int) -> jax.Array:
            return param(
                self,
                name,
                nn.initializers.lecun_normal(),
                (width, self.embed_dim),
                ("embed", "proj"),
                self.param_dtype,
            )

        self.image_projection = projection("image_projection", self.image.width)
        self.text_projection = projection("text_projection", self.text.width)
        # Temperature and bias are scalars kept in float32 whatever param_dtype is: they set the
        # sharpness of the loss, and bf16 rounding of exp(scale) would be ~0.5% per step.
        self.logit_scale = param(
            self,
            "logit_scale",
            nn.initializers.constant(self.logit_scale_init),
            (),
            (),
            jnp.float32,
        )
        self.logit_bias = param(
            self, "logit_bias", nn.initializers.constant(self.logit_bias_init), (), (), jnp.float32
        )

    def project(self, pooled_BD: jax.Array, kernel: jax.Array) -> jax.Array:
        """A tower's pooled output in the shared embedding space (float32, unnormalised)."""
        return dense(pooled_BD, kernel, self.dtype).astype(jnp.float32)

    def encode_image(self, images_BHWC: jax.Array) -> jax.Array:
        """Unnormalised float32 image embeddings."""
        pooled_BD, _ = self.image(images_BHWC)
        return self.project(pooled_BD, self.image_projection)

    def encode_text(self, tokens_BL: jax.Array) -> jax.Array:
        """Unnormalised float32 text embeddings."""
        pooled_BD, _ = self.text(tokens_BL)
        return self.project(pooled_BD, self.text_projection)

    def __call__(
        self, images_BHWC: jax.Array, tokens_BL: jax.Array, return_tokens: bool = False
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        img_pooled_BD, img_BND = self.image(images_BHWC)
        txt_pooled_BD, txt_BLD = self.text(tokens_BL)
        img_BE = self.project(img_pooled_BD, self.image_projection)
        txt_BE = self.project(txt_pooled_BD, self.text_projection)
        img_norm_B = jnp.linalg.norm(img_BE, axis=-1, keepdims=True)
        txt_norm_B = jnp.linalg.norm(txt_BE, axis=-1, keepdims=True)
        aux = {"logit_scale": jnp.exp(self.logit_scale), "logit_bias": self.logit_bias}
        aux["image_norm"] = jnp.mean(img_norm_B)
        aux["text_norm"] = jnp.mean(txt_norm_B)
        img_BE, txt_BE = img_BE / (img_norm_B + 1e-6), txt_BE / (txt_norm_B + 1e-6)
        if return_tokens:
            aux["image_tokens_BND"], aux["text_tokens_BLD"] = img_BND, txt_BLD
        if self.is_initializing():
            if self.discriminator is not None:
                self.discriminator(img_BE)
            if self.teacher is not None:
                self.teacher(images_BHWC, tokens_BL)
        return img_BE, txt_BE, aux


def build_towers(config: ml_collections.ConfigDict, vocab_size: int) -> tuple[ViT, nn.Module]:
    """The image and text towers of `config.model`, compute dtype `config.dtype`."""
    m = config.model
    dtype = jnp.dtype(config.dtype)
    # Compute and memory settings every tower takes alike.
    shared = dict(
        dtype=dtype,
        remat=m.remat,
        scan_layers=m.scan_layers,
        activation=m.activation,
    )
    # (A ResNet has no Transformer blocks: remat, scan_layers and activation do not apply.)
    if m.image.get("kind", "vit") == "resnet":
        image = resnet_from_config(m.image, dtype)
    else:
        image = ViT(
            patch_size=m.image.patch_size,
            width=m.image.width,
            depth=m.image.depth,
            num_heads=m.image.num_heads,
            mlp_dim=m.image.mlp_dim,
            pool=m.image.pool,
            posemb=m.image.posemb,
            stem_channels=tuple(m.image.stem_channels),
            patch_bias=m.image.patch_bias,
            pre_norm=m.image.pre_norm,
            **shared,
        )
    if m.text.kind == "transformer":
        text = TextTransformer(
            vocab_size=vocab_size,
            width=m.text.width,
            depth=m.text.depth,
            num_heads=m.text.num_heads,
            mlp_dim=m.text.mlp_dim,
            max_len=config.data.text_length,
            causal=m.text.causal,
            pad_id=m.text.pad_id,
            eot_id=m.text.eot_id,
            **shared,
        )
    elif m.text.kind == "hf_bert":  # a pretrained Hugging Face BERT (weights: tasks/weights.py)
        from mmjax.extras import minilm_dir
        from mmjax.models.bert import BertTextTower, bert_from_config, read_config

        bert = bert_from_config(read_config(m.text.hf_dir or minilm_dir()), dtype=dtype)
        text = BertTextTower(bert, pad_id=m.text.pad_id, frozen=m.text.frozen)
    elif m.text.kind in RECURRENT_KINDS:
        text = RecurrentTextTower(
            kind=m.text.kind,
            vocab_size=vocab_size,
            width=m.text.width,
            depth=m.text.depth,
            embed_dim=m.text.embed_dim,
            bidirectional=m.text.bidirectional,
            pad_id=m.text.pad_id,
            eot_id=m.text.eot_id,
            dtype=dtype,
        )
    else:
        raise ValueError(f"model.text.kind={m.text.kind!r}; use one of {', '.join(TEXT_KINDS)}")
    return image, text


def validate_towers(config: ml_collections.ConfigDict) -> None:
    """ConfigError for `config.model` settings the towers of `build_towers` cannot run with."""
    m = config.model
    if m.remat not in REMAT_POLICIES:
        raise ConfigError(
            f"model.remat={m.remat!r} is unknown; use one of {', '.join(REMAT_POLICIES)}"
        )
    if m.activation not in ACTIVATIONS:
        raise ConfigError(
            f"model.activation={m.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}"
        )
    _check_kind("model.image.kind", m.image.get("kind", "vit"), IMAGE_KINDS)
    if m.image.get("kind", "vit") == "resnet":
        check_resnet_config(config)
    # Sizes first: the divisibility checks below would divide by them.
    sizes = {"model.embed_dim": m.embed_dim}
    for tower in ("image", "text"):
        for key in ("width", "num_heads", "mlp_dim"):
            sizes[f"model.{tower}.{key}"] = m[tower][key]
    sizes["model.image.patch_size"] = m.image.patch_size
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    size, patch = config.data.image_size, m.image.patch_size
    if size % patch:
        raise ConfigError(
            f"data.image_size={size} is not divisible by model.image.patch_size={patch}"
        )
    # A recurrent text tower has no heads: its num_heads/mlp_dim are unused.
    for tower in ("image",) if m.text.kind in RECURRENT_KINDS else ("image", "text"):
        t = m[tower]
        if t.width % t.num_heads:
            raise ConfigError(
                f"model.{tower}.width={t.width} is not divisible by "
                f"model.{tower}.num_heads={t.num_heads}"
            )
    _check_kind("model.text.kind", m.text.kind, TEXT_KINDS)
    _check_recurrent(m.text)
    if m.text.kind == "hf_bert":
        _check_hf_bert(m.text.hf_dir)


def _check_kind(name: str, kind: str, kinds: tuple[str, ...]) -> None:
    if kind not in kinds:
        raise ConfigError(f"{name}={kind!r} is unknown; use one of {', '.join(kinds)}")


def _check_recurrent(text: ml_collections.ConfigDict) -> None:
    """ConfigError for the recurrent-only text settings on another kind, or a bidirectional
    recurrent tower of odd width (each direction has width // 2 units)."""
    if text.kind not in RECURRENT_KINDS:
        for key, unset in (("bidirectional", False), ("embed_dim", 0)):
            if text[key] != unset:
                raise ConfigError(
                    f"model.text.{key}={text[key]!r} is a setting of the recurrent text towers "
                    f"(model.text.kind=lstm or gru), not of kind={text.kind!r}; leave it unset"
                )
        return
    if not isinstance(text.embed_dim, int) or text.embed_dim < 0:
        raise ConfigError(f"model.text.embed_dim={text.embed_dim!r}: 0 (= width) or a positive int")
    if text.bidirectional and text.width % 2:
        raise ConfigError(
            f"model.text.width={text.width} is odd: a bidirectional tower gives each direction "
            "width // 2 units; use an even width"
        )


def _check_hf_bert(hf_dir: str) -> None:
    """ConfigError unless the BERT folder of `build_towers` holds a config.json it can build."""
    from mmjax.extras import minilm_dir
    from mmjax.models.bert import bert_from_config, read_config

    where = f"model.text.hf_dir={hf_dir!r}" if hf_dir else "the packaged MiniLM (hf_dir='')"
    try:
        bert_from_config(read_config(hf_dir or minilm_dir()))
    except (OSError, ImportError, ValueError, KeyError) as e:  # missing, unreadable, unsupported
        raise ConfigError(
            f"{where}: {' '.join(str(e).split())}; point hf_dir at a Hugging Face BERT folder "
            "holding config.json"
        ) from e


def build_two_tower(config: ml_collections.ConfigDict, vocab_size: int) -> TwoTower:
    """Builds the model of `config.model` with compute dtype `config.dtype`."""
    image, text = build_towers(config, vocab_size)
    if config.loss == "sigmoid":  # SigLIP's initialisation: t = 10, b = -10.
        scale_init, bias_init = math.log(10.0), -10.0
    else:
        scale_init, bias_init = math.log(1 / 0.07), 0.0
    return TwoTower(
        image=image,
        text=text,
        embed_dim=config.model.embed_dim,
        logit_scale_init=scale_init,
        logit_bias_init=bias_init,
        dtype=jnp.dtype(config.dtype),
    )
