"""Training objectives as pure JAX functions on global arrays (jit/grad friendly, static shapes).

Per-example losses come back as `[B]` (reduce with `jnp.mean` or `masked_mean`), math in float32;
`multitask.weighted_sum` combines named scalar losses into the optimised total.
"""

from mmjax.objectives.adversarial import (
    dann_lambda,
    gradient_reversal,
    modality_discriminator_loss,
)
from mmjax.objectives.distill import embedding_distill_loss, similarity_kd_loss
from mmjax.objectives.matching import (
    itm_batch_indices,
    itm_loss,
    mine_hard_negatives,
    take_pairs,
)
from mmjax.objectives.metric import (
    bidirectional_triplet,
    cosine_similarity,
    l2_normalize,
    triplet_from_similarity,
    triplet_loss,
)
from mmjax.objectives.mlm import mask_tokens, mlm_loss
from mmjax.objectives.multitask import weighted_sum
from mmjax.objectives.reduce import masked_mean

__all__ = [
    "bidirectional_triplet",
    "cosine_similarity",
    "dann_lambda",
    "embedding_distill_loss",
    "gradient_reversal",
    "itm_batch_indices",
    "itm_loss",
    "l2_normalize",
    "mask_tokens",
    "masked_mean",
    "mine_hard_negatives",
    "mlm_loss",
    "modality_discriminator_loss",
    "similarity_kd_loss",
    "take_pairs",
    "triplet_from_similarity",
    "triplet_loss",
    "weighted_sum",
]
