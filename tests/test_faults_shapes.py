"""Fault suite, property test (hypothesis) over image, patch and batch sizes and device counts: a combination that
`config_check.validate` accepts builds and traces a forward pass and its sharded state (jax.eval_shape: shape
errors surface when tracing, nothing is compiled), and the first of each device layout lowers the sharded train
and eval steps; one it rejects fails with `ConfigError` naming the field, never with a shape or sharding error later.

Validity is decided here independently of vit_jax: the image must be a whole number of patches, and the train and
eval batches must split evenly over the devices of the batch axes (data x fsdp, here all of them).
"""

from __future__ import annotations

import jax
import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.train_helpers import tiny_config
from vit_jax import config_check, sharding, train


def expected_valid(image_size: int, patch_size: int, batch_size: int, eval_batch_size: int, devices: int) -> bool:
    return image_size % patch_size == 0 and batch_size % devices == 0 and eval_batch_size % devices == 0


def near_multiple(unit: int, offsets=(0, 0, 0, 1, -1, 2)) -> st.SearchStrategy[int]:
    """Positive ints that are mostly multiples of `unit` (valid) and sometimes one or two off (invalid)."""
    return st.builds(lambda k, off: max(1, unit * k + off), st.integers(1, 3), st.sampled_from(offsets))


@st.composite
def shapes(draw) -> dict:
    patch_size = draw(st.integers(1, 8))
    devices = draw(st.sampled_from([1, 2, 4, 8]))
    return {"patch_size": patch_size, "image_size": draw(near_multiple(patch_size)), "devices": devices,
            "batch_size": draw(near_multiple(devices)), "eval_batch_size": draw(near_multiple(devices)),
            "fsdp": draw(st.sampled_from([1, 2]))}


LOWERED: set[tuple[int, int]] = set()  # the (devices, fsdp) layouts whose steps were lowered


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes())
def test_valid_shapes_run_and_invalid_ones_are_config_errors(case):
    image_size, patch_size, devices = case["image_size"], case["patch_size"], case["devices"]
    batch_size, eval_batch_size, fsdp = case["batch_size"], case["eval_batch_size"], case["fsdp"]
    fsdp = min(fsdp, devices)
    config = tiny_config(**{"image_size": image_size, "model.patch_size": patch_size, "batch_size": batch_size,
                            "eval_batch_size": eval_batch_size, "model.num_layers": 1, "mesh.data": -1,
                            "mesh.fsdp": fsdp, "mesh.model": 1})
    try:
        config_check.validate(config, devices)
    except config_check.ConfigError as e:
        assert not expected_valid(image_size, patch_size, batch_size, eval_batch_size, devices), e
        event("invalid")
        message = str(e)
        assert "config." in message and "\n" not in message
        return
    assert expected_valid(image_size, patch_size, batch_size, eval_batch_size, devices)
    # Accepted: the model builds and traces (shape checks), its state takes the mesh's shardings, and the sharded
    # steps lower for the mesh (sharding checks; once per layout: lowering costs seconds where tracing costs little).
    event("valid")
    model = train.make_model(config)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), np.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, config.num_classes)
    mesh = sharding.make_mesh(config, jax.devices()[:devices])
    state = train.abstract_state(config, mesh, 10)
    if (devices, fsdp) in LOWERED:
        return
    LOWERED.add((devices, fsdp))
    event(f"lowered on {devices} devices, fsdp {fsdp}")
    train.make_train_step(config, mesh, 10).lower(state, train.abstract_batch(config, mesh))
    train.make_eval_step(config, mesh).lower(
        state["params"],
        {key: jax.ShapeDtypeStruct((eval_batch_size, *shape), np.float32, sharding=sharding.batch_sharding(mesh))
         for key, shape in (("image", (image_size, image_size, 3)), ("label", (config.num_classes,)),
                            ("mask", ()))})
