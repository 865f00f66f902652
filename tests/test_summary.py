"""`vit_jax.summary`: analytic FLOPs agree with XLA and with a hand count; the CLI prints JSON."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs import common
from vit_jax.summary import summarize

ROOT = pathlib.Path(__file__).resolve().parents[1]


def vit_flops(d, layers, mlp, patch, image, classes, token=True):
    """Forward FLOPs (2 per multiply-add) of the matmuls of a plain ViT, counted by hand."""
    n = (image // patch) ** 2
    t = n + token
    embed = 2 * n * patch * patch * 3 * d
    block = 2 * (3 * t * d * d + t * t * d + t * t * d + t * d * d + 2 * t * d * mlp)
    return embed + layers * block + 2 * d * classes


@pytest.mark.parametrize("variant, image_size", [("B/16", 224), ("L/16", 384), ("S/32", 224)])
def test_flops_match_hand_count_and_xla(variant, image_size):
    config = common.get_config(variant)
    config.num_classes, config.image_size = 1000, image_size
    m = config.model
    summary = summarize(config)
    expected = vit_flops(m.hidden_size, m.num_layers, m.mlp_dim, m.patch_size, image_size, 1000)
    assert summary["gflops_per_image"] == pytest.approx(expected / 1e9, rel=1e-9)
    # XLA also counts softmax, LayerNorm, GELU and adds: a little more, never less.
    assert 1.0 <= summary["xla_gflops_per_image"] / summary["gflops_per_image"] < 1.03


def test_hybrid_flops_match_xla():
    config = common.get_config("R50+B/16")
    config.num_classes = 1000
    summary = summarize(config)
    assert summary["params"] == 98_659_112
    assert 1.0 <= summary["xla_gflops_per_image"] / summary["gflops_per_image"] < 1.03


def test_masked_patch_prediction_counts_the_model_it_pretrains():
    """The pre-training model has a mask embedding and a 512-colour head on every patch token, and no class head."""
    config = common.get_config("S/32")
    config.num_classes, config.objective = 21843, "masked_patch_prediction"
    d, layers, mlp, n = 384, 12, 1536, (224 // 32) ** 2
    block_params = 4 * d * d + 4 * d + 2 * d * mlp + mlp + d + 4 * d
    expected_params = (32 * 32 * 3 * d + d) + d + (n + 1) * d + layers * block_params + 2 * d + d + (d * 512 + 512)
    summary = summarize(config)
    assert summary["params"] == expected_params
    assert [row["name"] for row in summary["layers"]][-1] == "masked_patch_head"
    expected_flops = vit_flops(d, layers, mlp, 32, 224, 0) + 2 * n * d * 512
    assert summary["gflops_per_image"] == pytest.approx(expected_flops / 1e9, rel=1e-9)
    assert 1.0 <= summary["xla_gflops_per_image"] / summary["gflops_per_image"] < 1.03


def test_cli_json_for_h14():
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.summary", "--config=configs/vit_h14.py", "--config.num_classes=1000", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "VIT_JAX_HUGEPAGES": "0"})  # no huge-page re-exec (tested in test_hugepages.py)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["params"] == 632_045_800
    assert isinstance(summary["gflops_per_image"], float) and 320 < summary["gflops_per_image"] < 340
    assert len(summary["layers"]) == 32 + 5


def test_scanned_model_counts_like_the_unrolled_one():
    """A scanned model has the same params and FLOPs; XLA would count a scan body once, so it is unrolled."""
    config = common.get_config("S/32")
    config.num_classes = 10
    plain = summarize(config)
    config.model.scan = True
    scanned = summarize(config)
    assert (scanned["params"], scanned["gflops_per_image"]) == (plain["params"], plain["gflops_per_image"])
    assert scanned["xla_gflops_per_image"] == pytest.approx(plain["xla_gflops_per_image"], rel=1e-6)
    assert config.model.scan  # the caller's config is left as it was


@pytest.mark.parametrize("num_classes", [0, -3])
def test_a_head_without_classes_is_a_config_error(num_classes):
    from vit_jax.config_check import ConfigError

    config = common.get_config("Ti/16")
    config.num_classes = num_classes
    with pytest.raises(ConfigError, match=f"config.num_classes={num_classes} is invalid"):
        summarize(config)
