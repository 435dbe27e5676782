"""The default recipe with adversarial modality alignment next to the contrastive loss.

Run: python train.py --config configs/adversarial.py
A small MLP (the modality discriminator, trained with the model) learns to tell image from text
embeddings; behind a gradient reversal layer the towers learn to make them indistinguishable,
closing the "modality gap" between the two embedding clouds. Its pull on the towers ramps up
with DANN's λ (0 at the start, above 0.9 after a third of the run with adversarial_gamma=10).
`train/modality_accuracy` is the discriminator's accuracy: 0.5 = the modalities are aligned.
"""

from mmjax import config as base


def get_config():
    c = base.get_config()
    c.objective.adversarial = 0.1
    c.objective.adversarial_gamma = 10.0
    return c
