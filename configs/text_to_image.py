"""Text→image generation, DALL-E style, on the built-in shapes captions: a decoder-only
Transformer over [caption bytes; 8×8 image codes] whose image codes come from a frozen image
tokenizer trained first; sampled with the key/value cache, optionally with classifier-free
guidance, and judged on prompts of held-out colour–shape compositions.

Run: python train.py --config configs/image_tokenizer.py --workdir workdirs/image_tokenizer
     python train.py --config configs/text_to_image.py
     python -m mmjax.generate --workdir workdirs/text_to_image --text "a small red circle on the left" --num 16 --out samples
"""

import ml_collections

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.task = "text_to_image"
    # The image tokenizer's run directory (task=image_tokenizer): its newest checkpoint is loaded
    # when a run starts and never updated.
    c.image_tokenizer_from = "workdirs/image_tokenizer"
    c.total_steps = 900
    c.batch_size = 32
    c.eval_every = 0  # sampling 128 images is the expensive part of an evaluation
    c.checkpoint_every = 300
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 50
    c.optim.text_frozen_steps = 0  # no text tower
    # Mostly a full description (every attribute named), the English (caption 0) and the
    # Chinese one (caption 6) equally often: with only the English one canonical, the Chinese
    # full description was 2.5% of the draws and Chinese prompts came out at chance colour
    # (README: held-out colour 0.145 vs 0.717 with both canonical).
    c.data.first_caption_prob = 0.9
    c.data.canonical_captions = (0, 6)
    c.data.text_length = 64  # a Chinese full description is ~50 bytes
    c.text_to_image = ml_collections.ConfigDict(
        dict(
            width=128,
            depth=4,
            num_heads=4,
            mlp_dim=512,
            text_weight=0.125,  # DALL-E's 1/8 text, 7/8 image
            image_weight=0.875,
            text_drop_prob=0.15,  # the empty caption: the unconditional model of guidance
            # Sampling at evaluation (python -m mmjax.generate has its own flags): temperature
            # 0 = greedy, top_k 0 / top_p 1 = off, guidance 1 = none.
            temperature=1.0,
            top_k=0,
            top_p=0.9,
            guidance=1.0,
            eval_prompts=8,  # held-out compositions (one per held-out colour–shape pair)
            eval_samples=16,  # samples per prompt
        )
    )
    return c
