"""open_clip model configs (`model_configs/*.json`) as mmjax configs.

An open_clip config names the architecture only; everything else (optimizer, dtype, mesh) comes
from `mmjax/config.py`. The mapped model computes what open_clip's does (class token with its
own position, `ln_pre`, bias-free patch embedding, exact or quick GELU, EOT pooling), so open_clip
weights load into it (`mmjax.interop.open_clip`) and benchmarks compare the same model.

Options that change the computation in a way mmjax cannot express (timm or Hugging Face towers,
attentional pooling, layer scale, ...) raise a ValueError naming the field.
"""

import difflib
import importlib.util
import json
import os
from pathlib import Path

import ml_collections

from mmjax import config as base_config
from mmjax.interop import open_clip_resnet

_INSTALL_HINT = "pass a path to a JSON file, or install open_clip: pip install -e '.[interop]'"

# Fields whose value must equal open_clip's default, the only value mmjax can represent:
# field -> (default, what another value would mean). Falsy values all count as the default.
_VISION_MUST_DEFAULT = {
    "timm_model_name": (None, "a timm image tower"),
    "ls_init_value": (None, "layer scale"),
    "patch_dropout": (0.0, "dropped patches"),
    "attentional_pool": (False, "attentional pooling"),
    "final_ln_after_pool": (False, "LayerNorm after pooling"),
    "act_kwargs": (None, "activation options"),
    "norm_kwargs": (None, "LayerNorm options"),
    **{k: (False, "a custom attention block") for k in ("qk_norm", "scaled_cosine_attn")},
    **{k: (False, "a custom attention block") for k in ("scale_heads", "scale_attn_inner")},
    **{k: (False, "a custom attention block") for k in ("scale_attn", "scale_fc")},
}
_TEXT_MUST_DEFAULT = {
    "hf_model_name": (None, "a Hugging Face text tower"),
    "ls_init_value": (None, "layer scale"),
    "embed_cls": (False, "a class token"),
    "no_causal_mask": (False, "a non-causal tower with EOT pooling; mmjax's mean-pools"),
    "final_ln_after_pool": (False, "LayerNorm after pooling"),
    "proj_bias": (False, "a projection bias"),
    "act_kwargs": (None, "activation options"),
    "norm_kwargs": (None, "LayerNorm options"),
    **{k: (False, "a custom attention block") for k in ("qk_norm", "scaled_cosine_attn")},
    **{k: (False, "a custom attention block") for k in ("scale_heads", "scale_attn_inner")},
    **{k: (False, "a custom attention block") for k in ("scale_attn", "scale_fc")},
}
# Fields with no effect on the model computed here (tokenizer settings, output options, and
# knobs of features that are off).
_VISION_IGNORED = {
    "output_tokens",
    "attn_pooler_queries",
    "attn_pooler_heads",
    "timm_model_pretrained",
    "timm_pool",
    "timm_proj",
    "timm_proj_bias",
    "timm_drop",
    "timm_drop_path",
}
_TEXT_IGNORED = {
    "hf_tokenizer_name",
    "tokenizer_mode",
    "tokenizer_kwargs",
    "pad_id",
    "eos_id",
    "output_tokens",
    "hf_model_pretrained",
    "hf_proj_type",
    "hf_pooler_type",
}
_VISION_MAPPED = {
    "image_size",
    "layers",
    "width",
    "patch_size",
    "head_width",
    "mlp_ratio",
    "pos_embed_type",
    "pool_type",
    "no_ln_pre",
    "block_type",
}
_TEXT_MAPPED = {
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
    "pool_type",
    "proj_type",
    "block_type",
}
_TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "custom_text", "quick_gelu", "init_logit_bias"}


def load_open_clip_config(name_or_path: str) -> dict:
    """The model config at a JSON path, or of a model name (e.g. `ViT-B-16`) shipped with the
    installed open_clip package. Model names need open_clip only to find its config directory; it
    is located without being imported (importing it imports torch)."""
    path = Path(name_or_path)
    if path.is_file():
        with path.open() as f:
            return json.load(f)
    if path.suffix == ".json" or os.sep in name_or_path:
        raise FileNotFoundError(f"open_clip config {name_or_path!r} does not exist")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{name_or_path!r} is not a file and open_clip is not installed to resolve model "
            f"names: {_INSTALL_HINT}"
        )
    config_dir = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    candidate = config_dir / f"{name_or_path}.json"
    if not candidate.is_file():
        names = sorted(p.stem for p in config_dir.glob("*.json"))
        close = difflib.get_close_matches(name_or_path, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"open_clip has no model config {name_or_path!r} in {config_dir}{hint}")
    with candidate.open() as f:
        return json.load(f)


def _check_fields(section: str, cfg: dict, mapped, ignored, must_default: dict) -> None:
    for key, value in cfg.items():
        if key in mapped or key in ignored:
            continue
        if key not in must_default:
            raise ValueError(f"{section}.{key} is not an open_clip option mmjax knows")
        default_value, meaning = must_default[key]
        if (value or None) != (default_value or None):
            raise ValueError(
                f"{section}.{key}={value!r} ({meaning}) cannot be represented by mmjax's "
                "towers; choose a config without it"
            )


def _square(section: str, name: str, value) -> int:
    """open_clip allows (h, w) pairs; mmjax's image size and patches are square."""
    if isinstance(value, list | tuple):
        if len(set(value)) != 1:
            raise ValueError(f"{section}.{name}={value!r}: mmjax needs a square {name}")
        value = value[0]
    return int(value)


def _mlp_dim(section: str, width: int, ratio: float) -> int:
    # open_clip truncates width * mlp_ratio with int(); the same rule gives the same shapes.
    mlp = int(width * ratio)
    if mlp <= 0:
        raise ValueError(f"{section}.mlp_ratio={ratio!r} gives an empty MLP")
    return mlp


def _mlp_ratio(width: int, mlp_dim: int) -> float:
    """A ratio that open_clip's int(width * ratio) turns back into exactly `mlp_dim`."""
    ratio = mlp_dim / width
    return ratio if int(width * ratio) == mlp_dim else (mlp_dim + 0.5) / width


def mmjax_config_from_open_clip(
    cfg: dict, base: ml_collections.ConfigDict | None = None
) -> tuple[ml_collections.ConfigDict, int]:
    """(config, vocab_size) of the mmjax model with the matmul shapes of open_clip config `cfg`.

    `base` supplies everything but the model (default: `mmjax.config` with the text tower
    never frozen, since open_clip trains both towers from step 0). The loss is sigmoid when the
    config sets `init_logit_bias` (open_clip's SigLIP configs), softmax otherwise.
    """
    for key in cfg:
        if key not in _TOP_LEVEL:
            hint = " (CoCa's captioning decoder)" if key == "multimodal_cfg" else ""
            raise ValueError(f"{key}{hint} is not an open_clip option mmjax can represent")
    vision, text = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    _check_fields("vision_cfg", vision, _VISION_MAPPED, _VISION_IGNORED, _VISION_MUST_DEFAULT)
    _check_fields("text_cfg", text, _TEXT_MAPPED, _TEXT_IGNORED, _TEXT_MUST_DEFAULT)
    for section, sub in (("vision_cfg", vision), ("text_cfg", text)):
        if sub.get("block_type") not in (None, "default"):
            raise ValueError(f"{section}.block_type={sub['block_type']!r} cannot be represented")
    layers = vision.get("layers", 12)
    resnet = isinstance(layers, list | tuple)  # open_clip's ModifiedResNet (RN50, ...)
    if resnet and vision.get("patch_size") is not None:
        raise ValueError("vision_cfg.patch_size is set on a ResNet tower (layers is a list)")
    if not resnet and vision.get("pool_type", "tok") != "tok":
        raise ValueError(
            f"vision_cfg.pool_type={vision['pool_type']!r} cannot be represented: mmjax pools "
            "with a class token ('tok') or averages without one"
        )
    # open_clip keeps sin-cos positions as a (frozen) parameter of its own layout: loading them
    # as a position parameter reproduces the model exactly (mmjax then trains them).
    posembs = {"learnable": "learn", "sin_cos_2d": "learn"}
    pos_type = vision.get("pos_embed_type", "learnable")
    if pos_type not in posembs:
        raise ValueError(f"vision_cfg.pos_embed_type={pos_type!r} cannot be represented")
    if text.get("pool_type", "argmax") not in ("argmax", "eos", "last"):
        raise ValueError(
            f"text_cfg.pool_type={text['pool_type']!r} cannot be represented: mmjax's causal "
            "text tower pools at the end-of-text token"
        )
    if text.get("proj_type", "linear") != "linear":
        raise ValueError(f"text_cfg.proj_type={text['proj_type']!r} cannot be represented")

    v_width = int(vision.get("width", 768))
    head_width = int(vision.get("head_width", 64))
    if not resnet and v_width % head_width:
        raise ValueError(f"vision_cfg.width={v_width} is not a multiple of head_width={head_width}")
    t_width, t_heads = int(text.get("width", 512)), int(text.get("heads", 8))
    if t_width % t_heads:
        raise ValueError(f"text_cfg.width={t_width} is not divisible by text_cfg.heads={t_heads}")

    if base is None:
        c = base_config.get_config()
        c.optim.text_frozen_steps = 0
    else:
        c = base.copy_and_resolve_references()  # never edit the caller's base in place
    c.loss = "sigmoid" if cfg.get("init_logit_bias") is not None else "softmax"
    c.data.image_size = _square("vision_cfg", "image_size", vision.get("image_size", 224))
    c.data.text_length = int(text.get("context_length", 77))
    c.model.embed_dim = int(cfg["embed_dim"])
    if resnet:
        c.model.image.update(open_clip_resnet.image_config(vision, c.model.embed_dim))
    else:
        c.model.image.update(
            patch_size=_square("vision_cfg", "patch_size", vision.get("patch_size", 16)),
            width=v_width,
            depth=int(layers),
            num_heads=v_width // head_width,
            mlp_dim=_mlp_dim("vision_cfg", v_width, float(vision.get("mlp_ratio", 4.0))),
            pool="cls",
            posemb=posembs[pos_type],
            stem_channels=(),
            patch_bias=False,
            pre_norm=not vision.get("no_ln_pre", False),
        )
    c.model.text.update(
        width=t_width,
        depth=int(text.get("layers", 12)),
        num_heads=t_heads,
        mlp_dim=_mlp_dim("text_cfg", t_width, float(text.get("mlp_ratio", 4.0))),
        causal=True,
        # CLIP's tokenizer: EOT is the last id of the vocabulary, padding 0.
        eot_id=int(text.get("eos_id") or int(text.get("vocab_size", 49408)) - 1),
        pad_id=int(text.get("pad_id") or 0),
    )
    c.model.activation = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    return c, int(text.get("vocab_size", 49408))


def finetune_config(model: str = "ViT-B-32") -> ml_collections.ConfigDict:
    """The config to fine-tune open_clip model `model` (a model-config name or JSON path) on the
    built-in data: its architecture, CLIP's BPE tokenizer and a fine-tuning learning rate. The
    recipe `configs/open_clip.py` and `mmjax.evaluate` (for imported open_clip weights) use it."""
    config, _ = mmjax_config_from_open_clip(load_open_clip_config(model))
    config.data.tokenizer = "clip_bpe"
    config.optim.learning_rate = 1e-5  # fine-tuning pretrained weights
    config.optim.warmup_steps = 20
    return config


def open_clip_config_from_mmjax(config: ml_collections.ConfigDict, vocab_size: int) -> dict:
    """The open_clip model config with the matmul shapes of mmjax `config` (the inverse of
    `mmjax_config_from_open_clip`), for timing open_clip on a model given as an mmjax config."""
    img, txt = config.model.image, config.model.text
    if img.pool != "cls":
        raise ValueError(
            f"model.image.pool={img.pool!r} has no open_clip equivalent (its 'avg' pooling keeps "
            "a class token in the sequence); use pool='cls' or pass --open-clip-config"
        )
    if tuple(img.stem_channels):
        raise ValueError("model.image.stem_channels (a conv stem) has no open_clip equivalent")
    if not txt.causal:
        raise ValueError("model.text.causal=False (mean pooling) has no open_clip equivalent")
    if img.width % img.num_heads:
        raise ValueError(f"model.image.width={img.width} is not divisible by its num_heads")
    cfg = {
        "embed_dim": int(config.model.embed_dim),
        "vision_cfg": {
            "image_size": int(config.data.image_size),
            "layers": int(img.depth),
            "width": int(img.width),
            "head_width": int(img.width // img.num_heads),
            "mlp_ratio": _mlp_ratio(img.width, img.mlp_dim),
            "patch_size": int(img.patch_size),
            "pos_embed_type": {"learn": "learnable", "sincos2d": "sin_cos_2d"}[img.posemb],
        },
        "text_cfg": {
            "context_length": int(config.data.text_length),
            "vocab_size": int(vocab_size),
            "width": int(txt.width),
            "heads": int(txt.num_heads),
            "layers": int(txt.depth),
            "mlp_ratio": _mlp_ratio(txt.width, txt.mlp_dim),
        },
    }
    if not img.pre_norm:
        cfg["vision_cfg"]["no_ln_pre"] = True
    if config.model.activation == "quick_gelu":
        cfg["quick_gelu"] = True
    if config.loss == "sigmoid":
        cfg["init_logit_bias"] = -10.0  # SigLIP's initialisation, as in mmjax
    return cfg
