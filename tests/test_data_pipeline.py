"""The grain pipeline on digits: global sharded batches, per-process shares, resumable state, padded eval, errors."""

import json
import logging

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorflow_datasets.core.dataset_builders import huggingface_dataset_builder

from configs import demo
from vit_jax import data
from vit_jax.data import pipeline
from vit_jax.data.builders.digits import _png_bytes, load_digits_uint8


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    config = demo.get_config()
    config.tfds_data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.dataset_info(config)  # builds digits once for the module
    return config


@pytest.fixture(scope="module")
def sharding():
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    return NamedSharding(mesh, P(("data", "fsdp")))


def test_train_batches_are_global_sharded_arrays_in_range(config, sharding):
    iterator = data.make_train_iterator(config, sharding)
    batch = next(iterator)
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (64, 16, 16, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (64, 10) and batch["label"].dtype == np.float32
    assert batch["image"].sharding == sharding and len(batch["image"].addressable_shards) == 8
    images = np.asarray(batch["image"])
    assert images.min() == -1.0 and images.max() <= 1.0 and np.isfinite(images).all()
    np.testing.assert_array_equal(np.asarray(batch["label"]).sum(axis=1), 1.0)
    iterator.close()


def _first_epoch_indices(config, process_index, process_count, share_size):
    dataset, _ = pipeline.make_train_dataset(config, process_index=process_index, process_count=process_count)
    indices = []
    for batch in dataset:
        indices.extend(int(i) for i in batch["index"])
        if len(indices) >= share_size:
            return indices[:share_size]


def _reference(config, split, indices):
    """Examples `indices` of `split` preprocessed without the code under test: the records read through TFDS's
    own data source, PNGs decoded by TensorFlow, resized as the default pipeline (tf.image.resize bilinear,
    antialias=False) and scaled to [-1, 1] in float64; with their one-hot labels."""
    import glob
    import os

    import tensorflow as tf
    import tensorflow_datasets as tfds

    (info,) = glob.glob(os.path.join(config.tfds_data_dir, "digits", "*", "dataset_info.json"))
    source = tfds.builder_from_directory(os.path.dirname(info)).as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()})
    examples = [source[int(i)] for i in indices]
    pixels = tf.stack([tf.io.decode_png(e["image"], channels=3) for e in examples])
    size = (config.image_size, config.image_size)
    images = tf.image.resize(pixels, size, method="bilinear", antialias=False).numpy().astype(np.float64)
    labels = np.eye(config.num_classes)[[int(e["label"]) for e in examples]]
    return images / 127.5 - 1.0, labels


def _unaugmented(config, mixup_alpha=0.0):
    config = config.copy_and_resolve_references()
    config.pp.inception_crop, config.pp.flip, config.pp.random_translate = False, False, 0
    config.pp.randaugment_layers, config.pp.mixup_alpha = 0, mixup_alpha
    return config


def test_train_rows_are_their_source_examples_preprocessed_as_tensorflow(config, sharding):
    """Without crop, flip, shift and RandAugment, row r of a global batch is the example the host stream's
    `index` r names (decoded, resized to 16x16 as TF's bilinear, in [-1, 1]) with its one-hot label."""
    config = _unaugmented(config)
    indices = next(iter(pipeline.make_train_dataset(config, process_index=0, process_count=1)[0]))["index"]
    assert sorted(indices) != list(indices) and len(set(indices)) == 64  # shuffled: the row order matters
    iterator = data.make_train_iterator(config, sharding)
    batch = next(iterator)
    iterator.close()
    images, labels = _reference(config, "train", indices)
    np.testing.assert_allclose(np.asarray(batch["image"]), images, rtol=0, atol=1 / 127.5)
    np.testing.assert_array_equal(np.asarray(batch["label"]), labels)
    assert np.abs(images - images[np.roll(np.arange(64), 1)]).max() > 1  # rows one off would not pass


def test_eval_rows_are_the_split_in_order_preprocessed_as_tensorflow(config, sharding):
    batches = list(data.make_eval_iterator(config, sharding))
    real = np.concatenate([np.asarray(b["mask"]) for b in batches]) > 0
    got_images = np.concatenate([np.asarray(b["image"]) for b in batches])[real]
    got_labels = np.concatenate([np.asarray(b["label"]) for b in batches])[real]
    images, labels = _reference(config, "test", range(297))
    np.testing.assert_allclose(got_images, images, rtol=0, atol=1 / 127.5)
    np.testing.assert_array_equal(got_labels, labels)


def test_mixup_mixes_each_row_with_the_previous_one_by_one_weight_for_images_and_labels(config):
    """MixupBatch mixes the batch with itself rolled by one: row r = lam * row r + (1 - lam) * row r-1 (row 0
    with the last), one lam per batch. lam is read off the label rows and off the images separately."""
    mixed = next(iter(pipeline.make_train_dataset(_unaugmented(config, 1.0), process_index=0, process_count=1)[0]))
    plain = next(iter(pipeline.make_train_dataset(_unaugmented(config), process_index=0, process_count=1)[0]))
    np.testing.assert_array_equal(mixed["index"], plain["index"])  # mixup draws from a stream of its own
    source_images, source_labels = _reference(config, "train", plain["index"])
    images = plain["image"].astype(np.float64) / 127.5 - 1.0  # the un-mixed batch of the same seed
    np.testing.assert_allclose(images, source_images, rtol=0, atol=1 / 127.5)
    classes = source_labels.argmax(-1)
    previous = np.roll(np.arange(64), 1)

    label = mixed["label"].astype(np.float64)
    np.testing.assert_allclose(label.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    differ = classes != classes[previous]
    assert differ.sum() > 40 and (label[differ].max(axis=1) < 1 - 1e-3).all()  # no longer one-hot
    lams = label[differ, classes[differ]]
    np.testing.assert_allclose(label[differ, classes[previous][differ]], 1.0 - lams, rtol=0, atol=1e-6)
    lam = lams.mean()
    np.testing.assert_allclose(lams, lam, rtol=0, atol=1e-6)  # one weight for the batch
    assert 0.02 < lam < 0.98, lam  # far enough from 0 and 1 for the image check to tell the rows apart
    np.testing.assert_allclose(label, lam * source_labels + (1 - lam) * source_labels[previous], rtol=0, atol=1e-6)

    difference = images - images[previous]
    lam_of_images = np.sum((mixed["image"] - images[previous]) * difference) / np.sum(difference**2)
    np.testing.assert_allclose(lam_of_images, lam, rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed["image"], lam * images + (1 - lam) * images[previous], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mixed["image"], lam * source_images + (1 - lam) * source_images[previous], rtol=0,
                               atol=1 / 127.5)


def _mixup_weights(config, process_index, process_count, batches=3):
    """The mixup weight of each of the first `batches` batches of a process, read off its labels."""
    mixed, _ = pipeline.make_train_dataset(_unaugmented(config, 1.0), process_index=process_index,
                                           process_count=process_count)
    weights = []
    for batch, _ in zip(mixed, range(batches)):
        label = batch["label"].astype(np.float64)
        classes = np.argmax(np.eye(config.num_classes)[_reference_labels(config, batch["index"])], axis=-1)
        differ = classes != np.roll(classes, 1)
        weights.append(float(label[differ, classes[differ]].mean()))
    return weights


def _reference_labels(config, indices):
    import glob
    import os

    import tensorflow_datasets as tfds

    (info,) = glob.glob(os.path.join(config.tfds_data_dir, "digits", "*", "dataset_info.json"))
    source = tfds.builder_from_directory(os.path.dirname(info)).as_data_source(split="train")
    return [int(source[int(i)]["label"]) for i in indices]


def test_mixup_draws_one_weight_per_step_for_every_process(config):
    """Two processes mix their (different) rows with the same weight at each step, the weights of a one-process
    run: one lam per global batch, as big_vision draws it inside the train step."""
    one = _mixup_weights(config, 0, 1)
    assert len(set(np.round(one, 6))) == 3  # a new weight each step
    np.testing.assert_allclose(_mixup_weights(config, 0, 2), one, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_mixup_weights(config, 1, 2), one, rtol=0, atol=1e-6)


def test_two_processes_read_disjoint_shares_whose_union_is_the_split(config):
    shares = [_first_epoch_indices(config, p, 2, 750) for p in (0, 1)]
    assert all(len(set(share)) == 750 for share in shares)  # one epoch of a share: no repeats
    assert not set(shares[0]) & set(shares[1])
    assert set(shares[0]) | set(shares[1]) == set(range(1500))
    assert shares[0] != sorted(shares[0])  # shuffled


def test_restored_iterator_continues_on_exactly_the_next_batches(config, sharding):
    config = config.copy_and_resolve_references()
    config.pp.inception_crop = True
    config.pp.flip = True
    config.pp.randaugment_layers = 2
    config.pp.mixup_alpha = 0.2
    uninterrupted = data.make_train_iterator(config, sharding)
    for _ in range(3):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # goes into the checkpoint as JSON
    expected = [next(uninterrupted) for _ in range(4)]  # crosses no epoch yet; includes prefetched batches

    resumed = data.make_train_iterator(config, sharding)
    next(resumed)  # a different position, overwritten by set_state
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
        np.testing.assert_array_equal(np.asarray(got["label"]), np.asarray(want["label"]))
    assert not np.array_equal(np.asarray(expected[0]["image"]), np.asarray(expected[1]["image"]))
    for iterator in (uninterrupted, resumed):
        iterator.close()


def test_restoring_state_made_with_other_settings_is_an_error(config, sharding):
    iterator = data.make_train_iterator(config, sharding)
    state = iterator.get_state()
    other = config.copy_and_resolve_references()
    other.batch_size = 32
    with pytest.raises(data.DatasetError, match=r"'batch_size': \(64, 32\)}; resume with the run's own settings "
                                                r"\(config.batch_size=64\), or start a new run from its weights: "
                                                r"another --workdir with --config.pretrained set to this one$"):
        data.make_train_iterator(other, sharding).set_state(state)
    mixing = config.copy_and_resolve_references()
    mixing.pp.mixup_alpha = 0.2  # a pipeline step of its own: its state has another shape
    with pytest.raises(data.DatasetError, match=r"'mixup': \(False, True\)}; .*\(config.pp.mixup_alpha=0\)"):
        data.make_train_iterator(mixing, sharding).set_state(state)
    with pytest.raises(data.DatasetError, match=r"its saved state does not fit this input pipeline \(KeyError"):
        data.make_train_iterator(config, sharding).set_state({**state, "grain": {"parent": {}}})
    iterator.close()


def test_a_state_of_another_pipeline_version_restarts_the_stream(config, sharding):
    """An upgrade mid-run: the old positions name other examples, so the stream starts afresh (not an error)."""
    iterator = data.make_train_iterator(config, sharding)
    first = next(iterator)
    next(iterator)
    state = iterator.get_state()
    old = {**state, "version": pipeline.STATE_VERSION - 1}
    for key in ("mixup", "batches", "restart_step", "split_size", "grain_version"):  # keys that version did not write
        old.pop(key)
    restarted = data.make_train_iterator(config, sharding)
    assert restarted.set_state(old) is False
    np.testing.assert_array_equal(np.asarray(next(restarted)["image"]), np.asarray(first["image"]))
    # A state that says how many batches were taken (2): the restarted stream is not the first one again.
    newer = data.make_train_iterator(config, sharding)
    assert newer.set_state({**state, "version": pipeline.STATE_VERSION + 1}) is False
    assert not np.array_equal(np.asarray(next(newer)["image"]), np.asarray(first["image"]))
    assert newer.get_state()["batches"] == 3
    for each in (iterator, restarted, newer):
        each.close()


def test_each_shuffle_seed_has_its_own_epochs(config):
    """grain shuffles epoch e with seed + e: seeds s and s + 1 must not share epochs, one epoch apart."""
    size = len(pipeline.open_split(config, config.train_split)[0])

    def epochs(seed: int) -> list[list[int]]:
        seeded = config.copy_and_resolve_references()
        seeded.shuffle_seed = seed
        stream = iter(pipeline.make_train_dataset(seeded, process_index=0, process_count=1)[0])
        order = []
        while len(order) < 2 * size:
            order += next(stream)["index"].tolist()
        return [order[:size], order[size:2 * size]]

    first, second = epochs(0), epochs(1)
    for epoch in first + second:
        assert sorted(epoch) == list(range(size))  # each epoch is a permutation of the split
    assert first[0] != first[1] and first[1] != second[0] and first[0] != second[0]


def test_eval_sees_every_example_once_with_padding_masked(config, sharding):
    batches = list(data.make_eval_iterator(config, sharding))
    assert len(batches) == 3  # ceil(297 / 128)
    masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
    assert masks.sum() == 297 and masks.shape == (384,) and (masks[297:] == 0).all()
    assert all(b["image"].shape == (128, 16, 16, 3) and b["image"].sharding == sharding for b in batches)
    # Every process yields as many batches, and together they see each example once.
    seen = []
    for process in (0, 1):
        local = list(pipeline.eval_batches(config, process_index=process, process_count=2))
        assert len(local) == 3 and all(len(b["mask"]) == 64 for b in local)
        seen += [int(i) for b in local for i, m in zip(b["index"], b["mask"]) if m]
    assert sorted(seen) == list(range(297))
    # Deterministic: a second pass gives the same images.
    again = list(data.make_eval_iterator(config, sharding))
    np.testing.assert_array_equal(np.asarray(again[1]["image"]), np.asarray(batches[1]["image"]))


def test_a_process_without_eval_examples_still_yields_its_padding_batches(config):
    """297 test digits over 400 processes: process 350's share is empty, but it must join every eval step with
    batches of the same shapes and dtypes as a process with examples (a raise there would hang the others)."""
    config = config.copy_and_resolve_references()
    config.eval_batch_size = 400
    empty = list(pipeline.eval_batches(config, process_index=350, process_count=400))
    full = list(pipeline.eval_batches(config, process_index=0, process_count=400))
    assert len(empty) == len(full) == 1 and full[0]["mask"].tolist() == [1.0] and empty[0]["mask"].tolist() == [0.0]
    for key, value in full[0].items():
        assert (empty[0][key].shape, empty[0][key].dtype) == (value.shape, value.dtype), key
        assert not empty[0][key].any()


def test_worker_processes_give_a_resumable_stream(config, sharding):
    config = config.copy_and_resolve_references()
    config.data_workers = 2
    iterator = data.make_train_iterator(config, sharding)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = np.asarray(next(iterator)["image"])
    iterator.close()
    resumed = data.make_train_iterator(config, sharding)
    resumed.set_state(state)
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), expected)
    resumed.close()


def _rows(batches):
    """The image rows of `batches` as a sorted list: which (augmented) examples they hold, in any order."""
    return sorted(row.tobytes() for batch in batches for row in np.asarray(batch["image"]))


def test_a_position_saved_for_another_split_length_or_grain_restarts_the_stream_with_a_warning(
        config, sharding, caplog):
    """A split re-prepared with more examples, or another grain, shuffles otherwise: the saved position would
    repeat some examples and skip others. The restart mixes its step into the seeds (not steps 1..n again)."""
    iterator = data.make_train_iterator(config, sharding)
    first = next(iterator)
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    continued = next(iterator)
    size = state["split_size"]
    for key, saved, message in (("split_size", size - 10, f"{size - 10} examples in config.train_split (now {size})"),
                                ("grain_version", "0.1.0", "grain '0.1.0' (now ")):
        resumed = data.make_train_iterator(config, sharding)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert resumed.set_state({**state, key: saved}) is True
        assert message in caplog.text and "the data order restarts at step 2" in caplog.text
        batch = np.asarray(next(resumed)["image"])
        assert not np.array_equal(batch, np.asarray(continued["image"]))  # not the saved position
        assert not np.array_equal(batch, np.asarray(first["image"]))  # nor the first run's stream again
        assert resumed.get_state()["batches"] == 3 and resumed.get_state()["restart_step"] == 2
        resumed.close()
    # A checkpoint written before these keys were saved resumes exactly, as it did.
    older = {key: value for key, value in state.items() if key not in ("split_size", "grain_version", "batches",
                                                                        "restart_step")}
    resumed = data.make_train_iterator(config, sharding)
    assert resumed.set_state(older) is True
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), np.asarray(continued["image"]))
    assert resumed.get_state()["batches"] == 3  # estimated from the positions read
    for each in (iterator, resumed):
        each.close()


def test_a_restarted_stream_resumes_exactly_from_its_own_checkpoints(config, sharding):
    """After a restart at step 5 the positions are of the step-5 stream: a later resume must rebuild it."""
    iterator = data.make_train_iterator(config, sharding)
    iterator.restart(5, "was written by a different number of processes")
    next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = np.asarray(next(iterator)["image"])
    resumed = data.make_train_iterator(config, sharding)
    assert resumed.set_state(state) is True
    assert resumed.stream() == [5, 6]  # what the processes compare (train._agree_on_stream): same stream, same step
    np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), expected)
    for each in (iterator, resumed):
        each.close()


def test_another_data_workers_resumes_where_the_position_exists_and_restarts_where_not(config, sharding, caplog):
    """data_workers is a speed setting: a run moved to a machine with more cores resumes. W workers read the
    stream round-robin a batch each, so after a multiple of W steps the position is exact for any count."""
    uninterrupted = data.make_train_iterator(config, sharding)
    for _ in range(2):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = [next(uninterrupted) for _ in range(2)]
    uninterrupted.close()
    workers = config.copy_and_resolve_references()
    workers.data_workers = 2
    resumed = data.make_train_iterator(workers, sharding)
    assert resumed.set_state(state) is True
    got = [next(resumed) for _ in range(2)]
    assert _rows(got) == _rows(expected)  # exactly the examples (and augmentations) not seen yet
    next(resumed)
    odd = json.loads(json.dumps(resumed.get_state()))  # 5 batches: worker 0 is a batch ahead of worker 1
    resumed.close()
    back = data.make_train_iterator(config, sharding)
    with caplog.at_level(logging.WARNING):
        assert back.set_state(odd) is True  # it raised DatasetError
    assert "was saved with config.data_workers=2 after step 5" in caplog.text
    assert "the data order restarts at step 5" in caplog.text
    assert back.get_state()["batches"] == 5
    back.close()


def test_worker_positions_map_to_another_worker_count_only_as_a_prefix_of_the_stream():
    """grain's worker states: each worker's next position in its slice (i, i + W, ...) and next mixup draw."""
    def state(leaves):
        return {"next_index_in_cycle": 0, "next_index_in_datasets": len(leaves),
                "iterators_in_use_indices": list(range(len(leaves))), "iterators_in_use_states": leaves,
                "exhausted": [0] * len(leaves), "future_states": {}}

    def leaf(position, draw):
        return {"parent": {"next_index": position}, "index_for_rng": draw}

    template = state([leaf(0, 0)] * 3)
    # 2 workers, 4 batches of 2 rows: positions 0..7 read, draws 0..3 made.
    mapped = pipeline._remap_workers(state([leaf(4, 2), leaf(4, 2)]), 2, template, 3, 4)
    assert mapped["iterators_in_use_states"] == [leaf(3, 2), leaf(3, 1), leaf(2, 1)]
    assert mapped["next_index_in_cycle"] == 1  # batch 4 is worker 1's draw 1 (1 + 3 * 1)
    assert pipeline._remap_workers(state([leaf(4, 2), leaf(4, 2)]), 2, leaf(0, 0), 0, 4) == leaf(8, 4)
    assert pipeline._remap_workers(leaf(8, 4), 0, template, 3, 4) == mapped
    # 3 batches: worker 0 read positions 0, 2, 4, 6 and worker 1 only 1, 3 (5 is unread): no other count continues.
    assert pipeline._remap_workers(state([leaf(4, 2), leaf(2, 1)]), 2, template, 3, 3) is None


class DigitsWithMask(tfds.core.GeneratorBasedBuilder):
    """A few digits with a second image, as oxford_iiit_pet's segmentation mask, built offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "segmentation_mask": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10), "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        images, labels = load_digits_uint8()
        for i in range(6):
            yield i, {"image": _png_bytes(images[i]), "segmentation_mask": _png_bytes((images[i] > 8).astype(np.uint8)),
                      "label": int(labels[i]), "file_name": f"{i}.png"}


def test_reading_an_example_decodes_none_of_its_images(tmp_path, monkeypatch):
    """The model's image is decoded by the pipeline (pillow); an example's other images are never decoded."""
    tfds.builder("digits_with_mask", data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = demo.get_config()
    config.dataset, config.tfds_data_dir, config.eval_split = "digits_with_mask", str(tmp_path), "train"
    decoded = []
    monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                        lambda self, example, **kwargs: decoded.append(example))
    source, _ = pipeline.open_split(config, "train")
    example = source[3]
    assert decoded == []
    assert isinstance(example["image"], bytes) and int(example["label"]) == int(load_digits_uint8()[1][3])


@pytest.mark.parametrize("name, extra", [("cifar10", ""), ("imagenet2012", " --manual_dir=/path/to/downloads")])
def test_a_missing_dataset_says_where_it_looked_and_how_to_prepare_it(tmp_path, sharding, name, extra):
    config = demo.get_config()
    config.dataset = name
    config.tfds_data_dir = str(tmp_path)
    with pytest.raises(data.DatasetError) as error:
        data.make_train_iterator(config, sharding)
    message = str(error.value)
    assert f"looked for {tmp_path}/{name}/" in message
    assert f"python -m vit_jax.data.prepare --dataset={name} --data_dir={tmp_path}{extra}" in message


def test_our_dataset_prepared_as_tfrecord_names_the_format_and_the_prepare_command(config, tmp_path, sharding):
    """Only digits' metadata, its dataset_info.json saying fileFormat tfrecord (what `tfds build` writes by
    default): no record file is needed for the check, and none is read."""
    import glob
    import os
    import shutil

    (info,) = glob.glob(os.path.join(config.tfds_data_dir, "digits", "*", "dataset_info.json"))
    target = tmp_path / "digits" / os.path.basename(os.path.dirname(info))
    target.mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(info), "features.json"), target)
    metadata = json.loads(open(info).read())
    assert metadata["fileFormat"] == "array_record"
    (target / "dataset_info.json").write_text(json.dumps({**metadata, "fileFormat": "tfrecord"}))
    tfrecord = config.copy_and_resolve_references()
    tfrecord.tfds_data_dir = str(tmp_path)
    for call in (lambda: data.dataset_info(tfrecord), lambda: data.make_train_iterator(tfrecord, sharding)):
        with pytest.raises(data.DatasetError) as error:
            call()
        assert str(error.value) == (f"dataset 'digits' at {target} was prepared as tfrecord, but grain reads "
                                    f"array_record; remove that directory (or choose another data_dir) and prepare "
                                    f"it again with: python -m vit_jax.data.prepare --dataset=digits "
                                    f"--data_dir={tmp_path}")
    from vit_jax.data import datasets

    with pytest.raises(data.DatasetError) as error:  # preparing over it: the same advice, not TFDS's ValueError
        datasets.prepare("digits", str(tmp_path))
    assert str(error.value).startswith(f"dataset 'digits' at {target} was prepared as tfrecord, but grain reads")


def test_a_tfds_dataset_prepared_as_tfrecord_names_the_format_and_the_prepare_command(tmp_path):
    """cifar10 as `tfds build` leaves it by default: TFRecord. Only its metadata is written (TFDS's own
    DatasetInfo, no download, no records)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=str(tmp_path), file_format="tfrecord")
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
    config = demo.get_config()
    config.dataset, config.num_classes, config.image_size = "cifar10", 10, 32
    config.tfds_data_dir = str(tmp_path)
    with pytest.raises(data.DatasetError) as error:
        data.dataset_info(config)
    assert f"dataset 'cifar10' at {builder.data_dir} was prepared as tfrecord, but grain reads array_record" in str(
        error.value)
    assert f"python -m vit_jax.data.prepare --dataset=cifar10 --data_dir={tmp_path}" in str(error.value)


def test_an_unknown_dataset_name_suggests_the_close_ones(tmp_path):
    config = demo.get_config()
    config.dataset = "cifar11"
    config.tfds_data_dir = str(tmp_path)
    with pytest.raises(data.DatasetError, match=r"'cifar11' is neither a TFDS dataset.*did you mean .*'cifar10'"):
        data.dataset_info(config)
    config.dataset = "digits:1.0.0"  # ours take no version: it was "neither a TFDS dataset nor one of ours ['digits'"
    with pytest.raises(data.DatasetError, match=r"^config.dataset='digits:1.0.0': 'digits' is one of our datasets, "
                                                r"which take no version or config; use config.dataset='digits'$"):
        data.dataset_info(config)
    config.dataset = str(tmp_path)  # the data dir given as the dataset
    with pytest.raises(data.DatasetError, match=r"is not a dataset name .*a directory of prepared datasets is "
                                                r"config.tfds_data_dir"):
        data.dataset_info(config)


@pytest.mark.parametrize("dataset, message", [
    ("cifar10/fog_5", r"config.dataset='cifar10/fog_5': TFDS dataset 'cifar10' has no config 'fog_5' \(it has "
                      r"none: write 'cifar10'\)"),
    ("cifar10_corrupted/fog_9", r"has no config 'fog_9' \(its configs: \[.*'fog_5'.*\], written "
                                r"'cifar10_corrupted/<config>'\)"),
    ("cifar10:9.9.9", r"config.dataset='cifar10:9.9.9': TFDS dataset 'cifar10' has no version '9.9.9' \(its "
                      r"versions: \['3.0.2'\]; or leave the version out for the latest\)"),
    ("cifar10:1.0", r"config.dataset='cifar10:1.0': '1.0' is not a version: write x.y.z, each a number or \* "
                    r"\('cifar10' has \['3.0.2'\]\)"),
    ("eurosat/rgb:9.9.9", r"'eurosat' has no version '9.9.9' \(its versions: \['2.0.0'\]"),  # the config's own
    # Names TFDS cannot parse were its own traceback (exit 1), a key=value config a TypeError.
    ("cifar-10", r"config.dataset='cifar-10' is not a dataset name of the form name\[/config\]\[:x.y.z\]; did you "
                 r"mean \['cifar10'"),
    ("cifar10 ", r"config.dataset='cifar10 ' is not a dataset name .*did you mean \['cifar10'"),
    ("cifar10/k=v", r"config.dataset='cifar10/k=v' is not a dataset name .*\(TypeError: "),
])
def test_an_unknown_tfds_config_or_version_lists_the_valid_ones(tmp_path, dataset, message):
    config = demo.get_config()
    config.dataset = dataset
    config.tfds_data_dir = str(tmp_path)
    with pytest.raises(data.DatasetError, match=message):
        data.dataset_info(config)
    with pytest.raises(data.DatasetError, match=message):  # and before any download
        data.prepare(dataset, str(tmp_path))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written


def test_a_namespaced_dataset_whose_builder_fails_offline_is_a_dataset_error(tmp_path, monkeypatch):
    # What TFDS's huggingface builder raises offline, after its retries; the stand-in spares the test the wait.
    def offline(name, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as e:
            raise RuntimeError(f"Failed to load Huggingface dataset builder with hf_repo_id={name}") from e

    monkeypatch.setattr(huggingface_dataset_builder, "builder", offline)
    config = demo.get_config()
    config.dataset = "huggingface:beans"
    config.tfds_data_dir = str(tmp_path)
    message = (r"config.dataset='huggingface:beans': TFDS could not make the builder of this namespaced dataset "
               r"\('huggingface'\): RuntimeError: Failed to load Huggingface dataset builder with hf_repo_id=beans "
               r"\(ConnectionError: \[Errno -2\] Name or service not known\)\. TFDS looks namespaced datasets up "
               r"over the network.*pip install datasets")
    with pytest.raises(data.DatasetError, match=message):
        data.dataset_info(config)
    with pytest.raises(data.DatasetError, match=message):
        data.prepare("huggingface:beans", str(tmp_path))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing written


def test_our_manual_datasets_missing_name_their_prepare_command(tmp_path):
    config = demo.get_config()
    config.dataset = "imagenet21k"
    config.tfds_data_dir = str(tmp_path)
    with pytest.raises(data.DatasetError, match=rf"looked for {tmp_path}/imagenet21k/1.0.0.*"
                                                rf"--dataset=imagenet21k --data_dir={tmp_path} --manual_dir="):
        data.dataset_info(config)



@pytest.mark.parametrize("manual_dir, said", [
    ("", "TFDS's default manual directory {tmp}/tfds/downloads/manual does not hold ILSVRC2012_img_train.tar or "
         "ILSVRC2012_img_val.tar"),
    ("{tmp}/nope", "--manual_dir={tmp}/nope does not hold ILSVRC2012_img_train.tar or"),
    ("{tmp}", "--manual_dir={tmp} does not hold ILSVRC2012_img_val.tar:"),
])
def test_preparing_a_manual_dataset_without_its_files_says_what_to_download_and_writes_nothing(tmp_path, manual_dir,
                                                                                                 said):
    target = tmp_path / "tfds"
    (tmp_path / "ILSVRC2012_img_train.tar").write_bytes(b"")  # one of the two
    with pytest.raises(data.DatasetError) as error:
        data.prepare("imagenet2012", str(target), manual_dir.format(tmp=tmp_path))
    assert "imagenet2012 is prepared from files you download yourself, and " in str(error.value)
    assert said.format(tmp=tmp_path) in str(error.value)
    assert not target.exists()


def test_preparing_into_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "afile"
    path.write_text("kept")
    with pytest.raises(data.DatasetError, match="is a file, not a directory"):
        data.prepare("digits", str(path))
    assert path.read_text() == "kept"
    # A directory that cannot be made (here under a file; a read-only disk alike) was a raw OSError traceback.
    with pytest.raises(data.DatasetError, match=r"--data_dir=.*afile/tfds \(config.tfds_data_dir\): cannot create it "
                                                r"\(Not a directory\); choose a writable directory"):
        data.prepare("digits", str(path / "tfds"))


def test_a_manual_dir_with_a_tilde_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(data.DatasetError, match=f"'{tmp_path}/my_images' is not a directory"):
        data.prepare("image_folder", str(tmp_path / "tfds"), "~/my_images")


def test_the_prepared_check_sees_remote_uris(config):
    """A gs:// data dir's dataset_info.json is found through tf.io.gfile (here its in-memory ram://), which
    os.path.exists never sees; TFDS and ArrayRecord read gs:// from there on."""
    import os
    import uuid

    import tensorflow as tf

    from vit_jax.data import datasets

    info = os.path.join(datasets._own_builder_dir("digits", config.tfds_data_dir), "dataset_info.json")
    remote_info = f"ram://{uuid.uuid4().hex}/tfds/digits/dataset_info.json"
    assert datasets._exists(info) and not datasets._exists(remote_info)
    tf.io.gfile.makedirs(os.path.dirname(remote_info))
    tf.io.gfile.copy(info, remote_info)
    assert datasets._exists(remote_info) and not os.path.exists(remote_info)
