"""The image tokenizer (task=image_tokenizer): VQ-VAE round trip, straight-through gradients,
dead-code restarts, sharded = single device, bad settings and workdirs, exact resume."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import image_tokenizer as recipe
from mmjax import parallel
from mmjax.data import sources
from mmjax.errors import ConfigError
from mmjax.eval.embed import EvalImages
from mmjax.losses import vq
from mmjax.models.vqvae import VQVAE, build_vqvae, grid_size, l2_normalize
from mmjax.tasks import get_task
from mmjax.tasks.image_tokenizer import load_image_tokenizer, pixel_mse
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from mmjax.train.validate import validate_config
from tests.conftest import tiny
from tests.test_tasks import assert_resumes_exactly

SIZE = 16  # 16 px through two stride-2 levels: a 4x4 grid


def tiny_config(data_dir=None) -> ml_collections.ConfigDict:
    c = tiny(recipe.get_config(), data_dir, image_size=SIZE)
    c.vqvae.update(codebook_size=16, code_dim=4, channels=(8, 16), res_blocks=1)
    c.optim.warmup_steps = 1
    return c


def images(n=4, seed=0):
    return jax.random.normal(jax.random.key(seed), (n, SIZE, SIZE, 3))


@pytest.fixture(scope="module")
def model_and_params():
    model = build_vqvae(tiny_config())
    return model, jax.jit(model.init)(jax.random.key(0), images(1))["params"]


def test_round_trip_shapes_range_and_determinism(model_and_params):
    model, params = model_and_params
    x = images()
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQVAE.encode))
    decode = jax.jit(lambda p, c: model.apply({"params": p}, c, method=VQVAE.decode))
    codes = encode(params, x)
    assert codes.shape == (4, 4, 4) and codes.dtype == jnp.int32
    assert grid_size(tiny_config()) == 4 and model.downsample == 4
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
    np.testing.assert_array_equal(encode(params, x), codes)
    recon = decode(params, codes)
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    # Training's forward pass decodes exactly the codes that `encode` picks (straight-through
    # changes gradients, not values): fp32 rounding of z + (q - z) is the only difference.
    out = jax.jit(model.apply)({"params": params}, x)
    np.testing.assert_array_equal(out.codes_Bhw, codes)
    np.testing.assert_allclose(out.images_BHWC, recon, atol=1e-5)
    # Decoding a code grid and encoding the image gives codes of the same grid and range.
    again = encode(params, recon)
    assert again.shape == codes.shape and int(again.max()) < model.codebook_size


def test_straight_through_gradient_reaches_the_encoder_not_the_codebook(model_and_params):
    model, params = model_and_params
    x = images()

    def recon_loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, x).images_BHWC - x))

    grads = jax.jit(jax.grad(recon_loss))(params)
    norm = lambda tree: float(optax.tree.norm(tree))
    assert norm(grads["encoder"]) > 1e-6 and norm(grads["decoder"]) > 1e-6
    # The codes enter the decoder only through stop_gradient(q - z): the codebook learns from
    # the codebook loss alone.
    assert norm(grads["codebook"]) == 0.0


def test_restart_targets_are_near_and_badly_represented_vectors():
    z = l2_normalize(jax.random.normal(jax.random.key(1), (10, 4)))
    q = l2_normalize(jax.random.normal(jax.random.key(5), (10, 4)))
    codebook = l2_normalize(jax.random.normal(jax.random.key(2), (6, 4)))
    index = vq.restart_targets(z, q, codebook)
    error = np.sum((np.asarray(z) - np.asarray(q)) ** 2, axis=1)
    for k in range(6):
        score = np.asarray(z) @ np.asarray(codebook[k]) + error
        assert int(index[k]) == int(np.argmax(score))
    # A vector its code represents exactly is no code's target while a badly represented
    # vector is near: the first of two dead codes that reach a vector pushes the other on.
    q = q.at[3].set(z[3])
    assert int(vq.restart_targets(z, q, z[3:4])[0]) != 3
    dead = jnp.array([False, True, False, True, True, False])
    counts = jnp.where(dead, 0.0, 5.0)
    grad = jax.grad(lambda c: vq.restart_loss(z, q, c, counts))(codebook)
    assert np.all(np.abs(np.asarray(grad)[~np.asarray(dead)]) == 0)
    assert np.all(np.linalg.norm(np.asarray(grad)[np.asarray(dead)], axis=1) > 0)


def _usage_after_training(restart_weight: float, steps: int = 60) -> float:
    """Fraction of 16 codes used by 256 data vectors after Adam on codebook (+ restart) loss,
    starting with half the codes on the far side of the sphere from every data vector."""
    z = l2_normalize(jnp.abs(jax.random.normal(jax.random.key(3), (256, 4))))  # one orthant
    near = jnp.abs(jax.random.normal(jax.random.key(4), (8, 4)))
    param = 0.02 * l2_normalize(jnp.concatenate([near, -near - 0.5]))  # 8 codes never chosen

    def loss(p):
        codebook = l2_normalize(p)
        codes = jnp.argmax(z @ jax.lax.stop_gradient(codebook).T, axis=-1)
        q = codebook[codes]
        counts = vq.code_counts(codes, 16)
        return vq.codebook_loss(z, q) + restart_weight * vq.restart_loss(z, q, codebook, counts)

    tx = optax.adam(5e-3)

    @jax.jit
    def step(p, opt):
        updates, opt = tx.update(jax.grad(loss)(p), opt)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(param)
    for _ in range(steps):
        param, opt = step(param, opt)
    codes = jnp.argmax(z @ l2_normalize(param).T, axis=-1)
    return float(vq.usage_stats(vq.code_counts(codes, 16))["used_fraction"])


def test_dead_code_restarts_reseed_unused_codes():
    assert _usage_after_training(restart_weight=0.0) <= 0.5  # the far codes stay dead
    assert _usage_after_training(restart_weight=1.0) == 1.0


def one_step(config, devices):
    mesh = parallel.make_mesh(config.mesh, devices)
    trainer = build_trainer(get_task(config.task), config, mesh, vocab_size=256)
    state = trainer.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(config.batch_size, SIZE, SIZE, 3)).astype(np.float32)}
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        state, m = trainer.step(
            state, parallel.global_batch(batch, trainer.batch_sharding), NO_CEILING
        )
    kernel = state.params["encoder"]["down1"]["kernel"]  # (3, 3, conv_in, embed)
    fsdp = mesh.shape["fsdp"]
    assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // fsdp
    return jax.device_get(m), jax.device_get(state.params)


@pytest.mark.slow  # two train-step compiles (~19 s): like tests/test_sharding.py's
@pytest.mark.multidevice
def test_sharded_step_equals_single_device():
    config = tiny_config()
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    single_metrics, single_params = one_step(config, jax.devices()[:1])
    # FSDP shards every conv's output channels (and their Adam moments).
    config.mesh = ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1))
    sharded_metrics, sharded_params = one_step(config, jax.devices())
    # The code counts (hence dead codes and restart targets) are over the global batch; fp32
    # reductions reorder across devices: 1e-5 relative (1e-6 absolute) is the contract.
    for key in ("train/loss", "train/loss/restart", "train/codes_used", "train/mse"):
        np.testing.assert_allclose(sharded_metrics[key], single_metrics[key], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        sharded_params,
        single_params,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data.image_size": 18}, "not divisible by 4"),
        ({"data.name": "reviews"}, "trains on images"),
        ({"vqvae.commitment": -1.0}, "vqvae.commitment=-1.0 must be >= 0"),
        ({"vqvae.codebook_size": 1}, "must be >= 2"),
        ({"eval.tasks": ("zeroshot:shapes",)}, "evaluates reconstructions"),
        ({"model.embed_dim": 64}, "configured by vqvae"),
    ],
)
def test_bad_settings_are_refused_before_building(change, message):
    config = tiny_config()
    for dotted, value in change.items():
        section, key = dotted.split(".")
        config[section][key] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, get_task("image_tokenizer"))


def test_load_image_tokenizer_names_the_command_for_a_bad_workdir(tmp_path):
    command = "python train.py --config configs/image_tokenizer.py --workdir"
    with pytest.raises(ConfigError, match="does not exist.*" + command):
        load_image_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no readable config.json.*" + command):
        load_image_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"task": "contrastive"}))
    with pytest.raises(ConfigError, match="task='contrastive', not an image tokenizer"):
        load_image_tokenizer(str(tmp_path))
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    with pytest.raises(ConfigError, match="no checkpoint yet.*" + command):
        load_image_tokenizer(str(tmp_path))


@pytest.mark.slow
def test_run_resumes_exactly_and_loads_as_a_tokenizer(tmp_path, data_dir):
    """A run restarted from its step-2 checkpoint ends with the same losses and PSNR as the
    uninterrupted run; `load_image_tokenizer` then reproduces the run's validation MSE."""
    first = assert_resumes_exactly(lambda: tiny_config(data_dir), tmp_path)
    assert first["task/metric_name"] == "psnr" and first["task/chance"] > 0

    model, variables = load_image_tokenizer(str(tmp_path / "full"))
    x = EvalImages(sources.open_source(tiny_config(data_dir).data, "shapes", "validation"), SIZE)[:]
    codes = model.apply(variables, x, method=VQVAE.encode)
    mse = pixel_mse(model.apply(variables, codes, method=VQVAE.decode), x)
    np.testing.assert_allclose(float(jnp.mean(mse)), first["image_tokenizer/mse"], rtol=1e-4)
