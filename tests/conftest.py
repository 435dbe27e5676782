"""Test-wide JAX settings. XLA_FLAGS must be set before jax is first imported."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax

# Safety switches: implicit rank promotion hides shape bugs; partitionable threefry makes
# sharded random numbers equal the unsharded ones.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)
