"""Video QA as answer classification on the built-in moving-shapes clips: "which way is the red
shape moving?", "what colour is the shape that is standing still?", "is the moving shape going
up?", ... (24 answers). The fusion classifier of configs/fusion.py with the video tower of
configs/video_contrastive.py in place of the ViT: text layers cross-attend to the tubelets.
task/chance is the blind baseline (each question type answered with its most frequent training
answer).

Run: python train.py --config configs/video_qa.py
"""

from configs import fusion
from configs.video_contrastive import video_settings


def get_config():
    c = fusion.get_config()
    c.task = "video_qa"
    c.data.name = "moving_shapes"
    c.data.image_size = 32
    c.data.num_train = 3000  # clips; about 5.5 questions each
    c.data.num_val = 300
    # The longest question ("is the moving shape going down and to the right?") is 48 bytes,
    # plus BOS and EOT.
    c.data.text_length = 56
    # Grounding the questions takes ~1000 steps (colours first); 4 frames (2 tubelets in time)
    # halve the cost of each.
    c.total_steps = 1000
    c.eval_every = 250
    c.checkpoint_every = 250
    c.model.image.patch_size = 8
    c.model.image.depth = 2
    c.model.fusion.kind = "cross_attention"
    c.model.fusion.depth = 2
    c.video = video_settings()
    c.video.frames = 4
    return c
