"""Device mesh, logical-axis sharding rules and global batches.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel whose parameters and
optimizer state are sharded too, ZeRO-3-like) and `tensor` (heads / MLP split across devices).
Models name their dimensions logically; `config.rules` maps names to mesh axes.
"""

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves the (data, fsdp, tensor) sizes; one of them may be -1 = the remaining devices."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    spec = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {spec}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {spec}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"{spec} cannot fill {num_devices} devices: {num_devices} is not divisible by "
                f"{known}; choose sizes whose product divides {num_devices}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"{spec} uses {int(np.prod(sizes))} devices but {num_devices} are available; make the "
            f"product equal {num_devices} or set one axis to -1"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
    """A GSPMD (Auto axis types) mesh over all devices of all processes."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    try:  # Topology-aware device order where the platform provides one (TPU, GPU).
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # CPU and irregular device sets: plain order is as good as any.
        grid = np.asarray(devices).reshape(shape)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=auto)


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


# Mesh axes that only partition storage (parameters and optimizer state are gathered before use),
# so any dimension of a parameter may carry them.
STORAGE_AXES = ("fsdp",)


def _axes_size(names, mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[n] for n in names])) if names else 1


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Makes a parameter's spec valid for its shape.

    A mesh axis that does not divide its dimension (a 3-wide qkv axis, width 768 over 512 FSDP
    devices) is dropped from it; a storage axis (`fsdp`) then moves to the largest unsharded
    dimension it divides, so per-device state keeps falling as 1/N where the shapes allow, and
    stays replicated otherwise.
    """
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    fitted: list = []
    homeless: list[str] = []
    for dim, axes in zip(shape, entries, strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if dim % _axes_size(names, mesh) == 0:
            fitted.append(axes)
        else:
            fitted.append(None)
            homeless += [n for n in names if n in STORAGE_AXES]
    for name in homeless:
        options = []
        for i, axes in enumerate(fitted):
            combined = ((axes,) if isinstance(axes, str) else tuple(axes or ())) + (name,)
            if shape[i] % _axes_size(combined, mesh) == 0:
                options.append((shape[i], i, combined))
        if options:
            _, i, combined = max(options)
            fitted[i] = combined[0] if len(combined) == 1 else combined
    return PartitionSpec(*fitted)


def logical_shardings(abstract_tree, logical_specs, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree, from its logical PartitionSpecs and the rules."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)

    def sharding(x, spec):
        # optax's MaskedNode (the state slot of a frozen parameter) is an empty tuple, which
        # logical_to_mesh reads as an empty spec: keep the node, it holds no array.
        if isinstance(x, optax.MaskedNode):
            return x
        return NamedSharding(mesh, _fit_spec(spec, x.shape, mesh))

    return jax.tree.map(
        sharding,
        abstract_tree,
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec | optax.MaskedNode),
    )


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the `batch` rule splits the batch over, e.g. ("data", "fsdp")."""
    (axes,) = nn.logical_to_mesh(PartitionSpec("batch"), rules)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes named by the `batch` rule."""
    return NamedSharding(mesh, nn.logical_to_mesh(PartitionSpec("batch"), rules))


def global_batch(local: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles global arrays from this process's slice of the batch (rows are concatenated in
    process order)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def check_batch_size(global_batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
    """Fails early, with the fix, if the batch cannot be split evenly (over the data-parallel
    devices, and each device's rows over the GradCache microbatches)."""
    n = data_parallel_size(mesh) * microbatches
    if global_batch_size % n:
        over = f"the {data_parallel_size(mesh)} devices of mesh axes data×fsdp"
        if microbatches > 1:
            over += f" × {microbatches} microbatches"
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by {over}; use a multiple of {n} "
            f"(e.g. {max(n, global_batch_size // n * n)})"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch_size} is not divisible by {jax.process_count()} processes"
        )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> None:
    """Starts JAX's multi-process runtime when asked: explicit coordinator flags, or `auto`
    detection (SLURM, TPU pods, Open MPI). A single-process run needs neither."""
    if coordinator_address is None and not auto:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num_processes/--process_id need --coordinator_address")
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
