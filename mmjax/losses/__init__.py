"""Every loss, as pure JAX functions on global arrays (jit/grad friendly, static shapes):
contrastive (`contrastive.py` naive, `contrastive_sharded.py` gathered / ring-chunked), triplet,
adversarial, distillation, image–text matching, masked LM, captioning, and their weighted sum.

Per-example losses come back as `[B]` (reduce with `jnp.mean` or `masked_mean`), math in float32;
`multitask.weighted_sum` combines named scalar losses into the optimised total.
"""

from mmjax.losses.adversarial import (
    dann_lambda,
    gradient_reversal,
    modality_discriminator_loss,
)
from mmjax.losses.captioning import caption_nll, mean_caption_loss
from mmjax.losses.contrastive import (
    KINDS,
    pairwise_logits,
    sigmoid_contrastive,
    softmax_contrastive,
)
from mmjax.losses.contrastive_sharded import IMPLS, contrastive_loss_sharded
from mmjax.losses.distill import embedding_distill_loss, similarity_kd_loss
from mmjax.losses.matching import (
    itm_batch_indices,
    itm_loss,
    mine_hard_negatives,
    take_pairs,
    use_extra_text_negatives,
)
from mmjax.losses.mlm import mask_tokens, mlm_loss
from mmjax.losses.multitask import weighted_sum
from mmjax.losses.reduce import masked_mean
from mmjax.losses.text_to_image import image_nll, text_nll
from mmjax.losses.triplet import (
    bidirectional_triplet,
    cosine_similarity,
    l2_normalize,
    triplet_from_similarity,
    triplet_loss,
)

__all__ = [
    "IMPLS",
    "KINDS",
    "bidirectional_triplet",
    "caption_nll",
    "contrastive_loss_sharded",
    "cosine_similarity",
    "dann_lambda",
    "embedding_distill_loss",
    "gradient_reversal",
    "image_nll",
    "itm_batch_indices",
    "itm_loss",
    "l2_normalize",
    "mask_tokens",
    "masked_mean",
    "mean_caption_loss",
    "mine_hard_negatives",
    "mlm_loss",
    "modality_discriminator_loss",
    "pairwise_logits",
    "sigmoid_contrastive",
    "similarity_kd_loss",
    "softmax_contrastive",
    "take_pairs",
    "text_nll",
    "triplet_from_similarity",
    "triplet_loss",
    "use_extra_text_negatives",
    "weighted_sum",
]
