"""The embedded digits dataset: built offline from scikit-learn, with the demo's splits, shapes and labels."""

import collections
import io

import numpy as np
import pytest
from PIL import Image

from configs import demo
from vit_jax import data
from vit_jax.data import datasets
from vit_jax.data.builders.digits import load_digits_uint8, split_indices


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _decoded(source):
    examples = [source[i] for i in range(len(source))]
    return [np.asarray(Image.open(io.BytesIO(e["image"]))) for e in examples], [int(e["label"]) for e in examples]


def test_digits_builds_offline_on_first_use_with_the_demo_splits(data_dir):
    builder = datasets.load_builder("digits", data_dir)  # nothing prepared yet: built here, no download
    assert str(builder.data_dir).startswith(data_dir)
    assert builder.info.file_format.value == "array_record"
    sklearn_images, sklearn_labels = load_digits_uint8()
    splits = split_indices(sklearn_labels)
    assert len(np.intersect1d(splits["train"], splits["test"])) == 0
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(1797))
    # Stratified: each class's share of the test split is its share of the whole, to within one digit.
    expected_counts = np.bincount(sklearn_labels, minlength=10) * 297 / 1797
    assert np.abs(np.bincount(sklearn_labels[splits["test"]], minlength=10) - expected_counts).max() <= 1
    for split, expected in (("train", splits["train"]), ("test", splits["test"])):
        source = datasets.LabeledSource(builder, split, "image", "label")
        images, labels = _decoded(source)
        assert len(images) == len(sklearn_images[expected])
        assert {image.shape for image in images} == {(8, 8)}
        assert {image.dtype for image in images} == {np.dtype(np.uint8)}
        assert set(labels) == set(range(10))
        # The same digits as scikit-learn's at those indices (TFDS stores them in its own order).
        ours = collections.Counter((image.tobytes(), label) for image, label in zip(images, labels))
        reference = collections.Counter((image.tobytes(), int(label)) for image, label in
                                        zip(sklearn_images[expected], sklearn_labels[expected]))
        assert ours == reference
    assert sklearn_images.max() == 255 and sklearn_images.min() == 0


def test_dataset_info_of_the_demo_config(data_dir):
    config = demo.get_config()
    config.tfds_data_dir = data_dir
    info = data.dataset_info(config)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes, info.label_kind) == (1500, 297, 10,
                                                                                                    "single")
    config.train_split = "train[:98%]"
    assert data.dataset_info(config).num_train_examples == 1470


def test_an_eval_split_that_shares_training_examples_is_warned_about(data_dir, caplog):
    import logging

    config = demo.get_config()
    config.tfds_data_dir = data_dir
    config.train_split, config.eval_split = "train[:95%]", "train[90%:]"
    with caplog.at_level(logging.WARNING):
        data.dataset_info(config)
        data.dataset_info(config, train=False)  # evaluating alone: nothing is trained on
    assert caplog.text.count("share") == 1
    assert ("config.eval_split='train[90%:]' and config.train_split='train[:95%]' of digits share 75 examples (of "
            "150 evaluated): the evaluation scores images the model trains on") in caplog.text
    caplog.clear()
    config.eval_split = "train[95%:]"
    with caplog.at_level(logging.WARNING):
        data.dataset_info(config)
    assert "share" not in caplog.text


def test_dataset_info_rejects_a_config_that_does_not_match_the_dataset(data_dir):
    config = demo.get_config()
    config.tfds_data_dir = data_dir
    config.num_classes = 1000
    with pytest.raises(data.DatasetError, match="config.num_classes=1000 but dataset 'digits' has 10 classes"):
        data.dataset_info(config)
    config.num_classes = 10
    config.eval_split = "validation"
    with pytest.raises(data.DatasetError, match=r"config.eval_split='validation' is not a split.*\['test', 'train'\]"):
        data.dataset_info(config)
    # A reversed slice counts -40 examples: it passed, and the first evaluation failed hours in.
    config.eval_split = "test[50:10]"
    with pytest.raises(data.DatasetError, match=r"config.eval_split='test\[50:10\]' of digits .* has no examples "
                                                r".* \(a slice's start comes before its end, and a percentage "
                                                r"of a small split rounds to whole examples\)"):
        data.dataset_info(config)
    config.eval_split = "test[99.9%:]"  # 540 examples: 99.9% rounds to all of them
    with pytest.raises(data.DatasetError, match=r"config.eval_split='test\[99.9%:\]' of digits .* has no examples"):
        data.dataset_info(config)


def test_prepare_refuses_stray_arguments(tmp_path):
    """An unquoted space (--manual_dir=~/my images) left 'images' behind in silence."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", "vit_jax.data.prepare", "--dataset=digits",
                             f"--data_dir={tmp_path}", "images"], cwd=root, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "VIT_JAX_HUGEPAGES": "0"})  # no huge-page re-exec
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: unexpected arguments ['images']")
    assert os.listdir(tmp_path) == []


def test_preparing_onto_a_full_disk_is_one_error_saying_so(tmp_path, monkeypatch):
    """TFDS reports a full disk as a RuntimeError naming the split (its wording, from a real prepare onto a full
    tmpfs): it was a traceback. A missing input (an OSError without those words) is not taken for one."""
    from vit_jax.data import datasets
    from vit_jax.data.builders.digits import Digits

    def full(self, **kwargs):
        raise RuntimeError('Failed to finalize writing of split "train": write() failed: No space left on device; '
                           "writing digits-train.array_record-00000-of-00001")

    monkeypatch.setattr(Digits, "download_and_prepare", full)
    with pytest.raises(data.DatasetError, match=r"^could not write digits into .*: No space left on device \(Failed to "
                                                r"finalize writing of split \"train\".*\); free space \(or fix "
                                                r"permissions\) and run again: python -m vit_jax.data.prepare "
                                                r"--dataset=digits"):
        datasets.prepare("digits", str(tmp_path))

    def missing(self, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "digits.csv")

    monkeypatch.setattr(Digits, "download_and_prepare", missing)
    with pytest.raises(FileNotFoundError):
        datasets.prepare("digits", str(tmp_path))


def test_a_dataset_path_that_cannot_be_checked_is_not_called_missing(tmp_path):
    """A path whose existence cannot be told (here a symlink loop; a directory without permission alike) is an
    error saying so, not "not prepared" followed by an attempt to build the dataset into it."""
    import os

    os.symlink(tmp_path / "digits", tmp_path / "digits")  # a link to itself
    with pytest.raises(data.DatasetError, match=r"digits/1\.1\.0/dataset_info\.json: cannot check whether it exists "
                                                r"\(Too many levels of symbolic links\)"):
        datasets.load_builder("digits", str(tmp_path))
