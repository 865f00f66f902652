"""Extra test sets scored at every evaluation (vit_jax/extra_evals.py): config parsing and checks, and a training
run that scores the eval split again (the same numbers as its own evaluation), two configs of one dataset and a
ReaL-like multi-label folder (the same numbers as --mode=eval of it). The same run, finished and started again
without its final_metrics.json, is the suite's test of a finished run scored again with everything on: its label
kind and numerics, its extra test sets, its Polyak average and its few-shot task."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.train_helpers import real_like_folder, tiny_config
from vit_jax import config_check, data, extra_evals, train
from vit_jax.data.builders.digits import NUM_TRAIN, _png_bytes, load_digits_uint8, split_indices


@pytest.mark.parametrize("entries, message", [
    (("digits,test,extra",), r"entry 'digits,test,extra' is invalid: expected \(dataset, split\)"),
    (("digits", "test"), r"config.extra_evals=\('digits', 'test'\) is invalid: it reads as two datasets; one "
                         r"\(dataset, split\) entry is written \(\('digits', 'test'\),\)"),
    (("digits,test", ("digits", "train")), r"each dataset may appear once"),
    (("cifar10_corrupted/fog_1,test", "cifar10_corrupted/fog_1:1.0.0,test"), r"each dataset may appear once"),
])
def test_bad_entries_are_config_errors(entries, message):
    config = tiny_config(extra_evals=entries)
    with pytest.raises(config_check.ConfigError, match=message):
        config_check.validate(config, 8)


def test_entries_parse_from_strings_and_tuples():
    parsed = extra_evals.parse(("imagenet2012_real, validation", ("imagenet_v2:3.0.0", "test"),
                                "imagenet2012_corrupted/fog_5:3.1.0,validation", "huggingface:beans,test"))
    assert [(e.name, e.dataset, e.split) for e in parsed] == [
        ("imagenet2012_real", "imagenet2012_real", "validation"), ("imagenet_v2", "imagenet_v2:3.0.0", "test"),
        ("imagenet2012_corrupted/fog_5", "imagenet2012_corrupted/fog_5:3.1.0", "validation"),
        ("huggingface:beans", "huggingface:beans", "test")]


def test_masked_patch_prediction_has_no_classes_to_score():
    config = tiny_config(extra_evals=("digits,test",))
    config.objective = "masked_patch_prediction"
    with pytest.raises(config_check.ConfigError, match=r"a masked patch prediction model does not predict"):
        extra_evals.validate(config)


def _config(tmp_path, extra, manual_dir="", **overrides):
    config = tiny_config(**{"dataset": "digits", "train_split": "train", "eval_split": "test",
                            "tfds_data_dir": str(tmp_path / "tfds"), "tfds_manual_dir": manual_dir,
                            "pp.inception_crop": False, "total_steps": 3, "optimizer.warmup_steps": 1,
                            "eval_batch_size": 128, "extra_evals": extra, **overrides})
    config_check.validate(config, 8)
    return config


class DigitsShifted(tfds.core.GeneratorBasedBuilder):
    """Digits' test split in one TFDS config per shift, rolled that many pixels to the right: a dataset of
    corrupted copies like cifar10_corrupted or imagenet2012_corrupted, built offline."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="roll_0"), tfds.core.BuilderConfig(name="roll_2")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10)}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        images, labels = load_digits_uint8()
        shift = int(self.builder_config.name.split("_")[1])
        for i in split_indices(labels)["test"]:
            yield int(i), {"image": _png_bytes(np.roll(images[i], shift, axis=1)), "label": int(labels[i])}


# The run's test sets: its eval split again, a ReaL-like folder, two configs of one dataset (corrupted copies).
EXTRA = ("digits,test", "image_folder,validation", "digits_shifted/roll_0,test", "digits_shifted/roll_2:1.0.0,test")
NAMES = {"digits": "test", "image_folder": "validation", "digits_shifted/roll_0": "test",
         "digits_shifted/roll_2": "test"}


def _scoring_flags(root, folder: str):
    """The run's data, test sets and few-shot task, and otherwise the default flags (softmax, tanh GELU, LayerNorm
    eps 1e-6, no Polyak average)."""
    return _config(root, EXTRA, folder, **{"fewshot.datasets": ("digits,train[:400],test[:100]",),
                                           "fewshot.shots": (2,), "fewshot.seeds": 1})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 3-step multi-label (sigmoid) run with exact GELU and LayerNorm eps 0.5, where the defaults are tanh and
    1e-6, a Polyak average and a few-shot task, scoring EXTRA: (root, folder, config, result, its stdout)."""
    root = tmp_path_factory.mktemp("extra_evals")
    _, digit = load_digits_uint8()
    # A quarter unlabelled, the rest with their digit and another one that also counts as right.
    rows = [(i, () if i % 4 == 0 else (int(digit[i]), int(digit[i] + 3) % 10))
            for i in range(NUM_TRAIN, NUM_TRAIN + 60)]
    folder = real_like_folder(root / "real_like", rows)
    data.prepare("image_folder", str(root / "tfds"), folder)
    for name in ("roll_0", "roll_2"):
        tfds.builder(f"digits_shifted/{name}", data_dir=str(root / "tfds"),
                     file_format="array_record").download_and_prepare()
    config = _scoring_flags(root, folder)
    config.label_kind, config.model.gelu_approximate, config.model.layernorm_epsilon = "multi", False, 0.5
    config.optimizer.ema_decay = 0.5
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = train.train_and_evaluate(config, str(root / "run"))
    return root, folder, config, result, out.getvalue()


def test_a_run_scores_its_extra_test_sets_at_each_evaluation(finished_run):
    """Its eval split scored again as an extra set gives its own numbers (same loss, same numerics), in the run and
    in a later --mode=eval under the default flags; each config of one TFDS dataset (cifar10_corrupted-style) is a
    test set of its own, named with its config (the unshifted one the eval split again, the shifted one scoring
    otherwise); a ReaL-like folder gives the numbers of --mode=eval on it."""
    root, folder, config, result, out = finished_run
    for name in NAMES:
        assert f"eval of {name} at step 3: " in out and f"eval of {name} (Polyak average) at step 3: " in out, out
    extra = result["extra_evals"]
    assert set(extra) == set(NAMES)
    for name in ("digits", "digits_shifted/roll_0"):
        assert extra[name]["top1"] == pytest.approx(result["test_accuracy"], abs=1e-9), name  # the eval split again
        assert extra[name]["loss"] == pytest.approx(result["test_loss"], rel=1e-6), name
    assert extra["digits_shifted/roll_2"]["loss"] != pytest.approx(result["test_loss"], rel=1e-5)  # other images
    assert json.loads((root / "run" / train.FINAL_METRICS).read_text())["extra_evals"] == extra

    # --mode=eval with the default numerics flags: the checkpoint's recorded ones apply to the extra set too.
    later = _config(root, ("digits,test",))
    later.label_kind = "multi"
    scores = train.evaluate_checkpoint(later, str(root / "run"))
    assert scores["loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    assert scores["digits/loss"] == pytest.approx(result["test_loss"], rel=1e-6)

    # --mode=eval of the folder itself (multi-label): the same numbers as the run's extra evaluation.
    direct = tiny_config(**{"dataset": "image_folder", "eval_split": "validation", "label_kind": "multi",
                            "tfds_data_dir": str(root / "tfds"), "tfds_manual_dir": folder,
                            "eval_batch_size": 128})
    again = train.evaluate_checkpoint(direct, str(root / "run"))
    for key in ("loss", "top1", "top5"):
        assert again[key] == pytest.approx(extra["image_folder"][key], rel=1e-6), key
    assert 0.0 <= extra["image_folder"]["top1"] <= extra["image_folder"]["top5"] <= 1.0


def test_a_finished_run_without_its_final_metrics_is_scored_again_as_it_was_trained(finished_run, tmp_path, capsys,
                                                                                     caplog):
    """Started again under the default flags, the finished run is scored as it was trained, not as the flags say:
    its sigmoid loss and numerics (eval split and each extra test set), its Polyak average (whatever the decay),
    its few-shot task (of the raw params, said so); each test set's line is printed once, final_metrics.json is
    written back, and nothing is trained or saved. Started again with the file, it reads the file back."""
    root, folder, _, result, _ = finished_run
    workdir = tmp_path / "run"
    shutil.copytree(root / "run", workdir)
    (workdir / train.FINAL_METRICS).unlink()
    steps_before = sorted(os.listdir(workdir / "checkpoints"))
    for source in ("scored", "read"):
        config = _scoring_flags(root, folder)
        assert (config.label_kind, config.model.gelu_approximate, config.model.layernorm_epsilon,
                config.optimizer.ema_decay) == ("single", True, 1e-6, 0.0)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            again = train.train_and_evaluate(config, str(workdir))
        out = capsys.readouterr().out
        assert "already holds the finished run" in out and "step 1/" not in out, out
        assert "few-shot at step 3: digits_2shot" in out, out
        lines = [line.split(":")[0] for line in out.splitlines()
                 if line.startswith("eval of ") and not line.startswith("eval of step")]
        if source == "scored":
            assert lines == ([f"eval of {name} on {split}" for name, split in NAMES.items()]
                             + [f"eval of {name} (Polyak average) on {split}" for name, split in NAMES.items()]), out
            assert "few-shot scores the raw params of step 3, not their Polyak average" in caplog.text
        else:
            assert lines == ([f"eval of {name}" for name in NAMES]
                             + [f"eval of {name} (Polyak average)" for name in NAMES]), out
        assert again["scored_with"]["label_kind"] == "multi", source  # and that is what the "read" pass reuses
        for scores, expected in ((again, result), (again["ema"], result["ema"])):
            assert scores["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6), source
            assert scores["test_accuracy"] == pytest.approx(expected["test_accuracy"], abs=1e-9), source
            for name in NAMES:
                assert scores["extra_evals"][name]["loss"] == pytest.approx(
                    expected["extra_evals"][name]["loss"], rel=1e-6), (source, name)
        assert again["fewshot"] == result["fewshot"], source
        stored = json.loads((workdir / train.FINAL_METRICS).read_text())
        assert (stored["test_loss"], stored["ema"], stored["fewshot"]) == (again["test_loss"], again["ema"],
                                                                           again["fewshot"])
        assert sorted(os.listdir(workdir / "checkpoints")) == steps_before
        assert not any(name.startswith("events.out.tfevents") for name in os.listdir(workdir)
                       if name not in os.listdir(root / "run")), os.listdir(workdir)


def test_a_multi_label_set_beside_a_softmax_run_is_configured_with_the_runs_label_kind(tmp_path):
    """ImageNet ReaL beside a softmax run: the set's eval config keeps the run's label kind "single" (the loss it is
    scored with is then softmax cross-entropy, where it used to be a sigmoid loss of the softmax logits). Only the
    derived config is checked here; the scores of a multi-label set are test_a_run_scores_its_extra_test_sets_..."""
    folder = real_like_folder(tmp_path / "real_like", [(NUM_TRAIN + i, (str(i % 10), str((i + 1) % 10)))
                                                       for i in range(6)])
    data.prepare("image_folder", str(tmp_path / "tfds"), folder)
    config = _config(tmp_path, ("image_folder,validation",), folder)
    assert config.label_kind == "single"
    derived = extra_evals.eval_configs(config)["image_folder"]
    assert (derived.dataset, derived.eval_split, derived.label_kind) == ("image_folder", "validation", "single")
    # An entry's split that is not there is named as the entry's: it read "config.eval_split='valid'", the run's
    # own field, which holds 'test'.
    config = _config(tmp_path, ("image_folder,valid",), folder)
    with pytest.raises(data.DatasetError, match=r"^config.extra_evals entry 'image_folder,valid': its split 'valid' "
                                                r"is not a split of image_folder"):
        extra_evals.eval_configs(config)


def test_an_extra_test_set_of_other_classes_stops_the_run_before_it_writes(tmp_path):
    folder = real_like_folder(tmp_path / "three", [(NUM_TRAIN + i, (str(i % 3),)) for i in range(6)], classes=3)
    data.prepare("image_folder", str(tmp_path / "tfds"), folder)
    config = _config(tmp_path, ("image_folder,validation",), folder)
    with pytest.raises(data.DatasetError, match=r"config.extra_evals entry 'image_folder,validation': dataset "
                                                r"'image_folder' has 3 classes and the model 10"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    np.testing.assert_equal(len(os.listdir(folder)), 6 + 2)  # the folder is left as it was


