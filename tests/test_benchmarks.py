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


def test_time_runs_cpu_reports_per_call_figures_over_runs_of_several_calls(monkeypatch):
    clock = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(common.time, "process_time", lambda: clock["cpu"])

    def call():  # 10 ms of wall, both cores busy (20 ms of CPU)
        clock["wall"] += 0.010
        clock["cpu"] += 0.020

    runs = common.time_runs_cpu(call, repeats=3, warmup=2, calls=4)
    assert clock["wall"] == pytest.approx(0.010 * (2 + 3 * 4))  # the warm-up calls, then 3 runs of 4
    assert runs == [pytest.approx((0.010, 2.0))] * 3


def test_rounds_summarise_as_the_median_round_figures():
    """The ratio and MFU are medians of the per-round figures (not ratios of medians)."""
    flops = 100e9  # per run
    rounds = [{"ours_s": 1.0, "timm_s": 2.0, "peaks": {"float32": 200.0}},   # 2.0x, 100 GFLOP/s = 50%
              {"ours_s": 2.0, "timm_s": 3.0, "peaks": {"float32": 100.0}},   # 1.5x, 50 GFLOP/s = 50%
              {"ours_s": 0.5, "timm_s": 1.5, "peaks": {"float32": 400.0}}]   # 3.0x, 200 GFLOP/s = 50%
    summary = common.median_over_rounds(rounds, flops)
    assert summary["ours_s"] == 1.0 and summary["timm_s"] == 2.0
    assert summary["ratio_vs_timm"] == pytest.approx(2.0)
    assert summary["mfu"]["float32"] == pytest.approx(0.5)
    assert summary["peak_gflop_s"]["float32"] == 200.0
    assert [r["ratio_vs_timm"] for r in summary["rounds"]] == pytest.approx([2.0, 1.5, 3.0])
    rounds[2]["peaks"]["float32"] = 800.0  # that round's MFU 25%: the median MFU is still 50%, the median peak 200
    assert common.median_over_rounds(rounds, flops)["mfu"]["float32"] == pytest.approx(0.5)


def test_rounds_without_timm_have_no_ratio():
    summary = common.median_over_rounds([{"ours_s": 1.0, "timm_s": None, "peaks": {}}], 1e9)
    assert summary["ratio_vs_timm"] is None and summary["timm_s"] is None and summary["mfu"] == {}


def test_a_rounds_peak_is_the_faster_reading_before_or_after_ours(monkeypatch, capsys):
    """One slow reading of the peak must not lift a round's MFU: each round takes the faster of its two."""
    import types

    readings = iter([400.0, 300.0,    # round 1: before, after (a neighbour's burst after)
                     250.0, 500.0])   # round 2: before slow, after fast
    monkeypatch.setattr(common, "matmul_peaks", lambda dtype, size, repeats: {"float32": next(readings)})
    monkeypatch.setattr(common, "time_runs", lambda fn, repeats, warmup=1: [1.0] * repeats)
    config = types.SimpleNamespace(batch_size=8, image_size=224, model=types.SimpleNamespace(variant="B/16"))
    args = types.SimpleNamespace(rounds=2, repeats=3, peak_size=4096, timm=False, dtype="float32", config="c.py")
    result = common.compare("train_step", args, config, 2, lambda c: (lambda: None), None, 200e9, "step",
                            ("train step", "analytic"))
    assert [r["peak_gflop_s"]["float32"] for r in result["rounds"]] == [400.0, 500.0]
    assert [r["mfu"]["float32"] for r in result["rounds"]] == pytest.approx([0.5, 0.4])  # 200 GFLOP/s achieved
    assert capsys.readouterr().out.splitlines()[-1].startswith("{")  # the JSON line last


@pytest.mark.parametrize("flags, bad", [
    (["--repeats", "0"], "--repeats: 0 is invalid: expected an integer >= 1"),
    (["--peak_size", "-1"], "--peak_size: -1 is invalid: expected an integer >= 0"),
    (["--batch", "x"], "--batch: 'x' is not an integer"),
    (["--rounds", "0"], "--rounds: 0 is invalid"),
])
def test_counts_that_cannot_work_are_usage_errors(flags, bad, capsys):
    import train_step

    with pytest.raises(SystemExit) as exit_info:
        train_step.parse_args(flags)
    assert exit_info.value.code == 2 and bad in capsys.readouterr().err
    assert train_step.parse_args(["--peak_size", "0"]).peak_size == 0


@pytest.mark.parametrize("config_file, image_size, name", [
    ("vit_b16.py", 224, "vit_base_patch16_224"), ("vit_l16.py", 384, "vit_large_patch16_224"),
    ("vit_h14.py", 518, "vit_huge_patch14_224"), ("r50_vit_b16.py", 224, None)])
def test_timm_counterpart_is_named_at_224_and_built_at_the_configs_size(config_file, image_size, name):
    config = common.load_config(os.path.join(common.ROOT, "configs", config_file), "float32", 8)
    config.image_size = image_size
    assert common.timm_name(config) == name


@pytest.mark.parametrize("classifier, image_size, tokens", [("token", 384, 24 * 24 + 1), ("gap", 96, 6 * 6)])
def test_timm_counterpart_is_built_at_the_configs_image_size(classifier, image_size, tokens):
    """Not at the 224px of its name: the position embeddings cover the config's patch grid (Ti/16: cheap)."""
    pytest.importorskip("timm")
    config = common.load_config(os.path.join(common.ROOT, "configs", "vit_ti16.py"), "float32", 8)
    config.image_size, config.model.classifier, config.num_classes = image_size, classifier, 7
    model = common.timm_vit(config, train=False)
    assert tuple(model.pos_embed.shape) == (1, tokens, 192)
    assert tuple(model.patch_embed.img_size) == (image_size, image_size)
    assert (model.cls_token is not None) == (classifier == "token") and model.head.out_features == 7
    assert not model.training


def test_a_missing_timm_counterpart_or_package_is_a_user_error(monkeypatch):
    config = common.load_config(os.path.join(common.ROOT, "configs", "vit_ti16.py"), "float32", 8)
    config.model.patch_size = 32  # timm has no ViT-Ti/32
    with pytest.raises(UserError, match=r"timm has no counterpart of 'vit_tiny_patch32_224'.*pass --no-timm"):
        common.timm_vit(config, train=False)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs torch, torchvision and timm .* or pass --no-timm"):
        common.timm_vit(config, train=False)
