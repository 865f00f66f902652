"""Few-shot linear evaluation (vit_jax/fewshot.py): the regression against the normal equations (float64) and
scikit-learn's Ridge, the draws of shots, the config checks, and a training run that reports few-shot accuracy
at step 0 and at the end (checkpoint evaluation with --mode=fewshot is in test_finetune.py, on its checkpoint)."""

from __future__ import annotations

import json
import math
import os

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
    with pytest.raises(fewshot.FewshotError, match=r"digits: 5 shots need 5 training images of every class, but 2 "
                                                   r"of the 4 classes have fewer \(class: images \{2: 3, 3: 0\}"):
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


@pytest.mark.parametrize("fields, message", [
    ({"datasets": ("digits,train",)}, r"entry 'digits,train' is invalid: expected \(dataset, train_split, test_split"),
    ({"datasets": (("digits", "train", "test"), "digits,train,test")}, r"each dataset may appear once"),
    ({"shots": (1, 0)}, r"config.fewshot.shots=\(1, 0\) is invalid: expected a tuple of positive integers"),
    ({"shots": ()}, r"config.fewshot.shots=\(\) is invalid"),
    ({"seeds": 0}, r"config.fewshot.seeds=0 is invalid: expected a positive integer"),
    ({"l2_reg": 0.0}, r"config.fewshot.l2_reg=0.0 is invalid: expected a positive regularisation strength"),
    ({"l2_reg": math.nan}, r"config.fewshot.l2_reg=nan is invalid"),
    ({"every_steps": -1}, r"config.fewshot.every_steps=-1 is invalid: expected 0"),
])
def test_config_check_refuses_bad_fewshot_fields(fields, message):
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(_config(**fields), 8)


def test_masked_patch_prediction_has_no_features_to_evaluate():
    config = _config(datasets=("digits,train,test",))
    config.objective = "masked_patch_prediction"
    with pytest.raises(config_check.ConfigError, match=r"a masked patch prediction model does not have"):
        fewshot.validate(config)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    from vit_jax import data

    directory = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", directory)
    return directory


def test_a_missing_fewshot_dataset_fails_before_the_run_writes_anything(tmp_path, digits_dir):
    from vit_jax import data, train

    config = _config(datasets=("oxford_iiit_pet,train,test",))
    config.dataset, config.train_split, config.eval_split = "digits", "train", "test"
    config.tfds_data_dir = digits_dir
    with pytest.raises(data.DatasetError, match=r"dataset 'oxford_iiit_pet' is not prepared.*vit_jax.data.prepare"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_a_training_run_reports_fewshot_accuracy_at_step_0_and_at_the_end(tmp_path, capsys, digits_dir):
    from vit_jax import train

    config = _config(datasets=("digits,train[:400],test[:100]",), shots=(2,), seeds=1)
    config.dataset, config.train_split, config.eval_split = "digits", "train", "test"
    config.tfds_data_dir = digits_dir
    config.pp.inception_crop, config.total_steps, config.eval_batch_size = False, 3, 128
    config.optimizer.warmup_steps = 1
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "few-shot at step 0: digits_2shot" in out and "few-shot at step 3: digits_2shot" in out, out
    stored = json.loads((tmp_path / "run" / train.FINAL_METRICS).read_text())
    assert stored["fewshot"] == result["fewshot"] and set(result["fewshot"]) == {"digits_2shot"}
    assert 0.1 < result["fewshot"]["digits_2shot"] <= 1.0  # 10 classes: above chance even from random features
