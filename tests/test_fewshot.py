"""Few-shot linear evaluation (vit_jax/fewshot.py): the regression against the normal equations (float64) and
scikit-learn's Ridge, the draws of shots, the config checks, and a training run that reports few-shot accuracy
at step 0 and at the end (checkpoint evaluation with --mode=fewshot is in test_finetune.py, on its checkpoint)."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from tests.train_helpers import tiny_config
from vit_jax import config_check, fewshot


def _design(x, features):
    mean, std = features.mean(0, keepdims=True), features.std(0, keepdims=True) + 1e-5
    return np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=fewshot.BIAS_CONSTANT)


@pytest.mark.parametrize("num_points, dim", [(60, 12), (12, 60)])  # N >= D + 1 and N < D + 1: both Gram forms
def test_ridge_weights_solve_the_normal_equations_as_sklearn_does(num_points, dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_points, dim)) * rng.uniform(0.1, 5.0, size=dim) + rng.normal(size=dim)
    labels = np.arange(num_points) % 4
    cache = fewshot.ridge_cache(x.astype(np.float32), labels, 4)
    z = _design(x.astype(np.float32).astype(np.float64), x.astype(np.float32).astype(np.float64))
    y = 2.0 * np.eye(4)[labels] - 1.0
    for l2 in (1e-2, 1.0, 2.0**10):
        expected = np.linalg.solve(z.T @ z + l2 * np.eye(dim + 1), z.T @ y)
        weights = fewshot.ridge_weights(cache, l2)
        np.testing.assert_allclose(weights, expected, rtol=1e-6, atol=1e-9)
        sk = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(z, y).coef_.T
        np.testing.assert_allclose(weights, sk, rtol=1e-6, atol=1e-9)


def test_ridge_accuracy_is_the_argmax_of_the_regression_on_test_features():
    rng = np.random.default_rng(1)
    x, x_test = rng.normal(size=(40, 8)), rng.normal(size=(25, 8))
    labels, labels_test = rng.integers(0, 3, 40), rng.integers(0, 3, 25)
    cache = fewshot.ridge_cache(x, labels, 3)
    weights = np.linalg.solve(_design(x, x).T @ _design(x, x) + 5.0 * np.eye(9),
                              _design(x, x).T @ (2.0 * np.eye(3)[labels] - 1.0))
    expected = np.mean(np.argmax(_design(x_test, x) @ weights, axis=1) == labels_test)
    assert fewshot.ridge_accuracy(cache, x_test, labels_test, 5.0) == pytest.approx(expected, abs=1e-12)


def test_separable_classes_are_recognised_and_shuffled_labels_are_not():
    """Gaussian clusters far apart: 5 shots per class classify every test point; with the training labels
    permuted among the examples the regression learns nothing (near chance)."""
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(10, 32)) * 10
    labels, labels_test = np.repeat(np.arange(10), 30), np.repeat(np.arange(10), 20)
    x = centres[labels] + rng.normal(size=(300, 32))
    x_test = centres[labels_test] + rng.normal(size=(200, 32))
    scores = fewshot.evaluate_features((x, labels), (x_test, labels_test), 10, (1, 5), 3, 2.0**10)
    assert scores[5] == 1.0 and scores[1] > 0.9
    shuffled = fewshot.evaluate_features((x, rng.permutation(labels)), (x_test, labels_test), 10, (5,), 3, 1.0)
    assert shuffled[5] < 0.35


def test_the_accuracy_is_the_mean_of_each_seeds_draw():
    """Hand-made 1-D features, 1 shot of 2 classes: the regression's boundary is midway between the two drawn
    points. Seed 0 draws x=0 and x=10 (boundary 5: both test points right, accuracy 1), seed 1 draws x=8 and x=10
    (boundary 9: the class-1 point at 7 wrong, accuracy 0.5); two seeds report their mean, 0.75."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    x = np.array([[8.0], [4.0], [0.0], [12.0], [14.0], [10.0]])
    test = (np.array([[3.0], [7.0]]), np.array([0, 1]))
    assert [fewshot.draw_shots(labels, 2, 1, seed).tolist() for seed in (0, 1)] == [[2, 5], [0, 5]]
    assert fewshot.evaluate_features((x, labels), test, 2, (1,), 1, 1.0) == {1: 1.0}
    assert fewshot.evaluate_features((x, labels), test, 2, (1,), 2, 1.0) == {1: 0.75}


def test_non_finite_features_are_an_error_naming_the_task(monkeypatch):
    """A diverged model's NaN features: an error saying so, not numpy's "Eigenvalues did not converge"."""
    import jax

    from vit_jax import data, sharding

    config = _config(datasets=("digits,train,test",), shots=(1,), seeds=1)
    config.mesh.data = 1
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    task = fewshot.FewshotTask("digits", "train", "test")
    monkeypatch.setattr(fewshot, "check_datasets", lambda config: [(task, config)])
    batch = {"index": np.arange(12), "mask": np.array([1.0] * 10 + [0, 0])}
    monkeypatch.setattr(data, "make_eval_iterator", lambda config, batch_sharding, keys: iter([batch]))

    def represent(params, batch):  # NaN wherever the parameters are
        return (np.full((12, 4), np.nan, np.float32), batch["mask"], batch["index"] % config.num_classes,
                batch["index"])

    with pytest.raises(fewshot.FewshotError, match=r"few-shot digits \(digits, split 'train'\): the model produced "
                                                   r"non-finite features \(NaN or inf\) for 10 of 10 images"):
        fewshot.evaluate(config, None, mesh, represent)


def test_draws_take_each_class_equally_nest_across_shot_counts_and_change_with_the_seed():
    labels = np.array([0] * 7 + [1] * 12 + [2] * 9)
    five = fewshot.draw_shots(labels, 3, 5, seed=0)
    assert np.bincount(labels[five], minlength=3).tolist() == [5, 5, 5]
    assert len(set(five.tolist())) == 15
    assert set(five.tolist()) <= set(fewshot.draw_shots(labels, 3, 7, seed=0).tolist())
    np.testing.assert_array_equal(five, fewshot.draw_shots(labels, 3, 5, seed=0))
    assert set(five.tolist()) != set(fewshot.draw_shots(labels, 3, 5, seed=1).tolist())


def test_a_class_with_fewer_images_than_shots_is_an_error_naming_it():
    labels = np.array([0] * 7 + [1] * 12 + [2] * 3)
    with pytest.raises(fewshot.FewshotError, match=r"digits: 5 shot\(s\) need 5 training image\(s\) of every class, "
                                                   r"but 2 of the 4 classes have fewer \(class: images \{2: 3, 3: 0\}"):
        fewshot.draw_shots(labels, 4, 5, seed=0, task="digits")


def _config(**fewshot_fields):
    config = tiny_config()
    for key, value in fewshot_fields.items():
        config.fewshot[key] = value
    return config


def test_datasets_parse_from_tuples_and_command_line_strings():
    tasks = fewshot.parse_tasks((("cars196:2.1.0", "train", "test"), "digits, train[:50%], test"))
    assert [(t.name, t.dataset, t.train_split, t.test_split) for t in tasks] == [
        ("cars196", "cars196:2.1.0", "train", "test"), ("digits", "digits", "train[:50%]", "test")]
    assert fewshot.validate(_config(datasets=())) == []
    # `--config.fewshot.datasets=` (empty) is one empty entry: the error says how to ask for none.
    with pytest.raises(config_check.ConfigError, match=r"entry '' is invalid: .*; for none, "
                                                       r"--config.fewshot.datasets='\(\)'$"):
        config_check.dataset_entries("", "fewshot.datasets", ("dataset", "train_split", "test_split"), "'d,train,test'")


@pytest.mark.parametrize("fields, message", [
    ({"datasets": ("digits,train",)}, r"entry 'digits,train' is invalid: expected \(dataset, train_split, test_split"),
    ({"datasets": (("digits", "train", "test"), "digits,train,test")}, r"each dataset may appear once"),
    ({"shots": (1, 0)}, r"config.fewshot.shots=\(1, 0\) is invalid: expected a tuple of positive integers"),
    ({"shots": ()}, r"config.fewshot.shots=\(\) is invalid"),
    ({"shots": (5, 5)}, r"config.fewshot.shots=\(5, 5\) is invalid: each shot count may appear once"),
    ({"datasets": ("digits", "train", "test")}, r"it reads as three datasets; one \(dataset, train_split, "
                                                r"test_split\) entry is written \(\('digits', 'train', 'test'\),\)"),
    ({"l2_reg": math.inf}, r"config.fewshot.l2_reg=inf is invalid"),
    ({"seeds": 0}, r"config.fewshot.seeds=0 is invalid: expected a positive integer"),
    ({"l2_reg": 0.0}, r"config.fewshot.l2_reg=0.0 is invalid: expected a positive regularisation strength"),
    ({"l2_reg": math.nan}, r"config.fewshot.l2_reg=nan is invalid"),
    ({"every_steps": -1}, r"config.fewshot.every_steps=-1 is invalid: expected 0"),
])
def test_config_check_refuses_bad_fewshot_fields(fields, message):
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(_config(**fields), 8)


def test_a_non_numeric_l2_reg_from_a_config_file_is_a_config_error():
    config = _config()
    with config.unlocked():
        del config.fewshot["l2_reg"]
        config.fewshot.l2_reg = "strong"
    with pytest.raises(config_check.ConfigError, match=r"config.fewshot.l2_reg='strong' is invalid"):
        fewshot.validate(config)


@pytest.mark.parametrize("overrides", [{"model.representation_size": 24, "model.scan": True},
                                       {"model.classifier": "gap", "model.dtype": "bfloat16"}])
def test_features_times_the_head_are_the_models_logits(overrides):
    """What few-shot regresses on is what the head sees: pooled tokens, after pre_logits (tanh) if the model has
    one; with scan and in bfloat16 too (the plain model: test_finetune, against a trained head)."""
    import jax

    from tests.train_helpers import synthetic_batch
    from vit_jax import sharding, train

    config = tiny_config(**{"mesh.data": 1, **overrides})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    params = jax.device_get(train.init_state(config, mesh, config.total_steps)["params"])
    rng = np.random.default_rng(4)
    params["head"] = {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in params["head"].items()}
    batch = synthetic_batch(config, 1)
    batch = {**batch, "mask": np.ones(len(batch["image"]), np.float32), "index": np.arange(len(batch["image"]))}
    features, mask, classes, index = jax.device_get(fewshot.make_representation_fn(config, mesh)(params, batch))
    width = overrides.get("model.representation_size") or config.model.hidden_size
    assert features.shape == (config.batch_size, width) and features.dtype == np.float32
    np.testing.assert_array_equal(classes, batch["label"].argmax(-1))
    np.testing.assert_array_equal(index, batch["index"])
    logits = jax.jit(train.make_model(config).apply)({"params": params}, batch["image"])
    expected = features @ params["head"]["kernel"] + params["head"]["bias"]
    tolerance = 3e-2 if config.model.dtype == "bfloat16" else 1e-5
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=tolerance, atol=tolerance)


def test_features_come_back_in_the_splits_order_whatever_order_the_batches_hold(monkeypatch):
    """Several processes read strided shares, so a batch's rows are not in split order: features are sorted by
    each row's index, and padding (mask 0) is dropped, so a seed draws the same images on any process count."""
    import jax

    from vit_jax import data, sharding

    config = tiny_config(**{"mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    order = np.random.default_rng(5).permutation(20)
    batches = [{"index": np.concatenate([order[:10], [0, 0]]), "mask": np.array([1.0] * 10 + [0, 0])},
               {"index": np.concatenate([order[10:], [0, 0]]), "mask": np.array([1.0] * 10 + [0, 0])}]
    monkeypatch.setattr(data, "make_eval_iterator", lambda config, batch_sharding, keys: iter(batches))

    def represent(params, batch):  # feature = 10 x index, class = index % 3, padding rows -1
        index = batch["index"].astype(np.float32)
        return np.where(batch["mask"][:, None] > 0, index[:, None] * 10, -1.0), batch["mask"], \
            batch["index"] % 3, batch["index"]

    features, labels = fewshot.split_features(config, represent, None, mesh, "train")
    np.testing.assert_array_equal(features[:, 0], np.arange(20) * 10.0)
    np.testing.assert_array_equal(labels, np.arange(20) % 3)


def test_masked_patch_prediction_has_no_features_to_evaluate():
    config = _config(datasets=("digits,train,test",))
    config.objective = "masked_patch_prediction"
    with pytest.raises(config_check.ConfigError, match=r"a masked patch prediction model does not have"):
        fewshot.validate(config)


def test_a_missing_fewshot_dataset_fails_before_the_run_writes_anything(tmp_path, digits_dir):
    from vit_jax import data, train

    config = _config(datasets=("oxford_iiit_pet,train,test",))
    config.dataset, config.train_split, config.eval_split = "digits", "train", "test"
    config.tfds_data_dir = digits_dir
    with pytest.raises(data.DatasetError, match=r"dataset 'oxford_iiit_pet' is not prepared.*vit_jax.data.prepare"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_bad_fewshot_entry_is_named_and_too_few_shots_stop_a_run_before_it_writes(tmp_path, digits_dir):
    from vit_jax import data, train

    config = _config(datasets=("digits,trian,test",))
    config.dataset, config.train_split, config.eval_split = "digits", "train", "test"
    config.tfds_data_dir = digits_dir
    with pytest.raises(data.DatasetError, match=r"config.fewshot.datasets entry 'digits,trian,test': "
                                                r"its train split 'trian' is not a split of digits"):
        fewshot.check_datasets(config)
    config.fewshot.datasets, config.fewshot.shots = ("digits,train[:100],test",), (1, 25)
    config.pp.inception_crop, config.eval_batch_size = False, 128
    with pytest.raises(fewshot.FewshotError, match=r"25 shot\(s\) need 25 training image\(s\) of every class"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("train_split, test_split, shared", [
    ("train", "train", 1500), ("train[:90%]", "train[80%:]", 150), ("train[:10]+test", "test[5:]", 292),
])
def test_shots_from_the_images_scored_are_refused(digits_dir, train_split, test_split, shared):
    config = _config(datasets=(f"digits,{train_split},{test_split}",))
    config.tfds_data_dir = digits_dir
    with pytest.raises(fewshot.FewshotError, match=rf"entry 'digits,{re.escape(train_split)},"
                                                   rf"{re.escape(test_split)}': .* share {shared} example\(s\)"):
        fewshot.check_datasets(config)
    config.fewshot.datasets = ("digits,train[:90%],train[90%:]",)  # disjoint slices of one split
    assert [task.name for task, _ in fewshot.check_datasets(config)] == ["digits"]


def test_a_training_run_reports_fewshot_accuracy_at_step_0_and_at_the_end(tmp_path, capsys, caplog, digits_dir):
    """Few-shot of the raw params, said so where the run keeps a Polyak average: in the run and with --mode=fewshot
    (which does not read the checkpoint's average). A finished run scored again scores its few-shot again, said so
    too: test_extra_evals.py::test_a_finished_run_without_its_final_metrics_is_scored_again_as_it_was_trained."""
    import logging

    from vit_jax import train

    config = _config(datasets=("digits,train[:400],test[:100]",), shots=(2,), seeds=1)
    config.dataset, config.train_split, config.eval_split = "digits", "train", "test"
    config.tfds_data_dir = digits_dir
    config.pp.inception_crop, config.total_steps, config.eval_batch_size = False, 3, 128
    config.optimizer.warmup_steps, config.optimizer.ema_decay = 1, 0.5
    raw = "few-shot scores the raw params of {}, not their Polyak average"
    with caplog.at_level(logging.INFO):
        result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert raw.format("this run") in caplog.text
    out = capsys.readouterr().out
    assert "few-shot at step 0: digits_2shot" in out and "few-shot at step 3: digits_2shot" in out, out
    stored = json.loads((tmp_path / "run" / train.FINAL_METRICS).read_text())
    assert stored["fewshot"] == result["fewshot"] and set(result["fewshot"]) == {"digits_2shot"}
    assert 0.1 < result["fewshot"]["digits_2shot"] <= 1.0  # 10 classes: above chance even from random features

    caplog.clear()
    with caplog.at_level(logging.INFO):
        scored = train.evaluate_checkpoint(config, str(tmp_path / "run"), mode="fewshot")
    assert raw.format("step 3 (the checkpoint holds an average: it is not read)") in caplog.text
    assert scored == result["fewshot"]
