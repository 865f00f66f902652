"""Polyak averaging (`optimizer.ema_decay`): the step's average against a float64 reference, a run that saves,
evaluates and reports it, resumes it exactly, and its "ema" item read back as weights; the errors around it."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from tests.train_helpers import synthetic_batch, tiny_config, to_device
from vit_jax import checkpoints, config_check, optim, sharding, train
from vit_jax.interop import CheckpointError, load_pretrained
from vit_jax.interop.common import flatten, params_to_canonical


def _reference_average(trajectory: list[dict], decay: float) -> dict:
    """sum_j d^(k-j) (1 - d) p_j / (1 - d^k) over the params p_1..p_k after each step, in float64."""
    k = len(trajectory)
    weights = np.array([decay ** (k - j) * (1 - decay) for j in range(1, k + 1)]) / (1 - decay ** k)
    return jax.tree.map(lambda *ps: sum(w * np.asarray(p, np.float64) for w, p in zip(weights, ps)), *trajectory)


def test_the_step_keeps_the_bias_corrected_average_of_its_params():
    config = tiny_config(**{"optimizer.ema_decay": 0.6, "mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    start = jax.device_get(state["params"])
    np.testing.assert_array_equal(jax.device_get(state["ema"])["head"]["kernel"], start["head"]["kernel"])
    step = train.make_train_step(config, mesh, config.total_steps)
    trajectory = []
    for seed in range(5):
        state, _ = step(state, to_device(synthetic_batch(config, seed), sharding.batch_sharding(mesh)))
        trajectory.append(jax.device_get(state["params"]))
    expected = _reference_average(trajectory, 0.6)
    ema = jax.device_get(state["ema"])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(ema), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # The average is not the params: the head moved at every step.
    assert np.abs(ema["head"]["kernel"] - trajectory[-1]["head"]["kernel"]).max() > 1e-4


def test_without_a_decay_the_state_holds_no_average():
    config = tiny_config(**{"mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    assert "ema" not in train.abstract_state(config, mesh)
    assert "ema" not in train.init_state(config, mesh, config.total_steps)


@pytest.mark.parametrize("decay", [1.0, -0.1, float("nan")])
def test_a_decay_outside_0_1_is_a_config_error(decay):
    with pytest.raises(config_check.ConfigError, match=r"optimizer.ema_decay=.*expected a value in \[0, 1\)"):
        config_check.validate(tiny_config(**{"optimizer.ema_decay": decay}), 8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    """Digits prepared once for the module's runs."""
    return str(tmp_path_factory.mktemp("tfds"))


def _digits_config(data_dir, **overrides):
    config = tiny_config(**{"dataset": "digits", "train_split": "train", "eval_split": "test",
                            "tfds_data_dir": data_dir, "pp.inception_crop": False, "total_steps": 4,
                            "checkpoint_every": 2, "eval_every": 2, "optimizer.warmup_steps": 1,
                            "eval_batch_size": 128, "optimizer.ema_decay": 0.5, **overrides})
    config_check.validate(config, 8)
    return config


def _canonical_ema(workdir: str, step: int) -> dict:
    return flatten(load_pretrained(os.path.join(workdir, "checkpoints", str(step), "ema"),
                                   tiny_config().model, num_classes=10, image_size=16))


def test_a_run_saves_evaluates_and_resumes_its_average(tmp_path, data_dir, capsys):
    config = _digits_config(data_dir)
    workdir = str(tmp_path / "run")
    result = train.train_and_evaluate(config, workdir)
    out = capsys.readouterr().out
    assert "eval (Polyak average) at step 2: " in out and "eval (Polyak average) at step 4: " in out
    assert set(result["ema"]) == {"test_accuracy", "test_loss", "test_top5"}
    assert result["ema"]["test_loss"] != result["test_loss"]
    assert f"| Polyak average {100 * result['ema']['test_accuracy']:.2f}%" in out
    on_disk = json.loads((tmp_path / "run" / train.FINAL_METRICS).read_text())
    assert on_disk["ema"] == result["ema"]
    for step in (2, 4):
        assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step), "ema"))

    # --mode=eval scores both, whatever this config's decay.
    without = _digits_config(data_dir, **{"optimizer.ema_decay": 0.0})
    scores = train.evaluate_checkpoint(without, workdir)
    assert scores["top1"] == pytest.approx(result["test_accuracy"])
    assert scores["ema/top1"] == pytest.approx(result["ema"]["test_accuracy"])
    assert scores["ema/loss"] == pytest.approx(result["ema"]["test_loss"], rel=1e-6)

    # Resumed from step 2, the run ends on the same average (restored, not restarted from the params).
    final = _canonical_ema(workdir, 4)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed, ignore=lambda d, names: [n for n in names if n == train.FINAL_METRICS
                                                               or (n == "4" and d.endswith("checkpoints"))])
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["2"]
    again = train.train_and_evaluate(config, resumed)
    for key, value in final.items():
        np.testing.assert_array_equal(_canonical_ema(resumed, 4)[key], value, err_msg=key)
    assert again["ema"] == result["ema"]
    # A finished run without its final_metrics.json scores its average again (whatever the decay): test_extra_evals.


def test_with_frozen_parameters_the_average_holds_the_trained_ones_and_saves_whole(tmp_path, data_dir):
    """A frozen parameter is its own average: the state keeps no copy of it (None), the saved "ema" item is
    whole (the frozen ones exactly the params), and a resumed run trims it again and steps on."""
    frozen = "embedding/.*|Transformer/encoderblock_0/.*"
    config = _digits_config(data_dir, **{"optimizer.freeze": frozen, "total_steps": 2})
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    saved, params = _canonical_ema(workdir, 2), flatten(load_pretrained(
        os.path.join(workdir, "checkpoints", "2"), tiny_config().model, num_classes=10, image_size=16))
    assert set(saved) == set(params)
    for key, value in saved.items():
        if key.startswith(("embedding/", "Transformer/encoderblock_0/")):
            np.testing.assert_array_equal(value, params[key], err_msg=key)
    assert np.abs(saved["head/kernel"] - params["head/kernel"]).max() > 1e-6  # averaged, not the params

    later = _digits_config(data_dir, **{"optimizer.freeze": frozen, "total_steps": 3})
    mesh = sharding.make_mesh(later)
    ckpt = checkpoints.Checkpoints(workdir, keep=3)
    requests = []
    read = ckpt.manager.restore
    ckpt.manager.restore = lambda step, args: requests.append(args) or read(step, args=args)
    try:
        state, _, _ = train.restore_or_init(later, mesh, 3, ckpt)
    finally:
        ckpt.close()
    # The frozen parameters' average is not even read (orbax reads only the leaves asked for).
    asked = {optim.param_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(requests[0]["ema"].item)[0]}
    assert asked == {key for key in params if not key.startswith(("embedding/", "Transformer/encoderblock_0/"))}
    ema = jax.device_get(state["ema"])
    assert ema["embedding"] == {"kernel": None, "bias": None}  # no copy of a frozen parameter
    assert jax.tree.leaves(ema["Transformer"]["encoderblock_0"]) == [] and jax.tree.leaves(ema["head"])
    np.testing.assert_array_equal(ema["head"]["kernel"], saved["head/kernel"])
    step = train.make_train_step(later, mesh, 3)
    state, _ = step(state, to_device(synthetic_batch(later, 0), sharding.batch_sharding(mesh)))
    assert int(state["step"]) == 3 and jax.device_get(state["ema"])["embedding"] == {"kernel": None, "bias": None}


def test_resuming_without_a_saved_average_starts_it_at_the_params(tmp_path, data_dir, caplog):
    config = _digits_config(data_dir, **{"optimizer.ema_decay": 0.0, "total_steps": 2})
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", "2", "ema"))
    # Finished: evaluated again with a decay, it reports no average (there is none to report).
    os.remove(os.path.join(workdir, train.FINAL_METRICS))
    assert "ema" not in train.train_and_evaluate(_digits_config(data_dir, **{"total_steps": 2}), workdir)
    with pytest.raises(CheckpointError, match=r"checkpoints/2 holds no Polyak average \(no 'ema' item: its "
                                              r"run had optimizer.ema_decay=0"):
        _canonical_ema(workdir, 2)

    later = _digits_config(data_dir, **{"optimizer.ema_decay": 0.9})
    mesh = sharding.make_mesh(later)
    ckpt = checkpoints.Checkpoints(workdir, keep=3)
    try:
        with caplog.at_level(logging.WARNING):
            state, _, _ = train.restore_or_init(later, mesh, 4, ckpt)
    finally:
        ckpt.close()
    assert "holds no Polyak average" in caplog.text and "the average starts from its params" in caplog.text
    expected = params_to_canonical(jax.device_get(state["params"]))
    for key, value in params_to_canonical(jax.device_get(state["ema"])).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    # The average is a buffer of its own: the step (which donates the state) runs on it.
    step = train.make_train_step(later, mesh, 4)
    state, _ = step(state, to_device(synthetic_batch(later, 0), sharding.batch_sharding(mesh)))
    assert int(state["step"]) == 3
