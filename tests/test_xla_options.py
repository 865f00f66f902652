"""Tests of vit_jax.xla_options: CPU compiler options, none elsewhere, the environment's XLA_FLAGS win."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import xla_options


class _FakeDevice:
    def __init__(self, platform):
        self.platform = platform


def test_cpu_devices_get_individual_dots_and_reductions(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.compiler_options(jax.devices("cpu")) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@pytest.mark.parametrize("platforms", [["tpu"], ["gpu", "gpu"], ["cpu", "tpu"], []])
def test_other_platforms_get_no_options(platforms):
    assert xla_options.compiler_options([_FakeDevice(p) for p in platforms]) is None


def test_a_ynn_setting_in_xla_flags_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type= --xla_force_host_platform_device_count=8")
    assert xla_options.compiler_options(jax.devices("cpu")) is None


def test_the_options_compile_and_do_not_change_results(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    x = jax.random.normal(jax.random.key(0), (4, 9, 64))

    def attention(x):
        logits = jnp.einsum("bqd,bkd->bqk", x, x)
        return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(logits, axis=-1), x)

    with_options = jax.jit(attention, compiler_options=xla_options.compiler_options())
    assert "ynn_fusion_type" in str(xla_options.compiler_options())
    np.testing.assert_allclose(with_options(x), jax.jit(attention)(x), rtol=1e-5, atol=1e-5)
