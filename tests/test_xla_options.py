"""Tests of vit_jax.xla_options: CPU compiler options, none elsewhere, the environment's XLA_FLAGS win."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import xla_options


class _FakeDevice:
    def __init__(self, platform):
        self.platform = platform


def _record_requests(monkeypatch) -> list[dict]:
    """The keyword arguments of every `xla_options.compiler_options` call from now on (the options still given)."""
    asked = []
    real = xla_options.compiler_options
    monkeypatch.setattr(xla_options, "compiler_options",
                        lambda devices=None, **kw: asked.append(kw) or real(devices, **kw))
    return asked


def test_cpu_devices_get_individual_dots_and_reductions(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.compiler_options(jax.devices("cpu")) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def test_a_float32_training_step_on_cpu_gets_fused_dots(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.compiler_options(jax.devices("cpu"), float32_training=True) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
    assert xla_options.compiler_options([_FakeDevice("tpu")], float32_training=True) is None


@pytest.mark.parametrize("dtype,fused", [("float32", True), ("bfloat16", False)])
def test_the_train_step_asks_for_the_float32_training_options_only_in_float32(monkeypatch, dtype, fused):
    from tests.train_helpers import tiny_config
    from vit_jax import sharding, train

    asked = _record_requests(monkeypatch)
    config = tiny_config(**{"model.dtype": dtype})
    train.make_train_step(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps)
    assert asked == [{"float32_training": fused}]


def test_a_run_once_computation_on_cpu_compiles_at_level_1_into_the_same_values(monkeypatch):
    """The fresh state's initialisation (random-number kernels only) compiles at LLVM level 1 on CPU: faster to
    compile, and bit for bit the values of the default level."""
    from tests.train_helpers import tiny_config
    from vit_jax import sharding, train

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = xla_options.compiler_options(jax.devices("cpu"), run_once=True)
    assert options == {"xla_backend_optimization_level": "1"}
    assert xla_options.compiler_options([_FakeDevice("tpu")], run_once=True) is None
    config = tiny_config()
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model = train.make_model(config)

    def init(key):
        return train.init_params(model, config, key, mesh)

    fast, default = (jax.jit(init, compiler_options=o)(jax.random.key(3)) for o in (options, None))
    leaves = jax.tree.leaves(fast)
    assert len(leaves) == len(jax.tree.leaves(default)) > 20
    for got, expected in zip(leaves, jax.tree.leaves(default)):
        np.testing.assert_array_equal(got, expected)

    asked = _record_requests(monkeypatch)
    train.init_state(config, mesh, config.total_steps)
    assert asked == [{"run_once": True}]


@pytest.mark.parametrize("platforms", [["tpu"], ["gpu", "gpu"], ["cpu", "tpu"], []])
def test_other_platforms_get_no_options(platforms):
    assert xla_options.compiler_options([_FakeDevice(p) for p in platforms]) is None


def test_a_ynn_setting_in_xla_flags_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type= --xla_force_host_platform_device_count=8")
    assert xla_options.compiler_options(jax.devices("cpu")) is None


@pytest.mark.parametrize("float32_training", [False, True])
def test_the_options_compile_and_do_not_change_results(monkeypatch, float32_training):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    x = jax.random.normal(jax.random.key(0), (4, 9, 64))

    def attention(x):
        logits = jnp.einsum("bqd,bkd->bqk", x, x)
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(logits, axis=-1), x)

    options = xla_options.compiler_options(float32_training=float32_training)
    with_options = jax.jit(attention, compiler_options=options)
    assert "ynn_fusion_type" in str(options)
    np.testing.assert_allclose(with_options(x), jax.jit(attention)(x), rtol=1e-5, atol=1e-5)
