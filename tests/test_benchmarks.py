"""The benchmarks' FLOP bookkeeping (no timing here: the benchmarks print their figures, tests never time)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import common  # noqa: E402
import matmul_bound  # noqa: E402

from vit_jax.errors import UserError  # noqa: E402


@pytest.mark.parametrize("config_file, classifier, representation_size, dtype", [
    ("vit_b16.py", "token", 0, "float32"), ("vit_b16.py", "gap", 0, "bfloat16"),
    ("vit_l16.py", "token", 1024, "float32"), ("vit_s32.py", "token", 0, "bfloat16")])
def test_step_matmuls_account_for_three_forward_passes(config_file, classifier, representation_size, dtype):
    """Forward + input gradient + weight gradient of every matmul = 3x the analytic forward (vit_jax.summary),
    less the patch embedding's input gradient, which a training step never computes."""
    config = common.load_config(os.path.join(common.ROOT, "configs", config_file), dtype, 8)
    config.model.classifier, config.model.representation_size = classifier, representation_size
    contractions = matmul_bound.step_contractions(config)
    total = sum(c.flops * c.count * (1 + len(c.grads)) for c in contractions)
    (patch,) = [c for c in contractions if c.name == "patch embedding"]
    assert patch.grads == (1,)  # the kernel's gradient only
    expected = 3 * common.forward_flops_per_image(config) * config.batch_size
    assert total + patch.flops == pytest.approx(expected, rel=1e-9)


def test_step_matmuls_refuse_hybrids():
    config = common.load_config(os.path.join(common.ROOT, "configs", "vit_b16.py"), "float32", 8)
    config.model.resnet_layers = (3, 4, 9)
    with pytest.raises(UserError, match="only plain ViTs"):
        matmul_bound.step_contractions(config)


def test_median_run_is_the_run_with_the_median_wall_time():
    runs = [(3.0, 1.5), (1.0, 2.0), (2.0, 1.0), (5.0, 1.9)]
    assert common.median_run(runs) == (2.0, 1.0)  # even count: the lower middle
    assert common.median_run(runs[:3]) == (2.0, 1.0)
