"""Analytic model FLOPs of a two-tower model: the work the architecture needs, whatever runs it.

Convention: 2 FLOPs per multiply-add of every matmul (and convolution); element-wise work
(LayerNorm, GELU, softmax, residual adds, the optimizer) is not counted, nor is recomputation from
rematerialisation. This is the numerator of MFU: a faster implementation of the same model cannot
raise it, unlike XLA's `cost_analysis()` count, which includes element-wise work and whatever the
compiler actually emits.

It is also open_clip's convention: its `docs/model_profile.csv` comes from
`torch.utils.flop_counter.FlopCounterMode`, which counts 2 × multiply-adds for matmuls,
convolutions and attention. For ViT-B-16 (224 px, context 77) this module gives image 35.13,
text 5.96, total 41.09 GFLOP per sample forward — the published image_gflops, text_gflops and
gflops. The published total is image + text only: the contrastive logits are computed in the loss,
outside the model's forward pass.

Per sample, with N tokens of width D, MLP width M and L layers, a Transformer encoder costs
  2·N·(3D² + D² + 2DM)   [q/k/v, output projection, MLP]  +  2·2·N²·D   [QKᵀ and AV]
per layer; attention is counted in full (a causal mask skips no work in XLA's or PyTorch's
default kernels). The token-embedding lookup is a gather, not a matmul. Only the pooled token is
projected to the embedding space. Training counts 3 × forward (the backward pass has two matmuls
per forward one: gradients with respect to inputs and to weights).
"""

import ml_collections


def encoder_flops(tokens: int, width: int, mlp_dim: int, depth: int) -> int:
    """Forward FLOPs of `depth` pre-LN Transformer blocks over one sequence of `tokens`."""
    projections = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp_dim)
    attention = 2 * 2 * tokens * tokens * width  # QKᵀ and AV, summed over heads
    return depth * (projections + attention)


def image_tokens(config: ml_collections.ConfigDict) -> int:
    """Sequence length of the image tower: patches (after any stem) plus the class token."""
    m = config.model.image
    side = config.data.image_size
    for _ in m.stem_channels:
        side = -(-side // 2)  # stride-2 SAME convolution
    patches = (side // m.patch_size) ** 2
    return patches + (1 if m.pool == "cls" else 0)


def resnet_forward_flops(config: ml_collections.ConfigDict) -> int:
    """Per-sample forward FLOPs of the ResNet image tower (`mmjax.models.resnet`): its
    convolutions (2·k²·C_in·C_out per output pixel) and the attention pool (key and value
    projections of every position, one query and its attention, and the output projection of
    the pooled output and of every position's token, see `resnet.AttentionPool`)."""
    m = config.model.image
    conv = lambda side, k, c_in, c_out: 2 * side * side * k * k * c_in * c_out
    w, side = m.resnet_width, config.data.image_size // 2
    flops = conv(side, 3, 3, w // 2) + conv(side, 3, w // 2, w // 2) + conv(side, 3, w // 2, w)
    side, channels = side // 2, w  # the stem's average pool
    for stage, blocks in enumerate(m.layers):
        planes = w * 2**stage
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            flops += conv(side, 1, channels, planes) + conv(side, 3, planes, planes)
            out_side = side // stride  # the average pool after the 3×3 convolution
            flops += conv(out_side, 1, planes, 4 * planes)
            if b == 0:  # the shortcut's 1×1 convolution
                flops += conv(out_side, 1, channels, 4 * planes)
            side, channels = out_side, 4 * planes
    n = side * side + 1  # positions and their mean
    flops += 2 * 2 * n * channels * channels + 2 * channels * channels  # keys, values; one query
    flops += 2 * 2 * n * channels + 2 * n * channels * m.width  # attention, output projections
    return flops + 2 * m.width * config.model.embed_dim  # the two-tower projection


def image_forward_flops(config: ml_collections.ConfigDict) -> int:
    """Per-sample forward FLOPs of the image tower and its projection."""
    m = config.model.image
    if m.get("kind", "vit") == "resnet":
        return resnet_forward_flops(config)
    side, channels, flops = config.data.image_size, 3, 0
    for out_channels in m.stem_channels:  # 3×3 stride-2 convolutions
        side = -(-side // 2)
        flops += 2 * side * side * 9 * channels * out_channels
        channels = out_channels
    patches = (side // m.patch_size) ** 2
    flops += 2 * patches * (m.patch_size**2 * channels) * m.width  # patch embedding
    flops += encoder_flops(image_tokens(config), m.width, m.mlp_dim, m.depth)
    return flops + 2 * m.width * config.model.embed_dim  # projection of the pooled token


def text_forward_flops(config: ml_collections.ConfigDict) -> int:
    """Per-sample forward FLOPs of the text tower (context `data.text_length`) and projection."""
    m = config.model.text
    flops = encoder_flops(config.data.text_length, m.width, m.mlp_dim, m.depth)
    return flops + 2 * m.width * config.model.embed_dim


def logits_forward_flops(config: ml_collections.ConfigDict, batch: int) -> int:
    """Per-sample share of the B×B logits matmul (B·B·E multiply-adds per batch)."""
    return 2 * batch * config.model.embed_dim


def model_flops(config: ml_collections.ConfigDict, batch: int) -> dict[str, int]:
    """Per-sample forward FLOPs by part, and the model FLOPs of one training step on `batch`."""
    image = image_forward_flops(config)
    text = text_forward_flops(config)
    logits = logits_forward_flops(config, batch)
    forward = image + text + logits
    return {
        "image_forward_per_sample": image,
        "text_forward_per_sample": text,
        "logits_forward_per_sample": logits,
        "forward_per_sample": forward,
        "train_per_step": 3 * forward * batch,
    }


def train_step_flops(config: ml_collections.ConfigDict, batch: int) -> int:
    """Model FLOPs of one training step (forward + backward) over a global batch."""
    return model_flops(config, batch)["train_per_step"]
