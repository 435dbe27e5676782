"""open_clip's ResNet image towers (RN50, RN101, RN50x4, ...) in and out of mmjax.

The config side: `image_config(vision_cfg, embed_dim)` gives `model.image` of the mmjax ResNet
(`mmjax.models.resnet`) with open_clip's shapes. The weight side: `rules(model)` names every
image-tower weight of open_clip's `ModifiedResNet` state_dict with its mmjax variable, in the
rule format of `mmjax.interop.open_clip`; BatchNorm running statistics go to the
`batch_stats` collection (paths prefixed `batch_stats/`, see `STATE_PREFIX`).

Two differences between the layouts, both exact: (1) open_clip's attention pool projects
straight to `embed_dim` (`attnpool.c_proj`, with a bias), where the mmjax two-tower model puts
its bias-free `image_projection` after the tower; an import sets that projection to the identity
(the tower's width is `embed_dim`), and an export folds it into `c_proj` (W·P, b·P, exact when P is
the identity). (2) BatchNorm's `num_batches_tracked` is a counter PyTorch keeps for a momentum
mode open_clip does not use: it is accepted and ignored on import and exported as 0.
"""

from collections.abc import Callable

import numpy as np

Array = np.ndarray
Rule = tuple[str, Callable[[Array], Array], Callable[[Array], Array]]
STATE_PREFIX = "batch_stats/"  # a rule path in the BatchNorm statistics, not the parameters
COUNTERS = ".num_batches_tracked"  # BatchNorm counters (see the module docstring)


def _same(x: Array) -> Array:
    return x


def image_config(vision: dict, embed_dim: int) -> dict:
    """`model.image` fields of open_clip's `vision_cfg` for a ResNet (`layers` a list)."""
    width = int(vision.get("width", 64))
    head_width = int(vision.get("head_width", 64))
    if (width * 32) % head_width:
        raise ValueError(f"vision_cfg.width={width}: 32·width is not a multiple of head_width")
    return dict(
        kind="resnet",
        layers=tuple(int(n) for n in vision["layers"]),
        resnet_width=width,
        num_heads=width * 32 // head_width,
        width=int(embed_dim),  # the attention pool projects to embed_dim (see the docstring)
        norm="batch",
    )


def _conv_in(w: Array) -> Array:  # torch [out, in, kh, kw] -> [kh, kw, in, out]
    return w.transpose(2, 3, 1, 0)


def _conv_out(k: Array) -> Array:
    return k.transpose(3, 2, 0, 1)


def _conv_norm(theirs_conv: str, theirs_bn: str, ours: str) -> dict[str, Rule]:
    """A convolution and its BatchNorm (weights and running statistics)."""
    return {
        f"{theirs_conv}.weight": (f"{ours}/kernel", _conv_in, _conv_out),
        f"{theirs_bn}.weight": (f"{ours}/norm/scale", _same, _same),
        f"{theirs_bn}.bias": (f"{ours}/norm/bias", _same, _same),
        f"{theirs_bn}.running_mean": (f"{STATE_PREFIX}{ours}/norm/mean", _same, _same),
        f"{theirs_bn}.running_var": (f"{STATE_PREFIX}{ours}/norm/var", _same, _same),
    }


def rules(image, prefix: str = "visual.", path: str = "image") -> dict[str, Rule]:
    """open_clip name -> (mmjax path, to mmjax, to open_clip) for ResNet `image`."""
    r: dict[str, Rule] = {}
    for i in (1, 2, 3):
        r.update(_conv_norm(f"{prefix}conv{i}", f"{prefix}bn{i}", f"{path}/stem{i}"))
    for stage, blocks in enumerate(image.layers):
        for b in range(blocks):
            theirs, ours = f"{prefix}layer{stage + 1}.{b}.", f"{path}/layer{stage + 1}_{b}/"
            for i in (1, 2, 3):
                r.update(_conv_norm(f"{theirs}conv{i}", f"{theirs}bn{i}", f"{ours}conv{i}"))
            if b == 0:  # the first block of every stage changes the channels: a shortcut conv
                r.update(
                    _conv_norm(
                        f"{theirs}downsample.0", f"{theirs}downsample.1", f"{ours}downsample"
                    )
                )
    heads, pool = image.num_heads, f"{path}/attnpool"

    def head_in(w: Array) -> Array:  # [H·K out, C in] -> [C, H, K]
        return w.T.reshape(w.shape[1], heads, -1)

    def head_out(k: Array) -> Array:
        return k.reshape(k.shape[0], -1).T

    def bias_in(b: Array) -> Array:  # [H·K] -> [H, K]
        return b.reshape(heads, -1)

    def bias_out(b: Array) -> Array:
        return b.reshape(-1)

    def c_proj_in(w: Array) -> Array:  # [D out, H·K in] -> [H, K, D]
        return w.T.reshape(heads, -1, w.shape[0])

    def c_proj_out(k: Array) -> Array:
        return k.reshape(-1, k.shape[-1]).T

    for theirs, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        r[f"{prefix}attnpool.{theirs}.weight"] = (f"{pool}/{ours}_kernel", head_in, head_out)
        r[f"{prefix}attnpool.{theirs}.bias"] = (f"{pool}/{ours}_bias", bias_in, bias_out)
    r[f"{prefix}attnpool.c_proj.weight"] = (f"{pool}/out_kernel", c_proj_in, c_proj_out)
    r[f"{prefix}attnpool.c_proj.bias"] = (f"{pool}/out_bias", _same, _same)
    r[f"{prefix}attnpool.positional_embedding"] = (f"{pool}/pos_embedding", _same, _same)
    return r


def identity_projection(params: dict) -> None:
    """Import: the two-tower `image_projection` after open_clip's pool is the identity."""
    e = params["image"]["attnpool"]["out_bias"].shape[0]
    params["image_projection"] = np.eye(e, dtype=np.float32)


def fold_projection(params: dict) -> dict:
    """Export: `params` with `image_projection` folded into the attention pool's output
    projection (so open_clip's `c_proj` maps straight to `embed_dim`), without the projection."""
    p = np.asarray(params["image_projection"], np.float32)
    pool = dict(params["image"]["attnpool"])
    k = np.asarray(pool["out_kernel"], np.float32)
    pool["out_kernel"] = (k.reshape(-1, k.shape[-1]) @ p).reshape(*k.shape[:-1], p.shape[1])
    pool["out_bias"] = np.asarray(pool["out_bias"], np.float32) @ p
    image = {**params["image"], "attnpool": pool}
    return {**{k: v for k, v in params.items() if k != "image_projection"}, "image": image}


def counters(weights: dict) -> list[str]:
    """The BatchNorm counter names in an open_clip state_dict (ignored on import)."""
    return sorted(name for name in weights if name.endswith(COUNTERS))


def counter_names(rule_names) -> list[str]:
    """The counters open_clip's strict load expects beside the BatchNorms of `rule_names`."""
    return sorted(
        name.removesuffix(".running_mean") + COUNTERS
        for name in rule_names
        if name.endswith(".running_mean")
    )
