"""Parity report: open_clip ViT and ResNet configs against mmjax, with random weights.

    python -m mmjax.interop.open_clip_parity [--models ViT-B-32 ViT-B-16 ...] [--max-params 1.5e9]

For each model config shipped with open_clip: build it in open_clip (random init, fp32, no
download), load its state_dict into mmjax (`mmjax.interop.open_clip.load`), and report the
relative error of `encode_image` / `encode_text` on 2 random images and 2 token rows, plus the
strict re-export check (eval mode: a ResNet's BatchNorm uses its running statistics). Configs
mmjax cannot represent are listed with the reason; configs larger than `--max-params` are
skipped (both copies must fit in host memory).
"""

import argparse
import functools
import gc
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.interop import open_clip as oc
from mmjax.interop.open_clip_config import load_open_clip_config, mmjax_config_from_open_clip

DEFAULT_MODELS = (
    "ViT-B-32",
    "ViT-B-32-quickgelu",
    "ViT-B-16",
    "ViT-L-14",
    "ViT-L-14-336",
    "ViT-H-14",
    "ViT-g-14",
    "ViT-bigG-14",
    "ViT-B-16-SigLIP",
    "ViT-SO400M-14-SigLIP",
    "RN50",
    "RN101",
    "RN50x4",
)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(name: str, max_params: float) -> dict:
    import open_clip
    import torch

    cfg = load_open_clip_config(name)
    try:
        config, vocab = mmjax_config_from_open_clip(cfg)
    except ValueError as e:
        return {"model": name, "status": "unsupported", "reason": str(e)}
    torch.manual_seed(0)
    start = time.perf_counter()
    ref = open_clip.CLIP(**cfg).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    if n_params > max_params:
        return {"model": name, "status": "skipped", "reason": f"{n_params / 1e9:.2f}B params"}
    model, variables = oc.load(cfg, ref.state_dict())
    rng = np.random.default_rng(0)
    size, length = config.data.image_size, config.data.text_length
    images = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    tokens = np.zeros((2, length), np.int64)
    for i, n in enumerate((5, length)):
        tokens[i, :n] = rng.integers(0, vocab - 1, n)
        tokens[i, n - 1] = vocab - 1
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(tokens)).numpy()
    # Jitted: a ResNet run op by op (hundreds of small convolutions) is slower than compiling.
    encode_image = jax.jit(functools.partial(model.apply, method=model.encode_image))
    img = np.asarray(encode_image(variables, jnp.asarray(images)))
    txt = np.asarray(
        model.apply(variables, jnp.asarray(tokens, jnp.int32), method=model.encode_text)
    )
    exported = oc.export(cfg, variables)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    result = {
        "model": name,
        "status": "ok",
        "params": n_params,
        "image_rel_err": _rel(img, ref_img),
        "text_rel_err": _rel(txt, ref_txt),
        "export_strict_load": True,
        "seconds": round(time.perf_counter() - start, 1),
    }
    del ref, model, variables, exported
    gc.collect()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmjax.interop.open_clip_parity")
    parser.add_argument("--models", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--max-params", type=float, default=1.5e9)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        r = check(name, args.max_params)
        results.append(r)
        if r["status"] == "ok":
            print(
                f"{name:24s} ok   image {r['image_rel_err']:.1e}  text {r['text_rel_err']:.1e}  "
                f"({r['params'] / 1e6:.0f}M params, strict re-export, {r['seconds']} s)",
                flush=True,
            )
        else:
            print(f"{name:24s} {r['status']}: {r['reason']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    bad = [
        r
        for r in results
        if r["status"] == "ok" and max(r["image_rel_err"], r["text_rel_err"]) > 1e-5
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
