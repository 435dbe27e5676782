"""open_clip weights load into mmjax with equal embeddings, and export back strictly."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.interop import open_clip as oc

pytestmark = pytest.mark.interop
torch = pytest.importorskip("torch", reason="needs the interop extra: pip install -e '.[interop]'")
open_clip = pytest.importorskip(
    "open_clip", reason="needs the interop extra: pip install -e '.[interop]'"
)

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2},
}


def variant(**changes):
    cfg = copy.deepcopy(TINY)
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (cfg[section] if section else cfg)[field] = value
    return cfg


CONFIGS = {
    "clip": TINY,
    "quick_gelu": variant(quick_gelu=True),
    "no_ln_pre_head32_mlp2": variant(
        vision_cfg__no_ln_pre=True, vision_cfg__head_width=32, vision_cfg__mlp_ratio=2.0
    ),
    "sincos_siglip_bias": variant(vision_cfg__pos_embed_type="sin_cos_2d", init_logit_bias=-10.0),
}


def reference(cfg, seed=0):
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():  # move every weight off its init (zero biases, unit norms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(cfg, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    size = cfg["vision_cfg"]["image_size"]
    length, vocab = cfg["text_cfg"]["context_length"], cfg["text_cfg"]["vocab_size"]
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    tokens = np.zeros((batch, length), np.int64)
    for i, n in enumerate([3, length, 7, 11][:batch]):
        tokens[i, :n] = rng.integers(0, vocab - 1, n)  # id 0 inside the text, as CLIP's "!"
        tokens[i, 1] = 0
        tokens[i, n - 1] = vocab - 1  # EOT: the largest id
    return images, tokens


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def embeddings_of_reference(model, images, tokens):
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        txt = model.encode_text(torch.from_numpy(tokens)).numpy()
    return img, txt


@pytest.mark.parametrize("name", CONFIGS)
def test_loaded_weights_give_open_clip_embeddings(name):
    cfg = CONFIGS[name]
    ref = reference(cfg)
    model, variables = oc.load(cfg, ref.state_dict())
    images, tokens = inputs(cfg)
    ref_img, ref_txt = embeddings_of_reference(ref, images, tokens)
    img = model.apply(variables, jnp.asarray(images), method=model.encode_image)
    txt = model.apply(variables, jnp.asarray(tokens, jnp.int32), method=model.encode_text)
    # Same float32 math, other summation orders (XLA vs MKL GEMMs): ~1e-7, bound 1e-5.
    assert rel(np.asarray(img), ref_img) < 1e-5
    assert rel(np.asarray(txt), ref_txt) < 1e-5
    scale = float(np.exp(variables["params"]["logit_scale"]))
    np.testing.assert_allclose(scale, float(ref.logit_scale.detach().exp()), rtol=1e-6)


def test_export_loads_strictly_into_open_clip_and_round_trips(tmp_path):
    cfg = CONFIGS["sincos_siglip_bias"]
    ref = reference(cfg, seed=1)
    _, variables = oc.load(cfg, ref.state_dict())
    exported = oc.export(cfg, variables)
    fresh = open_clip.CLIP(**cfg)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for name, tensor in ref.state_dict().items():
        np.testing.assert_array_equal(fresh.state_dict()[name].numpy(), tensor.numpy(), name)
    # And from a .safetensors file, the format mmjax writes and prefers.
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file(exported, str(path))
    _, again = oc.load(cfg, str(path))
    for name, value in oc.export(cfg, again).items():
        np.testing.assert_array_equal(value, exported[name], name)


def test_mismatched_weights_are_listed():
    state = {k: v.clone() for k, v in reference(TINY).state_dict().items()}
    del state["visual.ln_pre.weight"]
    state["visual.extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing \['visual.ln_pre.weight'\].*visual.extra"):
        oc.load(TINY, state)
    state = reference(TINY).state_dict()
    state["visual.proj"] = torch.zeros(64, 16)
    with pytest.raises(ValueError, match=r"visual.proj: open_clip shape"):
        oc.load(TINY, state)


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="timm_model_name"):
        oc.load(variant(vision_cfg__timm_model_name="vit_base_patch16_224"), {})


@pytest.mark.slow
def test_import_finetune_export_round_trip(tmp_path, data_dir):
    """CLI import -> train.py's loop starting from the imported params (learning rate 0, so they
    must survive unchanged) -> CLI export from the train workdir -> open_clip strict load."""
    import json

    from safetensors.numpy import load_file, save_file

    from configs import open_clip as recipe
    from mmjax.main import train as run

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "patch_size": 8,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 24,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(cfg))
    ref = reference(cfg, seed=3)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.numpy() for k, v in ref.state_dict().items()}, str(weights))
    imported = tmp_path / "imported"
    assert (
        oc.main(
            [
                "--model-config",
                str(cfg_path),
                "--checkpoint",
                str(weights),
                "--workdir",
                str(imported),
            ]
        )
        == 0
    )

    config = recipe.get_config(str(imported / "open_clip_config.json"))
    config.init_from = str(imported / "params")
    config.optim.learning_rate = 0.0
    config.optim.weight_decay = 0.0
    config.total_steps = 1
    config.data.update(data_dir=data_dir, num_train=64, num_val=32)
    config.batch_size = 8
    config.eval.batch_size = 16
    summary = run(config, str(tmp_path / "run"))
    assert summary["steps"] == 1 and np.isfinite(summary["train/loss"])

    out = tmp_path / "exported.safetensors"
    assert (
        oc.main(
            ["--model-config", str(cfg_path), "--export", str(tmp_path / "run"), "--out", str(out)]
        )
        == 0
    )
    exported = load_file(str(out))
    fresh = open_clip.CLIP(**cfg)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    for name, tensor in ref.state_dict().items():
        np.testing.assert_array_equal(exported[name], tensor.numpy(), name)


def test_init_from_rejects_params_of_another_model(tmp_path):
    from mmjax import checkpoint

    _, variables = oc.load(TINY, reference(TINY).state_dict())
    checkpoint.save_params(str(tmp_path / "params"), variables["params"])
    _, target = oc.build(variant(vision_cfg__width=128, vision_cfg__head_width=64))
    with pytest.raises(ValueError, match=r"do not fit the model: .*patch_kernel.*\(192, 64\)"):
        checkpoint.restore_params(str(tmp_path / "params"), target)
