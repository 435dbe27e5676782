"""Image tokenizer: a VQ-VAE that turns a 64 px `shapes` image into 8×8 = 64 discrete codes
(of 512) and back, the tokens of the text→image prior (configs/text_to_image.py reads this
run through `image_tokenizer_from`). Reported: validation PSNR next to the PSNR of predicting
the mean image, and the fraction of codes used.

Run: python train.py --config configs/image_tokenizer.py --workdir /tmp/mmjax-image-tokenizer
"""

import ml_collections

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.task = "image_tokenizer"
    c.data.name = "shapes"
    c.data.image_size = 64
    c.total_steps = 1000
    c.batch_size = 32
    c.eval_every = 500
    c.checkpoint_every = 500
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.optim.text_frozen_steps = 0  # there is no text tower
    # Three stride-2 levels: 64 px -> an 8x8 grid. Losses: see mmjax/tasks/image_tokenizer.py.
    c.vqvae = ml_collections.ConfigDict(
        dict(
            codebook_size=512,
            code_dim=16,
            channels=(32, 64, 128),
            res_blocks=2,
            recon=1.0,
            codebook=1.0,
            commitment=0.25,
            restart=1.0,
        )
    )
    return c
