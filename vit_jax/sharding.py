"""The device mesh and the one table of rules from the model's logical axis names to mesh axes.

Mesh axes: `data` (pure data parallelism: params replicated), `fsdp` (data parallelism whose params and
optimizer state are split over it too), `model` (tensor parallelism of attention heads and MLP hidden units).
The batch is split over (`data`, `fsdp`). Data parallel, FSDP and tensor parallel are thus one config switch:
`config.mesh.{data,fsdp,model}`.

A rule that would split a dimension over a mesh axis that does not divide it is dropped for that dimension
(it stays replicated), so any mesh works with any model; a mesh axis is used at most once per array.

Activations get their layout from XLA's sharding propagation (batch in, params in, gradients out are pinned).
The model's `activation_*` constraints are not switched on: under a mesh with logical-axis rules active, flax
0.12's `DenseGeneral` re-runs its initializer in `apply` to check shapes and constrains the flattened 2-D
kernel with the 3-D kernel's names, which JAX rejects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vit_jax import config_check

MESH_AXES = config_check.MESH_AXES  # ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes, tried in order. Parameters: `embed` is split over fsdp (every kernel has an embed
# dimension, so FSDP covers all large arrays), heads / MLP units / classes over model (Megatron-style tensor
# parallelism: the residual stream stays whole, each device computes its heads and its slice of the MLP).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("classes", "model"),
    ("conv_out", "fsdp"),
    ("layers", None),
)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, model) Mesh over `devices` (default: all) with the sizes of `config.mesh` (-1: the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config_check.resolve_mesh_shape(config.mesh, len(devices))
    dims = [shape[a] for a in MESH_AXES]
    # A plain Mesh has Auto axes: the compiler propagates shardings through contractions (jax.make_mesh's
    # default Explicit axes would reject sharded contractions the rules below produce).
    if len(devices) > 1 and all(d.platform == "tpu" for d in devices):
        # Physical topology order: neighbouring mesh coordinates on neighbouring chips.
        from jax.experimental import mesh_utils

        # allow_split_physical_axes: jax splits a torus dimension between mesh axes only where no assignment of
        # whole dimensions exists (data=2 or model=2 on a 16x16 v5e, which it refuses by default).
        slices = _slice_count(devices)
        if slices > 1:  # several slices (DCN between them): their chips' coordinates repeat, one torus each
            device_array = mesh_utils.create_hybrid_device_mesh(
                _within_slice(dims, slices), [slices, 1, 1], devices=devices, allow_split_physical_axes=True)
        else:
            device_array = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
    else:
        device_array = np.array(devices).reshape(dims)
    return Mesh(device_array, MESH_AXES)


def _slice_count(devices: Sequence[Any]) -> int:
    """How many TPU slices `devices` come from (devices without a `slice_index` count as one slice)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def _within_slice(dims: Sequence[int], slices: int) -> list[int]:
    """The (data, fsdp, model) sizes of each slice's part of a mesh whose data axis is split across `slices`.

    Only the data axis crosses slices: it exchanges gradients once a step, which the slow links between slices
    (DCN) can carry; fsdp's per-layer gathers and the model axis's per-matmul traffic need the fast ones (ICI).
    """
    data = dims[0]
    if data % slices:
        raise config_check.ConfigError(
            f"config.mesh.data={data} (mesh {dict(zip(MESH_AXES, dims))}) on devices of {slices} TPU slices: the data "
            f"axis is the one that crosses slices, so it must be a multiple of {slices}; e.g. "
            f"--config.mesh.data={slices} with fsdp or model -1 within each slice")
    return [data // slices, *dims[1:]]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The layout of a batch: its leading axis split over data x fsdp, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device (scalars, RNG keys, step counters)."""
    return NamedSharding(mesh, PartitionSpec())


def spec_for_shape(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """PartitionSpec of one array from its logical axis names: each dimension gets its rule's mesh axes
    when they divide it and are not already used by another dimension, else stays whole.

    With a multi-axis rule, only axes at its end are dropped until the rest divide the dimension (for
    ("a", "b"), "b" then "a"; never "a" alone to keep "b"): latent today, every rule in LOGICAL_AXIS_RULES
    maps to one mesh axis or none."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match the array's shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        # Keep the axes that are free and split the dimension evenly; size-1 mesh axes add nothing.
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        while axes and size % int(np.prod([mesh.shape[a] for a in axes])):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for the plain (unboxed) param tree of `boxed_params`, e.g. `jax.eval_shape(model.init...)`.

    Leaves without logical names (none in our models) are replicated.
    """

    def one(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for_shape(leaf.names, leaf.value.shape, mesh, rules))
        return replicated(mesh)

    return jax.tree.map(one, boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def like_params(tree: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state's leaves: a parameter's where the leaf's path ends with that parameter's
    path and it has its shape (Adam's moments, momentum, in whatever optax nesting: also `multi_transform`'s,
    which `optax.tree_map_params` cannot follow), replicated otherwise (step counts)."""
    by_path = {tuple(path): (leaf.shape, shard) for (path, leaf), shard in
               zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(param_shardings))}
    whole = replicated(mesh)

    def pick(path: tuple, leaf: Any) -> Any:
        for start in range(len(path)):
            shape, shard = by_path.get(tuple(path[start:]), (None, None))
            if shard is not None and shape == leaf.shape:
                return shard
        return whole

    return jax.tree_util.tree_map_with_path(pick, tree)
