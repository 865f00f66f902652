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


def test_rounds_summarise_as_median_figures_whose_ratio_and_mfu_agree_with_them():
    """The JSON's ratio is ours_img_s / timm_img_s and its MFU achieved / peak, of the very numbers it reports
    (medians over the rounds); the per-round spread is reported apart."""
    flops = 100e9  # per run
    rounds = [{"ours_s": 1.0, "timm_s": 2.0, "peak": 200.0},   # 2.0x, 100 GFLOP/s = 50%
              {"ours_s": 2.0, "timm_s": 3.0, "peak": 100.0},   # 1.5x, 50 GFLOP/s = 50%
              {"ours_s": 0.5, "timm_s": 1.5, "peak": 400.0}]   # 3.0x, 200 GFLOP/s = 50%
    summary = common.summarise_rounds(rounds, flops, batch=8)
    assert summary["ours_s"] == 1.0 and summary["timm_s"] == 2.0 and summary["peak_gflop_s"] == 200.0
    assert summary["ours_img_s"] == 8.0 and summary["timm_img_s"] == 4.0 and summary["achieved_gflop_s"] == 100.0
    assert summary["ratio_vs_timm"] == summary["ours_img_s"] / summary["timm_img_s"] == 2.0
    assert summary["mfu"] == summary["achieved_gflop_s"] / summary["peak_gflop_s"] == 0.5
    assert (summary["ratio_min"], summary["ratio_max"]) == pytest.approx((1.5, 3.0))
    assert [r["ratio_vs_timm"] for r in summary["rounds"]] == pytest.approx([2.0, 1.5, 3.0])
    assert [r["ours_img_s"] for r in summary["rounds"]] == [8.0, 4.0, 16.0]

    # Medians of per-round ratios would disagree here (median 2.0x, but 8 / 4.8 img/s reported): not any more.
    rounds[0]["timm_s"] = 1.0  # 1.0x
    rounds[1]["timm_s"] = 5.0  # 2.5x
    summary = common.summarise_rounds(rounds, flops, batch=8)
    assert summary["ratio_vs_timm"] == summary["ours_img_s"] / summary["timm_img_s"] == pytest.approx(1.5)
    rounds[2]["peak"] = 800.0  # peaks 200, 100, 800: the median peak is still 200 and the MFU 100 / 200
    summary = common.summarise_rounds(rounds, flops, batch=8)
    assert summary["mfu"] == summary["achieved_gflop_s"] / summary["peak_gflop_s"] == 0.5
    assert (summary["mfu_min"], summary["mfu_max"]) == pytest.approx((0.25, 0.5))


def test_rounds_without_timm_or_peak_have_no_ratio_or_mfu():
    summary = common.summarise_rounds([{"ours_s": 1.0, "timm_s": None, "peak": None}], 1e9, batch=2)
    assert summary["ours_img_s"] == 2.0 and summary["achieved_gflop_s"] == 1.0
    assert summary["timm_s"] is None and summary["timm_img_s"] is None
    assert summary["ratio_vs_timm"] is None and summary["ratio_min"] is None and summary["ratio_max"] is None
    assert summary["peak_gflop_s"] is None and summary["mfu"] is None and summary["mfu_min"] is None


def test_a_rounds_peak_is_the_faster_reading_before_or_after_ours(monkeypatch, capsys):
    """One slow reading of the peak must not lift a round's MFU: each round takes the faster of its two."""
    import json
    import types

    readings = iter([400.0, 300.0,    # round 1: before, after (a neighbour's burst after)
                     250.0, 500.0])   # round 2: before slow, after fast
    monkeypatch.setattr(common, "model_matmul_peak", lambda dtype, size, repeats: next(readings))
    monkeypatch.setattr(common, "time_runs", lambda fn, repeats, warmup=1: [1.0] * repeats)
    config = types.SimpleNamespace(batch_size=8, image_size=224,
                                   model=types.SimpleNamespace(variant="B/16", gelu_approximate=True))
    args = types.SimpleNamespace(rounds=2, repeats=3, peak_size=4096, timm=False, dtype="float32", config="c.py")
    result = common.compare("train_step", args, config, None, lambda c: (lambda: None), None, 200e9, "step",
                            ("train step", "analytic"))
    assert [r["peak_gflop_s"] for r in result["rounds"]] == [400.0, 500.0]
    assert [r["mfu"] for r in result["rounds"]] == pytest.approx([0.5, 0.4])  # 200 GFLOP/s achieved
    line = json.loads(capsys.readouterr().out.splitlines()[-1])  # the JSON line last
    assert line["peak_gflop_s"] == 450.0 and line["peak_kind"] == "float32"
    assert line["mfu"] == line["achieved_gflop_s"] / line["peak_gflop_s"]
    assert line["timm_torch_threads"] is None and line["ratio_vs_timm"] is None
    assert line["cores"] >= 1
    assert line["threads_match"] is None and line["timm_gelu"] is None and line["timm_compiled"] is None


def test_the_json_line_agrees_with_itself_with_timm(monkeypatch, capsys):
    """ratio_vs_timm = ours_img_s / timm_img_s and mfu = achieved / peak of the printed numbers (bf16: the peak
    accumulating in float32), whatever the per-round figures."""
    import json
    import types

    peaks = iter([300.0, 310.0, 200.0, 210.0, 500.0, 490.0])
    monkeypatch.setattr(common, "model_matmul_peak", lambda dtype, size, repeats: next(peaks))
    times = iter([1.0, 2.0, 2.0, 3.0, 0.5, 1.0])  # ours, timm per round: 2.0x, 1.5x, 2.0x
    monkeypatch.setattr(common, "time_runs", lambda fn, repeats, warmup=1: [next(times)] * repeats)
    config = types.SimpleNamespace(batch_size=8, image_size=224,
                                   model=types.SimpleNamespace(variant="B/16", gelu_approximate=True))
    args = types.SimpleNamespace(rounds=3, repeats=3, peak_size=4096, timm=True, dtype="bfloat16", config="c.py")
    monkeypatch.setattr(common, "timm_name", lambda config: "vit_base_patch16_224")
    common.compare("inference", args, config, 2, lambda c: (lambda: None), lambda c: (lambda: None), 100e9,
                   "batch", ("forward", "analytic"))
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["ours_img_s"] == 8.0 and line["timm_img_s"] == 4.0  # medians of 1, 2, 0.5 s and 2, 3, 1 s
    assert line["ratio_vs_timm"] == line["ours_img_s"] / line["timm_img_s"]
    assert (line["ratio_min"], line["ratio_max"]) == pytest.approx((1.5, 2.0))
    assert line["peak_gflop_s"] == 310.0 and line["peak_kind"] == "bfloat16_f32acc"
    assert line["mfu"] == line["achieved_gflop_s"] / line["peak_gflop_s"]
    assert line["timm_torch_threads"] == 2
    assert line["ours_gelu"] == "tanh" and line["timm_gelu"] == "erf" and line["timm_compiled"] is False


@pytest.mark.parametrize("xla, match", [(2, True), (4, False), (None, None)])
def test_the_json_line_says_whether_xla_and_torch_ran_the_same_threads(xla, match, monkeypatch, capsys):
    """The ratio is only fair at equal thread counts: threads_match in the JSON, a warning row when they differ
    (None where XLA's threads cannot be counted)."""
    import json
    import types

    monkeypatch.setattr(common, "xla_threads", lambda: xla)
    monkeypatch.setattr(common, "model_matmul_peak", lambda dtype, size, repeats: 100.0)
    monkeypatch.setattr(common, "time_runs", lambda fn, repeats, warmup=1: [1.0] * repeats)
    monkeypatch.setattr(common, "timm_name", lambda config: "vit_base_patch16_224")
    config = types.SimpleNamespace(batch_size=8, image_size=224,
                                   model=types.SimpleNamespace(variant="B/16", gelu_approximate=False))
    args = types.SimpleNamespace(rounds=1, repeats=1, peak_size=4096, timm=True, dtype="float32", config="c.py")
    common.compare("inference", args, config, 2, lambda c: (lambda: None), lambda c: (lambda: None), 1e9,
                   "batch", ("forward", "analytic"), {"extra_field": 1})
    out = capsys.readouterr().out.splitlines()
    line = json.loads(out[-1])
    assert line["xla_threads"] == xla and line["timm_torch_threads"] == 2 and line["threads_match"] is match
    assert line["extra_field"] == 1 and line["ours_gelu"] == "erf"  # gelu_approximate=False: timm's form
    warnings = [row for row in out[:-1] if row.startswith("warning")]
    if match is False:
        assert warnings == [next(r for r in out if "XLA runs 4 threads and torch 2" in r)]
    else:
        assert warnings == []


def test_the_bf16_peak_is_the_matmul_accumulating_in_float32(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "matmul_peak", lambda *a, **k: calls.append((a, k)) or 1.0)
    common.model_matmul_peak("bfloat16", 64, 2)
    common.model_matmul_peak("float32", 64, 2)
    assert calls == [(("bfloat16", 64, 2), {"f32_accumulate": True}), (("float32", 64, 2), {"f32_accumulate": False})]


def test_threads_are_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert common.cores() == 3


@pytest.mark.parametrize("flags, bad", [
    (["--repeats", "0"], "--repeats: 0 is invalid: expected an integer >= 1"),
    (["--peak_size", "-1"], "--peak_size: -1 is invalid: expected an integer >= 0"),
    (["--batch", "x"], "--batch: 'x' is not an integer"),
    (["--rounds", "0"], "--rounds: 0 is invalid"),
    (["--peak_size", "64"], "--peak_size: 64 is too small for a matmul peak: expected 0 (skip the peak) or an "
                            "integer >= 512"),
    (["--peak_size", "511"], "--peak_size: 511 is too small"),
])
def test_counts_that_cannot_work_are_usage_errors(flags, bad, capsys):
    import train_step

    with pytest.raises(SystemExit) as exit_info:
        train_step.parse_args(flags)
    assert exit_info.value.code == 2 and bad in capsys.readouterr().err
    assert train_step.parse_args(["--peak_size", "0"]).peak_size == 0
    assert train_step.parse_args(["--peak_size", str(common.PEAK_MIN)]).peak_size == common.PEAK_MIN == 512


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


def test_timms_step_takes_torchs_fused_adamw_with_our_hyperparameters():
    """torch's fastest CPU path (fused AdamW, foreach clipping), decay on kernels only as ours; one tiny step runs."""
    pytest.importorskip("timm")
    import train_step

    config = common.load_config(os.path.join(common.ROOT, "configs", "vit_ti16.py"), "float32", 2)
    config.image_size, config.num_classes = 32, 5
    model = common.timm_vit(config, train=True)
    optimizer = train_step.timm_adamw(model, config.optimizer)
    assert optimizer.defaults["fused"] and optimizer.defaults["lr"] == config.optimizer.lr
    assert optimizer.defaults["betas"] == (config.optimizer.b1, config.optimizer.b2)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == config.optimizer.weight_decay and plain["weight_decay"] == 0.0
    decayed_ids, plain_ids = {id(p) for p in decayed["params"]}, {id(p) for p in plain["params"]}
    kernels = (model.patch_embed.proj.weight, model.head.weight, model.blocks[0].attn.qkv.weight)
    assert {id(k) for k in kernels} <= decayed_ids
    assert {id(model.pos_embed), id(model.cls_token), id(model.norm.weight), id(model.head.bias)} <= plain_ids
    assert len(decayed_ids) + len(plain_ids) == len(list(model.parameters()))
    train_step.timm_step_runner(config)()  # one step (forward, backward, foreach clip, fused AdamW) runs


def test_timm_counterpart_takes_our_stochastic_depth_ramp_and_differs_in_gelu_only_as_documented():
    """timm's drop-path rates are ours (0 at the first block -> config.model.stochastic_depth at the last), in
    training only; its GELU is the exact erf one (common.TIMM_GELU), ours the tanh approximation by default."""
    pytest.importorskip("timm")
    import numpy as np

    config = common.load_config(os.path.join(common.ROOT, "configs", "vit_ti16.py"), "float32", 2)
    config.image_size, config.model.stochastic_depth = 32, 0.1
    model = common.timm_vit(config, train=True)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.blocks]  # rate 0: an nn.Identity
    ours = np.linspace(0.0, config.model.stochastic_depth, config.model.num_layers)  # vit_jax.models.vit
    assert rates == pytest.approx(ours) and rates[-1] == pytest.approx(0.1)
    assert [getattr(b.drop_path2, "drop_prob", 0.0) for b in model.blocks] == pytest.approx(ours)
    eval_model = common.timm_vit(config, train=False)
    assert all(not hasattr(b.drop_path1, "drop_prob") for b in eval_model.blocks)
    act = model.blocks[0].mlp.act
    assert common.TIMM_GELU == "erf" and act.approximate == "none"
    assert common.gelu_form(config) == "tanh" and config.model.gelu_approximate


def test_analytic_overcount_is_the_patch_embeddings_input_gradient():
    """Forward x 3 counts the patch embedding's input gradient, which a step never computes: ~0.22% for B/16."""
    config = common.load_config(os.path.join(common.ROOT, "configs", "vit_b16.py"), "float32", 8)
    (patch,) = [c for c in matmul_bound.step_contractions(config) if c.name == "patch embedding"]
    forward = common.forward_flops_per_image(config) * config.batch_size
    overcount = common.analytic_overcount(config)
    assert overcount == pytest.approx(patch.flops / (3 * forward), rel=1e-9)
    assert 0.0021 < overcount < 0.0023


def test_the_train_step_benchmark_reports_the_analytic_overcount(monkeypatch):
    import train_step

    calls = []
    monkeypatch.setattr(common, "compare", lambda *a, **k: calls.append(a) or {})
    config_file = os.path.join(common.ROOT, "configs", "vit_ti16.py")
    train_step.main(["--no-timm", "--config", config_file, "--batch", "2"])
    (args,) = calls
    config, flops, extra = args[2], args[6], args[9]
    assert flops == 3 * common.forward_flops_per_image(config) * 2  # issue #8's definition, forward x 3
    assert extra == {"analytic_overcount": common.analytic_overcount(config)}


@pytest.mark.parametrize("flags, bad", [
    (["--seconds", "0"], "--seconds: 0 is invalid: expected a finite number > 0"),
    (["--seconds", "-1"], "--seconds: -1 is invalid"),
    (["--seconds", "nan"], "--seconds: nan is invalid"),
    (["--seconds", "x"], "--seconds: 'x' is not a number"),
    (["--images", "0"], "--images: 0 is invalid: expected an integer >= 1"),
    (["--batch_size", "0"], "--batch_size: 0 is invalid: expected an integer >= 1"),
    (["--workers", "-1"], "--workers: -1 is invalid: expected an integer >= 0"),
])
def test_input_pipeline_flags_that_cannot_work_are_usage_errors(flags, bad, capsys):
    import input_pipeline

    with pytest.raises(SystemExit) as exit_info:
        input_pipeline.parse_args(flags)
    assert exit_info.value.code == 2 and bad in capsys.readouterr().err
    args = input_pipeline.parse_args(["--seconds", "0.01", "--images", "1", "--batch_size", "1", "--workers", "0"])
    assert (args.seconds, args.images, args.batch_size, args.workers) == (0.01, 1, 1, 0)


def test_input_pipelines_cpu_time_counts_its_worker_processes():
    """Per-core pipeline figures count the cores busy in this process and its (grain worker) children."""
    import subprocess

    import input_pipeline

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in input_pipeline._descendants(os.getpid())
        assert input_pipeline.cpu_seconds() >= 0.0
    finally:
        child.kill()
        child.wait()
    assert child.pid not in input_pipeline._descendants(os.getpid())


class _Program:
    def __init__(self, cost):
        self.cost = cost

    def cost_analysis(self):
        return self.cost


def test_compile_report_refuses_a_cost_analysis_without_flops():
    import compile_report

    assert compile_report.flops_of("train step", _Program([{}]), _Program({"flops": 5.0})) == 5.0
    with pytest.raises(RuntimeError, match="cost analysis of the train step has no 'flops' figure"):
        compile_report.flops_of("train step", _Program([{"bytes accessed": 1.0}]), _Program(None))
    with pytest.raises(RuntimeError, match="forward pass has no 'flops'"):
        compile_report.flops_of("forward pass", _Program({"flops": 0.0}))


@pytest.mark.parametrize("flags, bad", [
    (["--batch", "0"], "--batch: 0 is invalid: expected an integer >= 1"),
    (["--batch", "x"], "--batch: 'x' is not an integer"),
])
def test_compile_report_bad_batch_is_a_usage_error(flags, bad, capsys):
    import compile_report

    with pytest.raises(SystemExit) as exit_info:
        compile_report.main(flags)
    assert exit_info.value.code == 2 and bad in capsys.readouterr().err


def test_compile_report_of_a_tiny_vit_prints_sane_flops_ratios_and_the_json_line_last(tmp_path, capsys):
    """XLA's FLOPs of a one-block Ti/16 step at 64px against forward x 3: a little above 1 (AdamW, softmax,
    GELU, LayerNorm) less the patch embedding's input gradient the step never computes."""
    import json

    import compile_report

    config_file = tmp_path / "tiny.py"
    config_file.write_text("from configs import common\n\n\ndef get_config():\n"
                           "    config = common.get_config('Ti/16')\n"
                           "    config.image_size, config.model.num_layers = 64, 1\n"
                           "    return config\n")
    result = compile_report.main(["--config", str(config_file), "--batch", "8"])
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line == json.loads(json.dumps(result))
    assert line["benchmark"] == "compile_report" and line["batch"] == 8 and line["image_size"] == 64
    assert 0.9 < line["flops_ratio"] < 1.2 and 0.9 < line["forward_flops_ratio"] < 1.2
    assert line["xla_step_gflop"] > 0 and line["xla_forward_gflop"] > 0
    assert 0.0 < line["analytic_overcount"] < 0.1  # the patch embedding: a big share of a one-block model


def test_init_compile_compares_the_three_forms_and_prints_the_json_line_last(tmp_path, capsys):
    import json

    import init_compile

    config_file = tmp_path / "tiny.py"
    config_file.write_text("from configs import common\n\n\ndef get_config():\n"
                           "    config = common.get_config('Ti/16')\n"
                           "    config.image_size, config.model.num_layers, config.model.hidden_size = 32, 3, 48\n"
                           "    config.model.mlp_dim, config.model.num_heads, config.model.variant = 96, 2, 'custom'\n"
                           "    return config\n")
    result = init_compile.main(["--config", str(config_file), "--rounds", "1"])
    out = capsys.readouterr().out.splitlines()
    line = json.loads(out[-1])
    assert line == json.loads(json.dumps(result))
    assert line["benchmark"] == "init_compile" and line["num_layers"] == 3 and line["platform"] == "cpu"
    assert line["mesh"] == {"data": 1, "fsdp": 1, "model": 1} and line["topology"] is None
    for form in ("per_block", "scanned", "run_once"):
        parts = [line[f"{form}_{key}"] for key in ("lower_s", "compile_s", "run_s")]
        assert all(p > 0 for p in parts) and line[f"{form}_total_s"] == pytest.approx(sum(parts))
    assert line["speedup"] == pytest.approx(line["per_block_total_s"] / line["run_once_total_s"])
    assert [row.split()[0] for row in out[3:6]] == ["per-block", "scanned", "run-once"]


@pytest.mark.parametrize("flags, bad", [(["--rounds", "0"], "--rounds: 0 is invalid"),
                                        (["--fsdp", "0"], "--fsdp: 0 is invalid")])
def test_init_compile_flags_that_cannot_work_are_usage_errors(flags, bad, capsys):
    import init_compile

    with pytest.raises(SystemExit) as exit_info:
        init_compile.parse_args(flags)
    assert exit_info.value.code == 2 and bad in capsys.readouterr().err


def test_init_compile_for_a_topology_without_libtpu_says_how_to_install_it(monkeypatch):
    import importlib.util

    import init_compile

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(UserError, match=r"needs libtpu.*pip install -e \.\[tpu\]"):
        init_compile.main(["--topology", "v5e:2x2"])


def test_init_compile_refuses_a_mesh_size_left_to_the_device_count(tmp_path):
    import init_compile

    config_file = tmp_path / "rest.py"
    config_file.write_text("from configs import common\n\n\ndef get_config():\n"
                           "    config = common.get_config('Ti/16')\n    config.mesh.fsdp = -1\n    return config\n")
    with pytest.raises(UserError, match=r"mesh.fsdp=-1, mesh.model=1: .*pass --fsdp and --model"):
        init_compile.main(["--config", str(config_file)])
