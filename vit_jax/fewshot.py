"""Few-shot linear evaluation of frozen representations (the paper's Section 4.1; big_vision's `fewshot_lsr`).

For each dataset of `config.fewshot.datasets`, the model's pre-logits features (the class token or the pooled
tokens, after `pre_logits` if the model has one) of a training split and a test split are computed once. Then,
for each seed and each shot count, `shots` images per class are drawn from the training features and an
L2-regularised least-squares regression maps them to {-1, 1} one-hot targets; the test accuracy of its argmax is
averaged over the seeds. This is how the paper tracks pre-training cheaply (Figures 3, 4 and 6: linear 5-shot
ImageNet), without fine-tuning anything.

Solving follows big_vision: features standardised with the drawn examples' mean and standard deviation, a
constant feature 100 for an (almost unregularised) bias, one eigendecomposition of the smaller Gram matrix per
draw. Here it runs in float64 NumPy on the host, where big_vision used float32 on the host's CPU device.
Images are preprocessed as the main evaluation's (`pp.eval_crop_fraction`: 1.0, the paper's whole-image resize, in
every config); big_vision's few-shot runs resize to 256 and keep the central 224 (0.875), so for numbers beside its
published ones set `--config.pp.eval_crop_fraction=0.875` (the main evaluation crops then too).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from vit_jax import sharding, xla_options
from vit_jax.config_check import ConfigError, dataset_entries, dataset_name
from vit_jax.errors import UserError
from vit_jax.models.vit import build_model

BIAS_CONSTANT = 100.0


class FewshotError(UserError):
    """A few-shot dataset that cannot be evaluated as configured (too few images of a class, multi-label)."""


@dataclasses.dataclass(frozen=True)
class FewshotTask:
    """One dataset of `config.fewshot.datasets`: draw shots from `train_split`, score on `test_split`."""

    dataset: str
    train_split: str
    test_split: str

    @property
    def name(self) -> str:
        """The metric prefix (`config_check.dataset_name`)."""
        return dataset_name(self.dataset)


def parse_tasks(datasets: Sequence[Any]) -> list[FewshotTask]:
    """`config.fewshot.datasets`: each entry a (dataset, train_split, test_split) tuple or a
    "dataset,train_split,test_split" string (as `--config.fewshot.datasets=digits,train,test` gives)."""
    entries = dataset_entries(datasets, "fewshot.datasets", ("dataset", "train_split", "test_split"),
                              "('oxford_iiit_pet', 'train', 'test') or 'digits,train,test'")
    return [FewshotTask(*fields) for fields in entries]


def validate(config: ml_collections.ConfigDict) -> list[FewshotTask]:
    """Check `config.fewshot` (shots, seeds, l2_reg, every_steps, datasets); returns the parsed tasks."""
    fewshot = config.fewshot
    tasks = parse_tasks(fewshot.datasets)
    if tasks and config.get("objective") == "masked_patch_prediction":
        raise ConfigError(f"config.fewshot.datasets={tuple(fewshot.datasets)!r} with objective="
                          "'masked_patch_prediction': few-shot evaluation reads the classifier's pre-logits "
                          "features, which a masked patch prediction model does not have; evaluate the checkpoint "
                          "with --mode=fewshot and a classification config of the same model instead")
    shots = fewshot.shots
    if (not isinstance(shots, (tuple, list)) or not shots
            or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shots)):
        raise ConfigError(f"config.fewshot.shots={shots!r} is invalid: expected a tuple of positive integers, "
                          "e.g. (1, 5, 10, 25)")
    if len(set(shots)) != len(shots):
        raise ConfigError(f"config.fewshot.shots={shots!r} is invalid: each shot count may appear once")
    if isinstance(fewshot.seeds, bool) or not isinstance(fewshot.seeds, int) or fewshot.seeds <= 0:
        raise ConfigError(f"config.fewshot.seeds={fewshot.seeds!r} is invalid: expected a positive integer")
    l2_reg = fewshot.l2_reg
    if isinstance(l2_reg, bool) or not isinstance(l2_reg, (int, float)) or not 0 < l2_reg < math.inf:  # and nan
        raise ConfigError(f"config.fewshot.l2_reg={fewshot.l2_reg!r} is invalid: expected a positive "
                          "regularisation strength (big_vision: 2**10)")
    every = fewshot.every_steps
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"config.fewshot.every_steps={every!r} is invalid: expected 0 (at the start and the end "
                          "of training only) or a positive step interval")
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# The regression.

@dataclasses.dataclass(frozen=True)
class RidgeCache:
    """What one draw's regressions share across l2 strengths: w(l2) = lhs diag(1 / (eigs + l2)) rhs."""

    mean: np.ndarray  # (1, D) of the drawn features
    std: np.ndarray  # (1, D), plus 1e-5
    eigs: np.ndarray  # (K,), K = min(N, D + 1)
    lhs: np.ndarray  # (D + 1, K)
    rhs: np.ndarray  # (K, C)


def _design(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    z = (np.asarray(x, np.float64) - mean) / std
    return np.pad(z, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)


def ridge_cache(x: np.ndarray, labels: np.ndarray, num_classes: int) -> RidgeCache:
    """Standardise `x` (N, D), append the bias feature, and eigendecompose the smaller Gram matrix.

    With Z the design matrix and Y the {-1, 1} targets, the ridge weights are (Z^T Z + l2 I)^-1 Z^T Y, or,
    equally, Z^T (Z Z^T + l2 I)^-1 Y: the second needs only an N x N problem when there are fewer examples
    than features (few shots of few classes).
    """
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + 1e-5
    z = _design(x, mean, std)
    y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
    if z.shape[0] >= z.shape[1]:
        eigs, q = np.linalg.eigh(z.T @ z)
        lhs, rhs = q, q.T @ (z.T @ y)
    else:
        eigs, q = np.linalg.eigh(z @ z.T)
        lhs, rhs = z.T @ q, q.T @ y
    return RidgeCache(mean=mean, std=std, eigs=eigs, lhs=lhs, rhs=rhs)


def ridge_weights(cache: RidgeCache, l2_reg: float) -> np.ndarray:
    """(D + 1, C) weights of the regression with strength `l2_reg` (the last row multiplies the bias feature)."""
    return (cache.lhs / (cache.eigs + l2_reg)) @ cache.rhs


def ridge_accuracy(cache: RidgeCache, x_test: np.ndarray, labels_test: np.ndarray, l2_reg: float) -> float:
    """Fraction of `x_test` whose highest regression output is its label."""
    scores = _design(x_test, cache.mean, cache.std) @ ridge_weights(cache, l2_reg)
    return float(np.mean(np.argmax(scores, axis=1) == np.asarray(labels_test)))


def draw_shots(labels: np.ndarray, num_classes: int, shots: int, seed: int, task: str = "") -> np.ndarray:
    """Indices of `shots` examples of each class, drawn without replacement (a fixed permutation per seed, so
    the 5 shots of a seed are among its 10). Too few examples of a class is a `FewshotError`, not fewer shots."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=num_classes)
    short = {c: int(n) for c, n in enumerate(counts) if n < shots}
    if short:
        listed = dict(list(short.items())[:10])
        more = f" and {len(short) - 10} more" if len(short) > 10 else ""
        raise FewshotError(f"few-shot {task or 'dataset'}: {shots} shot(s) need {shots} training image(s) of every "
                           f"class, but {len(short)} of the {num_classes} classes have fewer (class: images "
                           f"{listed}{more}); use fewer shots or a larger train split")
    picks = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in range(num_classes)]
    return np.concatenate(picks)


def evaluate_features(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_classes: int,
                      shots: Sequence[int], seeds: int, l2_reg: float, task: str = "") -> dict[int, float]:
    """Mean test accuracy over `seeds` draws for each shot count, from precomputed (features, labels)."""
    (x, y), (x_test, y_test) = train, test
    accuracies: dict[int, list[float]] = {n: [] for n in shots}
    for seed in range(seeds):
        for n in shots:
            picked = draw_shots(y, num_classes, n, seed, task)
            cache = ridge_cache(x[picked], y[picked], num_classes)
            accuracies[n].append(ridge_accuracy(cache, x_test, y_test, l2_reg))
    return {n: float(np.mean(values)) for n, values in accuracies.items()}


# ----------------------------------------------------------------------------------------------------------------
# Representations.

def make_representation_fn(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`represent(params, batch) -> (features, mask, classes, index)`, each gathered on every device.

    `batch` is an eval batch with "index"; `features` (batch, width) float32 are what the head sees (pooled,
    after `pre_logits` if the model has it); `classes` the argmax of the one-hot labels.
    """
    model = build_model(config.model, config.num_classes)

    def represent(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, ...]:
        _, state = model.apply({"params": params}, batch["image"], train=False, mutable=["intermediates"])
        features = state["intermediates"]["representation"][0].astype(jnp.float32)
        return features, batch["mask"], jnp.argmax(batch["label"], axis=-1), batch["index"]

    return jax.jit(represent, out_shardings=sharding.replicated(mesh),
                   compiler_options=xla_options.compiler_options(mesh.devices.flat))


def task_config(config: ml_collections.ConfigDict, task: FewshotTask) -> ml_collections.ConfigDict:
    """`config` reading `task`'s dataset: its test or train split as the eval split, its class count, single-label."""
    from vit_jax.data import datasets

    manual_dir = datasets.manual_dir_for(config, task.dataset)
    kind, num_classes = datasets.label_classes(task.dataset, config.tfds_data_dir, manual_dir)
    if kind != "single":
        raise FewshotError(f"few-shot dataset {task.dataset!r} has several labels per image: few-shot "
                           "regression needs one class per image")
    derived = copy.deepcopy(config)
    with derived.unlocked():
        derived.dataset, derived.tfds_manual_dir = task.dataset, manual_dir
        derived.train_split, derived.eval_split = task.train_split, task.test_split
        derived.num_classes, derived.label_kind = num_classes, "single"
    return derived


def check_datasets(config: ml_collections.ConfigDict) -> list[tuple[FewshotTask, ml_collections.ConfigDict]]:
    """Each few-shot dataset with its `task_config`, once its dataset and both splits are found (else a
    DatasetError that says how to prepare it) and they share no example: a training run checks before it writes
    anything."""
    from vit_jax import data
    from vit_jax.data import datasets
    from vit_jax.data.errors import for_entry

    configs = []
    for task in validate(config):
        entry = f"config.fewshot.datasets entry {','.join((task.dataset, task.train_split, task.test_split))!r}"
        try:
            derived = task_config(config, task)
            builder = datasets.load_builder(task.dataset, derived.tfds_data_dir, derived.tfds_manual_dir)
            datasets.dataset_info_from_builder(builder, task.dataset, derived.train_split, derived.eval_split,
                                               derived.num_classes, derived.label_kind)  # both splits, not empty
        except data.DatasetError as e:  # it names the run's own fields (config.train_split, ...): say the entry's
            raise for_entry(e, entry, {"dataset": "its dataset", "train_split": "its train split",
                                       "eval_split": "its test split"}) from None
        shared = datasets.shared_examples(builder, task.train_split, task.test_split)
        if shared:  # shots drawn from the images scored would report training accuracy
            raise FewshotError(f"{entry}: its train split {task.train_split!r} and test split {task.test_split!r} "
                               f"share {shared} example(s); shots must come from images the test does not score: "
                               "use disjoint splits or slices (e.g. 'train[:90%]' and 'train[90%:]')")
        configs.append((task, derived))
    return configs


def split_features(config: ml_collections.ConfigDict, represent: Callable, params: Any, mesh: Mesh, split: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of every decodable image of `split` of `config.dataset`, in one padded pass, in the
    split's order: whatever the process count and batch size, a seed draws the same images."""
    from vit_jax import data

    split_config = copy.deepcopy(config)
    with split_config.unlocked():
        split_config.eval_split = split
    features, labels, indices = [], [], []
    keys = ("image", "label", "mask", "index")
    for batch in data.make_eval_iterator(split_config, sharding.batch_sharding(mesh), keys=keys):
        rows, mask, classes, index = (np.asarray(a) for a in jax.device_get(represent(params, batch)))
        keep = mask > 0
        features.append(rows[keep])
        labels.append(classes[keep])
        indices.append(index[keep])
    order = np.argsort(np.concatenate(indices), kind="stable")
    features_array, labels_array = np.concatenate(features)[order], np.concatenate(labels)[order]
    if not len(labels_array):
        raise data.DatasetError(f"few-shot {config.dataset!r} split {split!r}: no image of it could be decoded "
                                "(each was skipped as corrupt, see the warnings above)")
    return features_array, labels_array


def check_finite_features(features: np.ndarray, task: FewshotTask, split: str) -> None:
    """Raise a FewshotError naming `task` and `split` if any of `features` is NaN or inf: the regression's
    eigendecomposition would otherwise fail with numpy's bare "Eigenvalues did not converge"."""
    bad_rows = int(np.sum(~np.all(np.isfinite(features), axis=1)))
    if bad_rows:
        raise FewshotError(f"few-shot {task.name} ({task.dataset}, split {split!r}): the model produced non-finite "
                           f"features (NaN or inf) for {bad_rows} of {len(features)} images; its parameters have "
                           "diverged or the weights are damaged, and few-shot regression needs finite features")


def evaluate(config: ml_collections.ConfigDict, params: Any, mesh: Mesh,
             represent: Callable | None = None) -> dict[str, float]:
    """{"<dataset>_<shots>shot": mean accuracy} for every few-shot dataset of `config` and shot count.

    `params` are the weights scored: callers pass the raw params, never their Polyak average (few-shot of the
    average is not implemented; the train loop and --mode=fewshot log that where a run keeps one).
    """
    fewshot = config.fewshot
    represent = represent or make_representation_fn(config, mesh)
    results: dict[str, float] = {}
    for task, task_cfg in check_datasets(config):
        train = split_features(task_cfg, represent, params, mesh, task.train_split)
        check_finite_features(train[0], task, task.train_split)  # before the test pass
        draw_shots(train[1], task_cfg.num_classes, max(fewshot.shots), 0, task.dataset)  # before the test pass
        test = split_features(task_cfg, represent, params, mesh, task.test_split)
        check_finite_features(test[0], task, task.test_split)
        logging.info("few-shot %s: %d train and %d test features of size %d", task.name, len(train[0]),
                     len(test[0]), train[0].shape[1])
        scores = evaluate_features(train, test, task_cfg.num_classes, tuple(fewshot.shots), fewshot.seeds,
                                   fewshot.l2_reg, task.dataset)
        results.update({f"{task.name}_{n}shot": accuracy for n, accuracy in scores.items()})
    return results
