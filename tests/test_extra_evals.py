"""Extra test sets scored at every evaluation (vit_jax/extra_evals.py): config parsing and checks, and a training
run that scores the eval split again (the same numbers as its own evaluation) and a ReaL-like multi-label folder
(the same numbers as --mode=eval of it)."""

from __future__ import annotations

import json
import os

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


def _config(tmp_path, extra, manual_dir=""):
    config = tiny_config(**{"dataset": "digits", "train_split": "train", "eval_split": "test",
                            "tfds_data_dir": str(tmp_path / "tfds"), "tfds_manual_dir": manual_dir,
                            "pp.inception_crop": False, "total_steps": 3, "optimizer.warmup_steps": 1,
                            "eval_batch_size": 128, "extra_evals": extra})
    config_check.validate(config, 8)
    return config


def test_a_run_scores_its_extra_test_sets_at_each_evaluation(tmp_path, capsys):
    """A multi-label (sigmoid) run with exact GELU and LayerNorm eps 0.5, where the defaults are tanh and 1e-6:
    its eval split scored again as an extra set gives its own numbers (same loss, same numerics), in the run and
    in a later --mode=eval under the default flags; a ReaL-like folder gives the numbers of --mode=eval on it."""
    _, digit = load_digits_uint8()
    # A quarter unlabelled, the rest with their digit and another one that also counts as right.
    rows = [(i, () if i % 4 == 0 else (int(digit[i]), int(digit[i] + 3) % 10))
            for i in range(NUM_TRAIN, NUM_TRAIN + 60)]
    folder = real_like_folder(tmp_path / "real_like", rows)
    data.prepare("image_folder", str(tmp_path / "tfds"), folder)
    config = _config(tmp_path, ("digits,test", "image_folder,validation"), folder)
    config.label_kind, config.model.gelu_approximate, config.model.layernorm_epsilon = "multi", False, 0.5
    result = train.train_and_evaluate(config, str(tmp_path / "run"))

    out = capsys.readouterr().out
    assert "eval of digits at step 3: " in out and "eval of image_folder at step 3: " in out, out
    extra = result["extra_evals"]
    assert set(extra) == {"digits", "image_folder"}
    assert extra["digits"]["top1"] == pytest.approx(result["test_accuracy"], abs=1e-9)  # the eval split again
    assert extra["digits"]["loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    assert json.loads((tmp_path / "run" / train.FINAL_METRICS).read_text())["extra_evals"] == extra

    # The finished run started again: scored anew without its final_metrics.json, read back with it; each test
    # set's line printed once either way.
    (tmp_path / "run" / train.FINAL_METRICS).unlink()
    for source in ("scored", "read"):
        again = train.train_and_evaluate(config, str(tmp_path / "run"))
        out = capsys.readouterr().out
        assert "already holds the finished run" in out, out
        lines = [line.split(":")[0] for line in out.splitlines()
                 if line.startswith("eval of ") and not line.startswith("eval of step")]
        assert lines == (["eval of digits on test", "eval of image_folder on validation"] if source == "scored"
                         else ["eval of digits", "eval of image_folder"]), (source, out)
        assert again["extra_evals"]["digits"]["loss"] == pytest.approx(extra["digits"]["loss"], rel=1e-6), source

    # --mode=eval with the default numerics flags: the checkpoint's recorded ones apply to the extra set too.
    later = _config(tmp_path, ("digits,test",))
    later.label_kind = "multi"
    scores = train.evaluate_checkpoint(later, str(tmp_path / "run"))
    assert scores["loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    assert scores["digits/loss"] == pytest.approx(result["test_loss"], rel=1e-6)

    # --mode=eval of the folder itself (multi-label): the same numbers as the run's extra evaluation.
    direct = tiny_config(**{"dataset": "image_folder", "eval_split": "validation", "label_kind": "multi",
                            "tfds_data_dir": str(tmp_path / "tfds"), "tfds_manual_dir": folder,
                            "eval_batch_size": 128})
    again = train.evaluate_checkpoint(direct, str(tmp_path / "run"))
    for key in ("loss", "top1", "top5"):
        assert again[key] == pytest.approx(extra["image_folder"][key], rel=1e-6), key
    assert 0.0 <= extra["image_folder"]["top1"] <= extra["image_folder"]["top5"] <= 1.0


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


def test_an_extra_test_set_of_other_classes_stops_the_run_before_it_writes(tmp_path):
    folder = real_like_folder(tmp_path / "three", [(NUM_TRAIN + i, (str(i % 3),)) for i in range(6)], classes=3)
    data.prepare("image_folder", str(tmp_path / "tfds"), folder)
    config = _config(tmp_path, ("image_folder,validation",), folder)
    with pytest.raises(data.DatasetError, match=r"config.extra_evals entry 'image_folder,validation': dataset "
                                                r"'image_folder' has 3 classes and the model 10"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    np.testing.assert_equal(len(os.listdir(folder)), 6 + 2)  # the folder is left as it was


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


def test_each_config_of_one_dataset_is_a_test_set_of_its_own(tmp_path):
    """cifar10_corrupted-style: two configs of one TFDS dataset scored side by side, named with their config; the
    unshifted one is the run's own eval split again (the same numbers), the shifted one scores otherwise."""
    for name in ("roll_0", "roll_2"):
        tfds.builder(f"digits_shifted/{name}", data_dir=str(tmp_path / "tfds"),
                     file_format="array_record").download_and_prepare()
    config = _config(tmp_path, ("digits_shifted/roll_0,test", "digits_shifted/roll_2:1.0.0,test"))
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    extra = result["extra_evals"]
    assert set(extra) == {"digits_shifted/roll_0", "digits_shifted/roll_2"}
    assert extra["digits_shifted/roll_0"]["top1"] == pytest.approx(result["test_accuracy"], abs=1e-9)
    assert extra["digits_shifted/roll_0"]["loss"] == pytest.approx(result["test_loss"], rel=1e-6)
    assert extra["digits_shifted/roll_2"]["loss"] != pytest.approx(result["test_loss"], rel=1e-5)  # other images
