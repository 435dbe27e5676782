"""open_clip's training step on the same model, the reference that `--vs-open-clip` times.

The step is what open_clip's own training loop does per batch: forward, `ClipLoss` (or
`SigLipLoss`), backward, gradient clipping, `torch.optim.AdamW` with the learning rate set from a
warmup-cosine schedule, and `zero_grad`, at one of open_clip's precisions (`PRECISIONS`: float32,
or `amp_bf16` = forward and loss under `torch.autocast("cpu"|"cuda", bfloat16)`, as its
`--precision amp_bf16` does), optionally with the model under `torch.compile`. Hyper-parameters
and the weight-decay split (matrices decayed; biases, norms, embeddings and the temperature not)
follow mmjax's optimizer, so the two steps do the same work. The model is randomly initialised:
nothing is downloaded. `mmjax.bench.peer_worker` runs it in a process of its own.

torch and open_clip are optional (`pip install -e '.[bench]'`); `require()` fails with that hint
before the benchmark spends any time compiling JAX programs.
"""

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable

import ml_collections
import numpy as np

INSTALL_HINT = "--vs-open-clip needs torch and open_clip: pip install -e '.[bench]'"
PRECISIONS = ("float32", "amp_bf16")


def require() -> None:
    """Exits with one line naming the fix if torch or open_clip cannot be imported."""
    try:
        import open_clip  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{INSTALL_HINT} ({e})") from None


@dataclasses.dataclass(frozen=True)
class Peer:
    step: Callable[[], float]  # one training step; returns the loss (synchronises the device)
    param_count: int
    device: str
    threads: int


def warmup_cosine(step: int, optim: ml_collections.ConfigDict, total_steps: int) -> float:
    """mmjax's learning-rate schedule in plain Python (a JAX call per step would bill the torch
    step for JAX dispatch)."""
    peak, end = optim.learning_rate, optim.learning_rate * optim.end_lr_fraction
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak * step / warmup
    decay = max(total_steps - warmup, 1)
    progress = min(step - warmup, decay) / decay
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def open_clip_tokens(tokens_BL: np.ndarray, vocab_size: int, pad_id: int = 0) -> np.ndarray:
    """mmjax's synthetic token batch in open_clip's convention: same lengths and padding, the
    end-of-text token is the largest id (open_clip's default 'argmax' pooling finds it)."""
    valid_BL = tokens_BL != pad_id
    lengths_B = valid_BL.sum(axis=1)
    out_BL = np.where(valid_BL, tokens_BL % (vocab_size - 1), pad_id).astype(np.int64)
    out_BL[np.arange(len(out_BL)), lengths_B - 1] = vocab_size - 1
    return out_BL


def build_peer(
    open_clip_cfg: dict,
    config: ml_collections.ConfigDict,
    images_BHWC: np.ndarray,
    tokens_BL: np.ndarray,
    threads: int | None,
    use_gpu: bool,
    precision: str = "float32",
    compile_model: bool = False,
) -> Peer:
    """open_clip's model, loss and AdamW for `open_clip_cfg`, bound to one fixed batch.

    `tokens_BL` are mmjax's synthetic tokens (pad 0, one end-of-text each); they are re-encoded
    with open_clip's end-of-text convention. `use_gpu` runs on CUDA when torch can see a GPU.
    `precision` is one of PRECISIONS; `compile_model` wraps the model in `torch.compile`.
    """
    import open_clip
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)}")

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    sigmoid = open_clip_cfg.get("init_logit_bias") is not None
    model = open_clip.CLIP(
        embed_dim=open_clip_cfg["embed_dim"],
        vision_cfg=open_clip_cfg["vision_cfg"],
        text_cfg=open_clip_cfg["text_cfg"],
        init_logit_scale=math.log(10.0) if sigmoid else math.log(1 / 0.07),
        init_logit_bias=open_clip_cfg.get("init_logit_bias"),
    )
    model = model.to(device).train()
    forward = torch.compile(model) if compile_model else model
    autocast = (
        (lambda: torch.autocast(device, dtype=torch.bfloat16))
        if precision == "amp_bf16"
        else contextlib.nullcontext
    )

    o = config.optim
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Matrices are decayed, except embedding tables (token and positional).
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.learning_rate,
        betas=(o.b1, o.b2),
        eps=o.eps,
    )
    loss_fn = open_clip.loss.SigLipLoss() if sigmoid else open_clip.loss.ClipLoss()

    images_BCHW = torch.from_numpy(np.ascontiguousarray(images_BHWC.transpose(0, 3, 1, 2)))
    images_BCHW = images_BCHW.to(device)
    vocab = open_clip_cfg["text_cfg"].get("vocab_size", 49408)
    text_BL = torch.from_numpy(open_clip_tokens(tokens_BL, vocab)).to(device)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    count = [0]

    def step() -> float:
        lr = warmup_cosine(count[0], o, config.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():  # open_clip's amp: forward and loss only, backward outside
            outputs = forward(images_BCHW, text_BL)  # (img, txt, scale[, bias]), normalised
            loss = loss_fn(*outputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        count[0] += 1
        return loss.item()  # waits for the device

    return Peer(step, sum(p.numel() for p in model.parameters()), device, threads)
