"""open_clip ResNet image towers (RN50-style, small): weights load into mmjax with equal
embeddings (eval mode: BatchNorm running statistics) and export back strictly, round trip exact."""

import copy
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.interop import open_clip as oc
from tests.test_open_clip_interop import inputs, rel
from tests.test_open_clip_interop import reference as vit_reference

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
open_clip = pytest.importorskip(
    "open_clip", reason="needs the interop extra: pip install -e '.[interop]'"
)

# RN50's structure at test size: 8 stem channels, heads of 16 over the 256 final features.
SMALL_RN = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 64,
        "layers": [1, 2, 1, 1],
        "width": 8,
        "head_width": 16,
        "patch_size": None,
    },
    "text_cfg": {"context_length": 12, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
}


def reference(cfg, seed=0):
    """open_clip's model in eval mode, every weight (`test_open_clip_interop.reference`) and
    BatchNorm statistic moved off its init (zero means, unit variances)."""
    model = vit_reference(cfg, seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return model


@pytest.mark.parametrize("image_size", [64, 96])
def test_resnet_weights_give_open_clip_embeddings(image_size):
    cfg = copy.deepcopy(SMALL_RN)
    cfg["vision_cfg"]["image_size"] = image_size
    ref = reference(cfg)
    model, variables = oc.load(cfg, ref.state_dict())
    assert set(variables) == {"params", "batch_stats"}
    images, tokens = inputs(cfg)
    with torch.no_grad():
        ref_img = ref.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        ref_txt = ref.encode_text(torch.from_numpy(tokens)).numpy()
    # Immutable batch_stats: the running statistics, as open_clip's eval mode. (Jitted: a
    # ResNet run op by op takes longer than its compile.)
    img = jax.jit(partial(model.apply, method=model.encode_image))(variables, images)
    txt = model.apply(variables, jnp.asarray(tokens, jnp.int32), method=model.encode_text)
    # Same float32 math, other summation orders: ~1e-7, bound 1e-5.
    assert rel(np.asarray(img), ref_img) < 1e-5
    assert rel(np.asarray(txt), ref_txt) < 1e-5


def test_resnet_export_loads_strictly_and_round_trips():
    ref = reference(SMALL_RN, seed=1)
    _, variables = oc.load(SMALL_RN, ref.state_dict())
    exported = oc.export(SMALL_RN, variables)
    fresh = open_clip.CLIP(**SMALL_RN)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for name, tensor in ref.state_dict().items():
        if name.endswith("num_batches_tracked"):  # a counter, not a weight: exported as 0
            continue
        np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), tensor.numpy(), name)


def test_export_folds_a_trained_image_projection():
    """After training, the two-tower `image_projection` is no longer the identity: the export
    folds it into the attention pool's output projection, and open_clip computes the same
    embeddings as mmjax."""
    ref = reference(SMALL_RN, seed=2)
    model, variables = oc.load(SMALL_RN, ref.state_dict())
    rng = np.random.default_rng(0)
    p = variables["params"]["image_projection"]
    variables["params"]["image_projection"] = p + 0.1 * rng.normal(size=p.shape).astype(p.dtype)
    fresh = open_clip.CLIP(**SMALL_RN).eval()
    exported = oc.export(SMALL_RN, variables)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    images, _ = inputs(SMALL_RN)
    with torch.no_grad():
        want = fresh.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    got = jax.jit(partial(model.apply, method=model.encode_image))(variables, images)
    assert rel(np.asarray(got), want) < 1e-5
