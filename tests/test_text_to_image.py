"""The text→image prior (task=text_to_image): causal masking, cached sampling = full recompute,
guidance, top-k/top-p, the loss, the judge, sharded = single device, bad settings and the
generate command's errors (fast); exact resume and `python -m mmjax.generate` end to end (slow).
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import image_tokenizer as tokenizer_recipe
from configs import text_to_image as recipe
from mmjax import generate, losses, parallel
from mmjax.errors import ConfigError
from mmjax.eval import image_judge
from mmjax.main import train
from mmjax.models.image_prior import TextImagePrior
from mmjax.models.image_sampling import Sampling, filter_logits, sample_codes
from mmjax.models.vqvae import build_vqvae
from mmjax.tasks import get_task, text_to_image
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from mmjax.train.validate import validate_config
from tests.conftest import tiny
from tests.test_tasks import assert_resumes_exactly

TEXT_VOCAB, CODES, L, N = 16, 8, 5, 6


@pytest.fixture(scope="module")
def prior():
    model = TextImagePrior(TEXT_VOCAB, CODES, L, N, width=16, depth=2, num_heads=2, mlp_dim=32)
    text, codes = random_sequence(0)
    return model, nn.unbox(jax.jit(model.init)(jax.random.key(2), text, codes)["params"])


def random_sequence(seed, batch=3):
    k1, k2 = jax.random.split(jax.random.key(seed))
    text = jax.random.randint(k1, (batch, L), 0, TEXT_VOCAB)
    return text, jax.random.randint(k2, (batch, N), 0, CODES)


def test_a_future_token_never_changes_an_earlier_logit(prior):
    model, params = prior
    text, codes = random_sequence(1)
    text_logits, image_logits = model.apply({"params": params}, text, codes)
    # Change image code 3 (sequence position L + 3): logits of positions <= L + 2 are the same
    # (text logits and the image logits predicting codes 0..3), later ones differ.
    changed = codes.at[:, 3].set((codes[:, 3] + 1) % CODES)
    text2, image2 = model.apply({"params": params}, text, changed)
    np.testing.assert_array_equal(text2, text_logits)
    np.testing.assert_array_equal(image2[:, :4], image_logits[:, :4])
    assert not np.allclose(image2[:, 4:], image_logits[:, 4:])
    # Change text token 2: text logits at positions 0, 1 stay, the rest move.
    text3, image3 = model.apply({"params": params}, text.at[:, 2].set((text[:, 2] + 1) % 16), codes)
    np.testing.assert_array_equal(text3[:, :2], text_logits[:, :2])
    assert not np.allclose(text3[:, 2:], text_logits[:, 2:])
    assert not np.allclose(image3, image_logits)


SAMPLINGS = {
    "greedy": Sampling(temperature=0.0),
    "top_k_top_p_guidance": Sampling(temperature=1.1, top_k=5, top_p=0.8, guidance=2.5),
}


@pytest.mark.parametrize("name", SAMPLINGS)
def test_cached_sampling_equals_full_recompute(prior, name):
    model, params = prior
    text, _ = random_sequence(3)
    uncond = jnp.array([1, 2, 0, 0, 0])

    def sample(cache):
        fn = lambda p, t, k: sample_codes(model, p, t, k, SAMPLINGS[name], uncond, cache)
        return jax.jit(fn)(params, text, jax.random.key(7))

    cached, full = sample(True), sample(False)
    assert cached.shape == (3, N) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, full)
    assert int(cached.min()) >= 0 and int(cached.max()) < CODES


def test_guidance_zero_is_the_unconditional_model(prior):
    model, params = prior
    text, _ = random_sequence(4)
    uncond = jnp.array([1, 2, 0, 0, 0])
    key = jax.random.key(9)
    sample = jax.jit(sample_codes, static_argnums=(0, 4))
    guided = sample(model, params, text, key, Sampling(0.8, guidance=0.0), uncond)
    plain = sample(model, params, jnp.broadcast_to(uncond, text.shape), key, Sampling(0.8), uncond)
    np.testing.assert_array_equal(guided, plain)
    assert len(np.unique(np.asarray(guided))) > 1  # sampled, not one token repeated


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (5, 0.3)])
def test_top_k_and_top_p_never_sample_outside_the_allowed_set(top_k, top_p):
    logits = jax.random.normal(jax.random.key(0), (4, 32)) * 2.0
    # The allowed set, in numpy: the top k, then the fewest most likely tokens reaching top_p.
    order = np.argsort(-np.asarray(logits), axis=1)
    allowed = []
    for row, idx in zip(np.asarray(logits), order, strict=True):
        keep = idx[:top_k] if top_k else idx
        p = np.exp(row[keep] - row[keep].max())
        p /= p.sum()
        cum_before = np.cumsum(p) - p
        allowed.append(set(keep[cum_before < top_p].tolist()))
    filtered = filter_logits(logits, top_k, top_p)
    draws = jax.vmap(lambda k: jax.random.categorical(k, filtered))(
        jax.random.split(jax.random.key(1), 400)
    )
    for row in range(4):
        assert set(np.asarray(draws[:, row]).tolist()) == allowed[row]  # all of it, only it


def test_losses_ignore_text_padding():
    text = jnp.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]])
    logits = jax.random.normal(jax.random.key(0), (2, 5, 9))
    logp = np.asarray(jax.nn.log_softmax(logits))
    targets = [(0, 0, 5), (0, 1, 6), (0, 2, 2), (1, 0, 7), (1, 1, 2)]  # (row, position, id)
    expected = -np.mean([logp[b, t, v] for b, t, v in targets])
    np.testing.assert_allclose(losses.text_nll(logits, text, 0), expected, rtol=1e-6)
    codes = jnp.array([[3, 1], [0, 2]])
    image_logits = jax.random.normal(jax.random.key(1), (2, 2, 4))
    want = optax.softmax_cross_entropy_with_integer_labels(image_logits, codes).mean()
    np.testing.assert_allclose(losses.image_nll(image_logits, codes), want, rtol=1e-6)


def test_the_judge_reads_ground_truth_renders():
    images, labels = image_judge.reference_renders(64, 144, 0, "validation")
    accuracy = image_judge.accuracies(image_judge.fitted_judge(64).predict(images), labels)
    assert accuracy["color"] >= 0.97 and accuracy["position"] >= 0.97, accuracy
    assert accuracy["size"] >= 0.9 and accuracy["shape"] >= 0.9, accuracy


# --- the task, with a randomly initialised tokenizer ------------------------------------------


def tiny_tokenizer_config():
    c = tokenizer_recipe.get_config()
    c.vqvae.update(codebook_size=16, code_dim=4, channels=(8, 8, 8), res_blocks=0)
    return c


def random_tokenizer_run(workdir=None):
    """(model, variables) of a random tiny VQ-VAE (16 codes, 8 pixels per token): what
    `image_tokenizer_from` gives tests that need no trained tokenizer."""
    model = build_vqvae(tiny_tokenizer_config())
    return model, nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))


@pytest.fixture
def random_tokenizer(monkeypatch):
    """`image_tokenizer_from` answered by a random VQ-VAE (2×2 codes of 16 at 16 px)."""
    run = random_tokenizer_run()
    monkeypatch.setattr(text_to_image, "_tokenizer_run", lambda workdir: run)
    return run[1]


def tiny_t2i(data_dir=None, tokenizer_from="tokenizer"):
    c = tiny(recipe.get_config(), data_dir)
    c.image_tokenizer_from = tokenizer_from
    c.text_to_image.update(width=32, depth=1, num_heads=2, mlp_dim=64, eval_prompts=2)
    c.text_to_image.eval_samples = 4
    return c


def synthetic_batch(batch=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 200, size=(batch, 16)).astype(np.int32)
    tokens[:, 0], tokens[:, 10], tokens[:, 11:] = 1, 2, 0
    return {"image": rng.normal(size=(batch, 16, 16, 3)).astype(np.float32), "tokens": tokens}


def one_step(config, devices):
    config.data.update(image_size=16, text_length=16)  # 2×2 image tokens: compile is the cost
    mesh = parallel.make_mesh(config.mesh, devices)
    trainer = build_trainer(get_task("text_to_image"), config, mesh, 264)
    state = trainer.init(jax.random.key(0))
    before = jax.device_get(state.params["tokenizer"])
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        batch = parallel.global_batch(synthetic_batch(), trainer.batch_sharding)
        state, metrics = trainer.step(state, batch, NO_CEILING)
    values = [float(metrics[k]) for k in ("train/loss", "train/grad_norm")]
    return np.array(values), jax.device_get(state.params), before


@pytest.mark.slow  # two compiles of the whole train step: past the fast tier's budget
@pytest.mark.multidevice
def test_one_sharded_step_equals_single_device(random_tokenizer):
    single = tiny_t2i()
    single.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    sharded = tiny_t2i()
    sharded.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2))
    loss1, params1, _ = one_step(single, jax.devices()[:1])
    loss8, params8, tokenizer8 = one_step(sharded, jax.devices())
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)  # loss and gradient norm
    # fp32 reductions reordered across devices; Adam's first step divides by |g| + eps, so a
    # gradient element near 0 can move its update by ~1e-6 (of parameters ~1e-2).
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-6)
    jax.tree.map(close, params8, params1)
    # The tokenizer is frozen: the step did not move it.
    jax.tree.map(np.testing.assert_array_equal, params8["tokenizer"], tokenizer8)


def test_bad_settings_are_named(random_tokenizer):
    task = get_task("text_to_image")
    cases = {
        "image_tokenizer_from is not set": dict(image_tokenizer_from=""),
        "needs the unconditional model": {
            "text_to_image.guidance": 3.0,
            "text_to_image.text_drop_prob": 0.0,
        },
        "data.name='shapes'": {"data.name": "digits"},
        "has no text tower": {"optim.text_frozen_steps": 10},
        "has its own model": {"model.image.depth": 7},
    }
    for message, overrides in cases.items():
        config = tiny_t2i()
        for key, value in overrides.items():
            *path, last = key.split(".")
            node = config
            for p in path:
                node = node[p]
            node[last] = value
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            validate_config(config, task)


def test_generate_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    other = tmp_path / "contrastive"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"task": "contrastive", "rules": []}))
    t2i = tmp_path / "t2i"
    t2i.mkdir()
    config = recipe.get_config()
    (t2i / "config.json").write_text(config.to_json())
    out = tmp_path / "out"
    cases = {
        "is a task='contrastive' run": ["--workdir", str(other), "--text", "a red star"],
        "the model reads prompts of at most 62": ["--workdir", str(t2i), "--text", "红" * 21],
        "does not exist": ["--workdir", str(tmp_path / "missing"), "--text", "a"],
    }
    for message, argv in cases.items():
        assert generate.main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not out.exists()


# --- slow: real runs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory, data_dir):
    """A (barely) trained tiny image tokenizer run."""
    workdir = str(tmp_path_factory.mktemp("tokenizer"))
    config = tiny(tiny_tokenizer_config(), data_dir)
    config.total_steps = 2
    train(config, workdir)
    return workdir


@pytest.mark.slow
def test_task_run_resumes_exactly(tmp_path, data_dir, tokenizer_run):
    first = assert_resumes_exactly(lambda: tiny_t2i(data_dir, tokenizer_run), tmp_path)
    assert first["task/metric_name"] == "color_position" and 0 < first["task/chance"] < 0.2


@pytest.mark.slow
def test_generate_writes_reranked_images_deterministically(tmp_path, data_dir, tokenizer_run):
    t2i = str(tmp_path / "t2i")
    train(tiny_t2i(data_dir, tokenizer_run), t2i)
    clip = str(tmp_path / "clip")
    from mmjax import config as base_config

    train(tiny(base_config.get_config(), data_dir), clip)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "mmjax.generate", "--workdir", t2i, "--num", "4"]
        cmd += ["--text", "一个红色的圆形", "--out", str(out), "--seed", "3", "--rerank-with", clip]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        outs.append(out)
    files = sorted(os.listdir(outs[0]))
    assert files == ["000.png", "001.png", "002.png", "003.png", "grid.png", "scores.json"]
    scores = json.loads((outs[0] / "scores.json").read_text())
    values = [entry["score"] for entry in scores["images"]]
    assert values == sorted(values, reverse=True) and scores["prompt"] == "一个红色的圆形"
    assert sorted(e["sample"] for e in scores["images"]) == [0, 1, 2, 3]
    for name in files:  # the same seed: the same images, bit for bit
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


@pytest.mark.slow
def test_decode_bench_samples_the_same_codes_with_and_without_the_cache(tmp_path, capsys):
    from mmjax.bench.__main__ import main

    spec = tmp_path / "tiny_t2i.py"
    spec.write_text(
        "from configs import text_to_image\n\n\ndef get_config():\n"
        "    c = text_to_image.get_config()\n"
        "    c.text_to_image.update(width=32, depth=2, num_heads=2, mlp_dim=64)\n"
        "    c.data.update(image_size=32, text_length=16)\n    return c\n"
    )
    args = ["decode", "--config", str(spec), "--batch", "2", "--rounds", "1", "--json"]
    assert main([*args, "--codebook-size", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["mode"], r["length"]) for r in result["runs"]] == [("greedy", 16), ("sampled", 16)]
    for run in result["runs"]:
        assert run["same_captions"], run
        assert run["cache_tokens_per_s"] == pytest.approx(2 * 16 / run["cache_s"])


def test_chinese_heldout_prompts_name_the_same_compositions():
    from mmjax.data.builtin import shapes
    from mmjax.eval.generated_images import heldout_prompts

    english, wanted = heldout_prompts(16)
    chinese, wanted_zh = heldout_prompts(16, "zh")
    for a in wanted:
        np.testing.assert_array_equal(wanted[a], wanted_zh[a])
    for i, prompt in enumerate(chinese):
        for names, a in ((shapes.SHAPES_ZH, "shape"), (shapes.COLORS_ZH, "color")):
            assert names[wanted[a][i]] in prompt
        assert prompt.startswith(shapes.POSITIONS_ZH[wanted["position"][i]] + "有一个")
    assert all(p.isascii() for p in english) and not any(p.isascii() for p in chinese)
