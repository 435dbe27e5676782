"""open_clip weights in and out of mmjax's two-tower model.

`load(model_cfg, state_dict)` builds the mmjax model of an open_clip model config (the JSON files
open_clip ships, see `open_clip_config`) and converts an open_clip `state_dict` into its
variables; `export(model_cfg, variables)` is the inverse and gives a dict that open_clip loads
with `load_state_dict(..., strict=True)`. Every name on both sides must be accounted for: missing
or unexpected weights and shape mismatches raise, listing them.

Layouts: open_clip stores Linear weights [out, in] and a fused attention projection
`in_proj_weight` [3·D, D] ordered (q|k|v, head, head_dim); mmjax stores kernels [in, out] and the
fused q/k/v kernel heads-major [D, H, 3, K] (see `layers.Attention`). The patch embedding conv
[W, C, p, q] becomes the [p·q·C, W] kernel of a matmul over flattened patches. ResNet image towers
(RN50, ...) map through `open_clip_resnet`, their BatchNorm statistics into the `batch_stats`
collection of the variables.
"""

from collections.abc import Callable, Mapping
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from mmjax.interop import open_clip_resnet
from mmjax.interop.open_clip_config import mmjax_config_from_open_clip
from mmjax.models.resnet import ResNet
from mmjax.models.two_tower import TwoTower, build_two_tower

Array = np.ndarray
Rule = tuple[str, Callable[[Array], Array], Callable[[Array], Array]]  # mmjax path, in, out


def _same(x: Array) -> Array:
    return x


def _linear_in(w: Array) -> Array:  # [out, in] -> [in, out]
    return w.T


def _rules_for_block(prefix: str, path: str, heads: int) -> dict[str, Rule]:
    def qkv_in(w):  # [3·H·K, D] -> [D, H, 3, K]
        d = w.shape[1]
        return w.reshape(3, heads, -1, d).transpose(3, 1, 0, 2)

    def qkv_out(k):
        d, h, _, kd = k.shape
        return k.transpose(2, 1, 3, 0).reshape(3 * h * kd, d)

    def qkv_bias_in(b):  # [3·H·K] -> [H, 3, K]
        return b.reshape(3, heads, -1).transpose(1, 0, 2)

    def qkv_bias_out(b):
        return b.transpose(1, 0, 2).reshape(-1)

    def out_in(w):  # [D, H·K] -> [H, K, D]
        return w.T.reshape(heads, -1, w.shape[0])

    def out_out(k):
        h, kd, d = k.shape
        return k.reshape(h * kd, d).T

    r = {
        "attn.in_proj_weight": ("attn/qkv_kernel", qkv_in, qkv_out),
        "attn.in_proj_bias": ("attn/qkv_bias", qkv_bias_in, qkv_bias_out),
        "attn.out_proj.weight": ("attn/out_kernel", out_in, out_out),
        "attn.out_proj.bias": ("attn/out_bias", _same, _same),
        "mlp.c_fc.weight": ("mlp/in_kernel", _linear_in, _linear_in),
        "mlp.c_fc.bias": ("mlp/in_bias", _same, _same),
        "mlp.c_proj.weight": ("mlp/out_kernel", _linear_in, _linear_in),
        "mlp.c_proj.bias": ("mlp/out_bias", _same, _same),
    }
    for ours, theirs in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
        r[f"{theirs}.weight"] = (f"{ours}/scale", _same, _same)
        r[f"{theirs}.bias"] = (f"{ours}/bias", _same, _same)
    return {f"{prefix}{k}": (f"{path}/{v[0]}", v[1], v[2]) for k, v in r.items()}


def _layer_norm(theirs: str, ours: str) -> dict[str, Rule]:
    return {
        f"{theirs}.weight": (f"{ours}/scale", _same, _same),
        f"{theirs}.bias": (f"{ours}/bias", _same, _same),
    }


def conversion_rules(model: TwoTower, cfg: dict) -> dict[str, Rule]:
    """open_clip state_dict name -> (mmjax parameter path, to-mmjax, to-open_clip)."""
    img, txt = model.image, model.text
    rules: dict[str, Rule] = {
        "token_embedding.weight": ("text/token_embedding", _same, _same),
        "positional_embedding": ("text/pos_embedding", _same, _same),
        "text_projection": ("text_projection", _same, _same),
        "logit_scale": ("logit_scale", _same, _same),
        **_layer_norm("ln_final", "text/encoder/ln_final"),
    }
    if cfg.get("init_logit_bias") is not None:
        rules["logit_bias"] = ("logit_bias", _same, _same)
    for i in range(txt.depth):
        prefix = f"transformer.resblocks.{i}."
        rules.update(_rules_for_block(prefix, f"text/encoder/block{i}", txt.num_heads))
    if isinstance(img, ResNet):
        return {**rules, **open_clip_resnet.rules(img)}
    return {**rules, **_vit_rules(img)}


def _vit_rules(img) -> dict[str, Rule]:
    """The ViT image tower's rules (see `conversion_rules`)."""
    p = img.patch_size

    def patch_in(w):  # conv [W, C, p, q] -> [p·q·C, W], matching the patch flattening order
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])

    def patch_out(k):
        return k.reshape(p, p, -1, k.shape[1]).transpose(3, 2, 0, 1)

    rules: dict[str, Rule] = {
        "visual.conv1.weight": ("image/patch_kernel", patch_in, patch_out),
        "visual.class_embedding": ("image/cls_token", _same, _same),
        "visual.positional_embedding": ("image/pos_embedding", _same, _same),
        "visual.proj": ("image_projection", _same, _same),
        **_layer_norm("visual.ln_post", "image/encoder/ln_final"),
    }
    if img.pre_norm:
        rules.update(_layer_norm("visual.ln_pre", "image/ln_pre"))
    for i in range(img.depth):
        prefix = f"visual.transformer.resblocks.{i}."
        rules.update(_rules_for_block(prefix, f"image/encoder/block{i}", img.num_heads))
    return rules


def read_state_dict(source) -> dict[str, Array]:
    """numpy arrays from a mapping of tensors/arrays, a `.safetensors` file, or a torch checkpoint
    file read with `torch.load(weights_only=True)` (never a full unpickle). Unwraps a
    `state_dict` entry and DataParallel's `module.` prefixes."""
    if isinstance(source, str | Path):
        path = Path(source)
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            source = load_file(str(path))
        else:
            import torch  # optional extra `interop`

            source = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(source, Mapping) and "state_dict" in source:
        source = source["state_dict"]
    out = {}
    for name, value in source.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().float().numpy()
        out[name.removeprefix("module.")] = np.asarray(value)
    return out


def _get(tree: dict, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _leaf_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        paths += _leaf_paths(value, f"{path}/") if isinstance(value, Mapping) else [path]
    return paths


def build(model_cfg: dict) -> tuple[TwoTower, dict]:
    """The mmjax model of an open_clip config and its abstract (shape-only) variables: the
    parameters, and under `batch_stats` a ResNet's BatchNorm statistics."""
    config, vocab = mmjax_config_from_open_clip(model_cfg)
    model = build_two_tower(config, vocab)
    size, length = config.data.image_size, config.data.text_length
    abstract = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, size, size, 3), np.float32),
        jax.ShapeDtypeStruct((1, length), np.int32),
    )
    abstract = nn.unbox(abstract)
    return model, {**abstract["params"], **_stats_tree(abstract.get("batch_stats"))}


def _stats_tree(stats: dict | None) -> dict:
    """BatchNorm statistics placed beside the parameters under the rule paths' prefix."""
    return {open_clip_resnet.STATE_PREFIX.rstrip("/"): stats} if stats else {}


def _variables(tree: dict) -> dict:
    """Flax variables from the combined tree of `build`'s layout."""
    key = open_clip_resnet.STATE_PREFIX.rstrip("/")
    params = {k: v for k, v in tree.items() if k != key}
    return {"params": params, **({key: tree[key]} if key in tree else {})}


def load(model_cfg: dict, state_dict) -> tuple[TwoTower, dict]:
    """(model, variables) with open_clip weights; raises listing every unmatched name."""
    model, abstract = build(model_cfg)
    weights = read_state_dict(state_dict)
    for name in open_clip_resnet.counters(weights):  # BatchNorm counters: not model weights
        del weights[name]
    rules = conversion_rules(model, model_cfg)
    missing = sorted(set(rules) - set(weights))
    unexpected = sorted(set(weights) - set(rules))
    if missing or unexpected:
        raise ValueError(
            f"open_clip state_dict does not match the model config: missing {missing or 'none'}; "
            f"unexpected {unexpected or 'none'}"
        )
    params: dict = {}
    for name, (path, to_mmjax, _) in rules.items():
        value = np.asarray(to_mmjax(weights[name]), np.float32)
        want = _get(abstract, path)
        if want.shape == () and value.size == 1:  # some writers store scalars as [1]
            value = value.reshape(())
        if value.shape != want.shape:
            raise ValueError(
                f"{name}: open_clip shape {weights[name].shape} converts to {value.shape}, but "
                f"the model's {path} is {want.shape}"
            )
        _set(params, path, value.astype(want.dtype))
    if isinstance(model.image, ResNet):
        open_clip_resnet.identity_projection(params)
    uncovered = sorted(set(_leaf_paths(abstract)) - set(_leaf_paths(params)))
    for path in uncovered:
        if path != "logit_bias":  # CLIP configs have no bias: it stays at its (unused) init
            raise ValueError(f"no open_clip weight for mmjax parameter {path}")
        _set(params, path, np.zeros((), np.float32))
    return model, _variables(params)


def export(model_cfg: dict, variables: dict) -> dict[str, Array]:
    """open_clip state_dict (numpy arrays) of mmjax variables of this config."""
    model, _ = build(model_cfg)
    params = jax.device_get(variables["params"])
    rules = conversion_rules(model, model_cfg)
    if isinstance(model.image, ResNet):
        params = open_clip_resnet.fold_projection(params)
    tree = {**params, **_stats_tree(jax.device_get(variables.get("batch_stats")))}
    out = {
        name: np.ascontiguousarray(to_open_clip(np.asarray(_get(tree, path))))
        for name, (path, _, to_open_clip) in rules.items()
    }
    for name in open_clip_resnet.counter_names(rules):  # (see open_clip_resnet)
        out[name] = np.zeros((), np.int64)
    return out


def _latest_params_dir(path: Path) -> Path:
    """A parameters checkpoint dir, or the train state inside a train workdir's newest
    checkpoint (`<workdir>/checkpoints/<step>/state`, see `mmjax.checkpoint`)."""
    from mmjax import checkpoint

    ckpts = path / "checkpoints"
    if not ckpts.is_dir():
        return path
    step = checkpoint.Checkpointer(str(ckpts), async_save=False).latest_step()
    return path if step is None else ckpts / str(step) / "state"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from mmjax import checkpoint
    from mmjax.interop.open_clip_config import load_open_clip_config

    parser = argparse.ArgumentParser(
        prog="python -m mmjax.interop.open_clip",
        description="Import open_clip weights into an mmjax parameters checkpoint, or export one.",
    )
    parser.add_argument("--model-config", required=True, help="open_clip JSON path or model name")
    parser.add_argument("--checkpoint", help="import: open_clip weights (.safetensors, .bin, .pt)")
    parser.add_argument("--workdir", help="import: directory to write params/ and the config to")
    parser.add_argument("--export", help="export: an mmjax params dir or train workdir")
    parser.add_argument("--out", help="export: the .safetensors file to write")
    args = parser.parse_args(argv)
    cfg = load_open_clip_config(args.model_config)
    if args.export:
        if not args.out:
            parser.error("--export needs --out FILE.safetensors")
        from safetensors.numpy import save_file

        source = _latest_params_dir(Path(args.export))
        restored = checkpoint.ocp.StandardCheckpointer().restore(str(source.absolute()))
        params = restored["params"] if "params" in restored else restored
        # A train workdir's state also holds the model's state (a ResNet's BatchNorm statistics).
        state = restored.get("model_state") or {}
        save_file(export(cfg, {"params": params, **state}), args.out)
        print(
            f"wrote {args.out} from {source}; load it with open_clip's load_state_dict(strict=True)"
        )
        return 0
    if not (args.checkpoint and args.workdir):
        parser.error("import needs --checkpoint and --workdir (or use --export DIR --out FILE)")
    _, variables = load(cfg, args.checkpoint)
    if set(variables) != {"params"}:
        parser.error(
            "this model has BatchNorm statistics besides its parameters (a ResNet image tower), "
            "and the import writes a parameters checkpoint only; use "
            "mmjax.interop.open_clip.load(config, weights) from Python"
        )
    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint.save_params(str(workdir / "params"), variables["params"])
    (workdir / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    # A hint that holds for any install: the repository's recipe open_clip.py is one such.
    print(
        f"wrote {workdir / 'params'}; fine-tune with a recipe whose get_config() returns "
        "mmjax.interop.open_clip_config.finetune_config("
        f"'{workdir / 'open_clip_config.json'}') and --config.init_from={workdir / 'params'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
