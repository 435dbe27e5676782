"""Sharded contrastive losses (gathered, ring-chunked) against the naive global-batch ones, on the 8
fake CPU devices: same per-example losses, same gradients, and (chunked) per-device memory that
does not grow with the number of devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mmjax import losses
from mmjax.losses import contrastive_sharded

pytestmark = pytest.mark.multidevice

BATCH_AXES = ("data", "fsdp")
MESH_SHAPES = {"data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1), "data4_tensor2": (4, 1, 2)}
SHARDED_IMPLS = ("gathered", "chunked")

# float32 has eps ≈ 1.2e-7. The sharded impls sum in a different order (LSE folded block by
# block, row sums and gradients accumulated chunk by chunk), and at scale 100 a logit of magnitude
# ~30 turns an ulp-level difference into ~1e-6 relative in exp(logit); norm-relative errors
# observed are ≤ ~4e-7, so 1e-6 leaves margin while still catching any real mistake (a missing
# or doubled block, a wrong diagonal, an unscaled gradient), which shows up at 1e-3 or more.
RTOL = 1e-6


def make_mesh(shape, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def unit_rows(rng, n, e):
    x = rng.normal(size=(n, e))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def rel_err(got, want) -> float:
    """||got - want|| / ||want||; the plain norm of `got` where `want` is exactly zero (the
    softmax loss does not depend on the bias)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (scale if scale > 0 else 1.0))


def losses_and_grads(kind, impl, mesh, img, txt, scale, bias, *, explicit_mesh=False):
    """Per-example losses and d(mean loss)/d(img, txt, scale, bias), jitted with the batch sharded
    over data×fsdp. The mesh reaches the loss through `jax.set_mesh` unless `explicit_mesh`."""

    def mean_loss(img_BE, txt_BE, scale, bias):
        per_example_B = contrastive_sharded.contrastive_loss_sharded(
            kind, impl, img_BE, txt_BE, scale, bias, mesh=mesh if explicit_mesh else None
        )
        return jnp.mean(per_example_B), per_example_B

    batch = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    args = (
        jax.device_put(img, batch),
        jax.device_put(txt, batch),
        jnp.float32(scale),
        jnp.float32(bias),
    )
    step = jax.jit(jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3), has_aux=True))
    if explicit_mesh:
        (_, per_example_B), grads = step(*args)
    else:
        with jax.set_mesh(mesh):
            (_, per_example_B), grads = step(*args)
    return np.asarray(per_example_B), [np.asarray(g) for g in grads]


@functools.cache
def inputs(batch: int, dim: int):
    rng = np.random.default_rng(batch * 1000 + dim)
    return unit_rows(rng, batch, dim), unit_rows(rng, batch, dim)


@functools.cache
def naive_reference(mesh_name, kind, scale, bias):
    img, txt = inputs(64, 32)
    return losses_and_grads(kind, "naive", make_mesh(MESH_SHAPES[mesh_name]), img, txt, scale, bias)


@pytest.mark.parametrize("scale, bias", [(10.0, -5.0), (100.0, -10.0)], ids=["s10", "s100"])
@pytest.mark.parametrize("impl", SHARDED_IMPLS)
@pytest.mark.parametrize("kind", contrastive_sharded.KINDS)
@pytest.mark.parametrize("mesh_name", MESH_SHAPES)
def test_sharded_equals_naive(mesh_name, kind, impl, scale, bias):
    img, txt = inputs(64, 32)
    mesh = make_mesh(MESH_SHAPES[mesh_name])
    want_B, want_grads = naive_reference(mesh_name, kind, scale, bias)
    got_B, got_grads = losses_and_grads(kind, impl, mesh, img, txt, scale, bias)

    assert got_B.shape == (64,) and got_B.dtype == np.float32
    assert np.all(np.isfinite(got_B))
    assert rel_err(got_B, want_B) < RTOL
    for name, got, want in zip(("img", "txt", "scale", "bias"), got_grads, want_grads, strict=True):
        assert got.shape == want.shape, name
        assert rel_err(got, want) < RTOL, (name, rel_err(got, want))


@pytest.mark.parametrize("impl", SHARDED_IMPLS)
@pytest.mark.parametrize("kind", contrastive_sharded.KINDS)
def test_explicit_mesh_needs_no_context(kind, impl):
    """`mesh=` works without `jax.set_mesh`, here on a 4-device data×fsdp sub-mesh and other sizes
    (B=24, E=16, local batch 6)."""
    img, txt = inputs(24, 16)
    mesh = make_mesh((2, 2, 1), jax.devices()[:4])
    want_B, want_grads = losses_and_grads(kind, "naive", mesh, img, txt, 12.0, -4.0)
    got_B, got_grads = losses_and_grads(kind, impl, mesh, img, txt, 12.0, -4.0, explicit_mesh=True)
    assert rel_err(got_B, want_B) < RTOL
    for got, want in zip(got_grads, want_grads, strict=True):
        assert rel_err(got, want) < RTOL


def test_naive_impl_is_the_global_loss():
    img, txt = (jnp.asarray(x) for x in inputs(24, 16))
    np.testing.assert_array_equal(
        contrastive_sharded.contrastive_loss_sharded("sigmoid", "naive", img, txt, 10.0, -3.0),
        losses.sigmoid_contrastive(img, txt, 10.0, -3.0),
    )
    np.testing.assert_array_equal(
        contrastive_sharded.contrastive_loss_sharded("softmax", "naive", img, txt, 10.0, -3.0),
        losses.softmax_contrastive(img, txt, 10.0),
    )


def test_bad_arguments_are_rejected():
    img, txt = (jnp.asarray(x) for x in inputs(24, 16))
    with pytest.raises(ValueError, match="'naive', 'gathered', 'chunked'"):
        contrastive_sharded.contrastive_loss_sharded("softmax", "ring", img, txt, 1.0, 0.0)
    with pytest.raises(ValueError, match="'softmax', 'sigmoid'"):
        contrastive_sharded.contrastive_loss_sharded("hinge", "chunked", img, txt, 1.0, 0.0)
    with pytest.raises(ValueError, match="needs a mesh"):
        contrastive_sharded.contrastive_loss_sharded("softmax", "chunked", img, txt, 1.0, 0.0)
    mesh = make_mesh((8, 1, 1))
    with pytest.raises(ValueError, match="not divisible"):
        contrastive_sharded.contrastive_loss_sharded(
            "softmax", "chunked", img[:20], txt[:20], 1.0, 0.0, mesh=mesh
        )
    with pytest.raises(ValueError, match="not axes of the mesh"):
        contrastive_sharded.contrastive_loss_sharded(
            "softmax", "chunked", img, txt, 1.0, 0.0, mesh=mesh, batch_axes=("batch",)
        )


def compiled_temp_bytes(kind, impl, n, local_batch, dim) -> int:
    """Per-device scratch bytes of the compiled fwd+bwd on an n-device data mesh."""
    mesh = make_mesh((n, 1, 1), jax.devices()[:n])
    batch = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    emb = jax.ShapeDtypeStruct((n * local_batch, dim), jnp.float32, sharding=batch)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))

    def mean_loss(img_BE, txt_BE, scale, bias):
        return jnp.mean(
            contrastive_sharded.contrastive_loss_sharded(
                kind, impl, img_BE, txt_BE, scale, bias, mesh=mesh
            )
        )

    step = jax.jit(
        jax.value_and_grad(mean_loss, argnums=(0, 1, 2, 3)),
        out_shardings=(None, (batch, batch, None, None)),
    )
    compiled = step.lower(emb, emb, scalar, scalar).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("kind", contrastive_sharded.KINDS)
def test_chunked_memory_is_independent_of_device_count(kind):
    """At a fixed local batch (256 × 64, so a 256×256 logits block is 256 KiB and dominates), the
    ring's per-device scratch must stay flat from 2 to 8 devices, in forward and backward, while
    the naive loss's b×B logits rows grow with the global batch."""
    local_batch, dim = 256, 64
    chunked = [compiled_temp_bytes(kind, "chunked", n, local_batch, dim) for n in (2, 4, 8)]
    naive = [compiled_temp_bytes(kind, "naive", n, local_batch, dim) for n in (2, 4, 8)]
    assert max(chunked) <= 1.1 * min(chunked), chunked
    # O(b² + b·E): a handful of b×b blocks, far from the b×B slab of even 2 devices' batch.
    assert max(chunked) < 8 * local_batch * local_batch * 4, chunked
    assert naive[2] > 3 * naive[0], naive
    assert chunked[2] < naive[2] / 4, (chunked, naive)
