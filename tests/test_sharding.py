"""Mesh construction and the logical-axis -> mesh-axis layout of parameters."""

import dataclasses
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.train_helpers import tiny_config
from vit_jax import sharding, train
from vit_jax.config_check import ConfigError


def test_mesh_gives_the_free_axis_the_remaining_devices():
    mesh = sharding.make_mesh(tiny_config(**{"mesh.data": -1, "mesh.fsdp": 2, "mesh.model": 2}))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert mesh.axis_names == ("data", "fsdp", "model")
    assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_mesh_that_does_not_fit_the_devices_is_a_config_error():
    with pytest.raises(ConfigError, match=re.escape(
            "config.mesh={'data': 3, 'fsdp': 1, 'model': 1} is invalid: the fixed axis sizes multiply to 3, which "
            "does not divide the 8 available devices")):
        sharding.make_mesh(tiny_config(**{"mesh.data": 3, "mesh.fsdp": 1, "mesh.model": 1}))


def test_axis_that_does_not_divide_a_dimension_is_not_used_for_it():
    mesh = sharding.make_mesh(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.model": 2}))
    assert sharding.spec_for_shape(("embed", "mlp"), (32, 64), mesh) == P("fsdp", "model")
    assert sharding.spec_for_shape(("embed", "mlp"), (30, 63), mesh) == P(None, None)
    assert sharding.spec_for_shape(("embed", "heads", "kv"), (32, 3, 8), mesh) == P("fsdp", None, None)
    # A mesh axis is used at most once per array (heads and mlp both map to "model").
    assert sharding.spec_for_shape(("heads", "mlp"), (4, 8), mesh) == P("model", None)


def test_size_one_axes_leave_arrays_whole():
    mesh = sharding.make_mesh(tiny_config(**{"mesh.data": 8}))
    assert sharding.spec_for_shape(("embed", "mlp"), (32, 64), mesh) == P(None, None)


def test_logical_axes_must_match_the_shape():
    mesh = sharding.make_mesh(tiny_config())
    with pytest.raises(ValueError, match="do not match"):
        sharding.spec_for_shape(("embed",), (3, 4), mesh)


def test_params_of_the_model_follow_the_rules():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2, "num_classes": 10})
    mesh = sharding.make_mesh(config)
    specs = jax.tree.map(lambda s: s.spec, train.state_shardings(config, mesh)["params"])
    block = specs["Transformer"]["encoderblock_0"]
    assert block["MlpBlock_3"]["Dense_0"]["kernel"] == P("fsdp", "model")
    assert block["MlpBlock_3"]["Dense_1"]["kernel"] == P("model", "fsdp")
    assert block["MultiHeadDotProductAttention_1"]["out"]["kernel"] == P("model", None, "fsdp")
    assert block["LayerNorm_0"]["scale"] == P("fsdp")
    assert specs["embedding"]["kernel"] == P(None, None, None, "fsdp")
    assert specs["head"]["kernel"] == P("fsdp", "model")  # 10 classes split over a model axis of 2


@dataclasses.dataclass(frozen=True)
class StandInTpu:
    """What jax's mesh_utils reads of a TPU chip: a v5e 16x16 slice's, 4 chips per host (2x2)."""

    id: int
    coords: tuple[int, int, int]
    process_index: int
    platform: str = "tpu"
    device_kind: str = "TPU v5 lite"
    core_on_chip: int = 0


def v5e_16x16() -> list[StandInTpu]:
    return [StandInTpu(i, (i % 16, i // 16, 0), (i % 16) // 2 + 8 * ((i // 16) // 2)) for i in range(256)]


@pytest.mark.parametrize("mesh, shape", [
    ({"data": 2, "fsdp": -1, "model": 1}, (2, 128, 1)),
    ({"data": 1, "fsdp": -1, "model": 2}, (1, 128, 2)),
    ({"data": 1, "fsdp": -1, "model": 4}, (1, 64, 4)),
])
def test_a_tpu_mesh_whose_axes_split_a_torus_dimension_is_built_in_topology_order(mesh, shape):
    """Axis sizes that are no product of whole torus dimensions (jax refuses them by default): neighbouring
    mesh coordinates of the model axis are still neighbouring chips."""
    config = tiny_config()
    config.mesh.update(mesh)
    devices = sharding.make_mesh(config, v5e_16x16()).devices
    assert devices.shape == shape and len({d.id for d in devices.flat}) == 256
    for group in devices.reshape(-1, shape[2]):
        for a, b in zip(group, group[1:]):
            assert sum(abs(x - y) for x, y in zip(a.coords, b.coords)) == 1  # one ICI hop


@dataclasses.dataclass(frozen=True)
class StandInSliceTpu:
    """A v4 chip of one of several slices (multi-slice, DCN between slices): coordinates repeat across slices."""

    id: int
    coords: tuple[int, int, int]
    process_index: int
    slice_index: int
    platform: str = "tpu"
    device_kind: str = "TPU v4"
    core_on_chip: int = 0


def two_v4_2x2x4_slices() -> list[StandInSliceTpu]:
    """32 chips: two 2x2x4 slices, 4 chips (2x2x1) per host."""
    return [StandInSliceTpu(16 * s + i, (i % 2, (i // 2) % 2, i // 4), 4 * s + i // 4, s)
            for s in range(2) for i in range(16)]


@pytest.mark.parametrize("data", [2, 4])
def test_a_multi_slice_mesh_puts_the_data_axis_across_slices_and_the_model_axis_within_one(data):
    """jax's create_device_mesh raised a bare AssertionError on devices of two slices (their coordinates repeat)."""
    config = tiny_config(**{"mesh.data": data, "mesh.fsdp": -1, "mesh.model": 4})
    devices = sharding.make_mesh(config, two_v4_2x2x4_slices()).devices
    assert devices.shape == (data, 8 // data, 4) and len({d.id for d in devices.flat}) == 32
    for index in range(data):  # the first half of the data axis on slice 0, the second on slice 1
        assert {d.slice_index for d in devices[index].flat} == {index * 2 // data}
    for group in devices.reshape(-1, 4):  # model-axis neighbours: one slice, one host's 2x2 chips
        assert len({d.slice_index for d in group}) == 1 and len({d.process_index for d in group}) == 1
    # Within a slice, the layout jax gives that slice alone.
    per_slice = tiny_config(**{"mesh.data": data // 2, "mesh.fsdp": -1, "mesh.model": 4})
    for index, chips in enumerate(np.split(devices, 2)):
        alone = sharding.make_mesh(per_slice, [d for d in two_v4_2x2x4_slices() if d.slice_index == index]).devices
        assert [d.id for d in chips.flat] == [d.id for d in alone.flat]


def test_a_multi_slice_mesh_whose_data_axis_is_no_multiple_of_the_slices_is_a_config_error():
    config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": -1, "mesh.model": 1})
    with pytest.raises(ConfigError, match=r"config.mesh.data=1 .*2 TPU slices.*multiple of 2"):
        sharding.make_mesh(config, two_v4_2x2x4_slices())
