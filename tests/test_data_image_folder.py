"""Your own images as a dataset: class folders (single label), JSONL records (multi-label), ImageNet-21k layouts,
and a corrupt file that is skipped and counted rather than becoming a NaN batch."""

import io
import json
import logging
import os
import re
import tarfile

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from configs import demo
from vit_jax import data
from vit_jax.data import datasets, pipeline, preprocess
from vit_jax.data.builders import imagenet21k


@pytest.fixture(scope="module")
def sharding():
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))


def _write_image(path, seed: int, fmt: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path, format=fmt)


def _config(data_dir, manual_dir, num_classes: int, label_kind: str = "single"):
    config = demo.get_config()
    config.dataset = "image_folder"
    config.tfds_data_dir = str(data_dir)
    config.tfds_manual_dir = str(manual_dir)
    config.num_classes = num_classes
    config.label_kind = label_kind
    config.eval_split = "validation"
    config.batch_size = 8
    config.eval_batch_size = 8
    config.pp.inception_crop = True
    return config


def test_class_folders_build_and_read_single_label(tmp_path, sharding):
    source = tmp_path / "images"
    for split, count in (("train", 6), ("validation", 3)):
        for c, class_name in enumerate(("cat", "dog", "emu")):
            for i in range(count):
                fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
                _write_image(source / split / class_name / f"{i}.{ext}", seed=100 * c + i, fmt=fmt)
    (source / "train" / "cat" / "notes.txt").write_text("not an image")
    config = _config(tmp_path / "tfds", source, num_classes=3)
    with pytest.raises(data.DatasetError, match="python -m vit_jax.data.prepare --dataset=image_folder"):
        data.dataset_info(config)
    data.prepare("image_folder", config.tfds_data_dir, config.tfds_manual_dir)
    info = data.dataset_info(config)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes, info.label_kind) == (18, 9, 3, "single")

    batch = next(data.make_train_iterator(config, sharding))
    assert batch["image"].shape == (8, 16, 16, 3) and batch["label"].shape == (8, 3)
    np.testing.assert_array_equal(np.asarray(batch["label"]).sum(axis=1), 1.0)
    # Eval labels follow the folders: class ids are the sorted folder names.
    labels = {}
    for local in pipeline.eval_batches(config, process_index=0, process_count=1):
        for index, label, mask in zip(local["index"], local["label"], local["mask"]):
            if mask:
                labels[int(index)] = int(np.argmax(label))
    assert sorted(labels.values()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_jsonl_records_build_and_read_multi_label(tmp_path, sharding):
    source = tmp_path / "corpus"
    records = {"train": [], "validation": []}
    label_sets = [["cat"], ["cat", "outdoor"], ["dog", "outdoor", "night"], ["night"]]
    for split, count in (("train", 8), ("validation", 4)):
        for i in range(count):
            relative = f"img/{split}_{i}.jpg"
            _write_image(source / relative, seed=i, fmt="JPEG")
            records[split].append({"image": relative, "labels": label_sets[i % 4]})
    # Train records sharded over two files, as a large corpus would be.
    for shard in range(2):
        with open(source / f"train-{shard:05d}-of-00002.jsonl", "w") as f:
            for record in records["train"][shard::2]:
                f.write(json.dumps(record) + "\n")
    with open(source / "validation.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records["validation"])
    (source / "classes.txt").write_text("cat\ndog\nnight\noutdoor\nunused\n")

    config = _config(tmp_path / "tfds", source, num_classes=5, label_kind="single")
    data.prepare("image_folder", config.tfds_data_dir, config.tfds_manual_dir)
    with pytest.raises(data.DatasetError, match="set --config.label_kind=multi"):
        data.dataset_info(config)
    # A softmax model may be scored on the sets (ImageNet ReaL's case), not trained on them: also a split that is
    # the training split's name.
    assert data.dataset_info(config, train=False).label_kind == "single"
    with config.unlocked():
        config.eval_split = config.train_split
    assert next(pipeline.eval_batches(config, process_index=0, process_count=1))["label"].shape[-1] == 5
    with pytest.raises(data.DatasetError, match="set --config.label_kind=multi"):
        next(data.make_train_iterator(config, sharding))
    config.eval_split = "validation"
    config.label_kind = "multi"
    info = data.dataset_info(config)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes, info.label_kind) == (8, 4, 5, "multi")

    batch = next(data.make_train_iterator(config, sharding))
    assert batch["label"].shape == (8, 5)
    assert sorted(np.asarray(batch["label"]).sum(axis=1).tolist()) == [1, 1, 1, 1, 2, 2, 3, 3]
    class_ids = {"cat": 0, "dog": 1, "night": 2, "outdoor": 3}
    expected = sorted(tuple(sorted(class_ids[n] for n in label_sets[i % 4])) for i in range(4))
    local = next(pipeline.eval_batches(config, process_index=0, process_count=1))
    got = sorted(tuple(np.flatnonzero(label).tolist()) for label, m in zip(local["label"], local["mask"]) if m)
    assert got == expected


def test_bad_records_and_a_missing_source_are_clear_errors(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.jsonl").write_text('{"path": "a.jpg"}\n')
    with pytest.raises(data.DatasetError, match=r"train.jsonl:1: expected a JSON object with 'image'"):
        data.prepare("image_folder", str(tmp_path / "tfds"), str(tmp_path / "src"))
    with pytest.raises(data.DatasetError, match="is not a directory"):
        data.prepare("image_folder", str(tmp_path / "tfds"), str(tmp_path / "nowhere"))


@pytest.mark.parametrize("labels", ["null", "3.5", "[\"cat\", null]", "{\"cat\": 1}", "true"])
def test_labels_that_are_not_names_are_an_error_naming_the_line(tmp_path, labels):
    """They raised a raw TypeError (null, 3.5) or became label names such as "None" or "True"."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.jsonl").write_text('{"image": "a.jpg", "labels": ["cat"]}\n'
                                                  f'{{"image": "b.jpg", "labels": {labels}}}\n')
    with pytest.raises(data.DatasetError, match=r"train.jsonl:2: expected a JSON object with 'image' .* 'labels' \(a "
                                                r"label name or a list of them, strings or integers\)"):
        data.prepare("image_folder", str(tmp_path / "tfds"), str(tmp_path / "src"))


def test_an_image_listed_twice_in_a_split_is_an_error_naming_both_lines(tmp_path):
    """TFDS stopped preparing with "Two examples share the same hashed key" (an AssertionError naming no file)."""
    source = tmp_path / "src"
    for name in ("a", "b"):
        _write_image(source / "img" / f"{name}.jpg", seed=0, fmt="JPEG")
    (source / "train-00000-of-00002.jsonl").write_text('{"image": "img/a.jpg", "labels": ["cat"]}\n')
    (source / "train-00001-of-00002.jsonl").write_text('{"image": "img/b.jpg", "labels": ["dog"]}\n\n'
                                                       '{"image": "./img/a.jpg", "labels": ["night"]}\n')
    (source / "validation.jsonl").write_text('{"image": "img/a.jpg", "labels": ["cat"]}\n')  # other split: fine
    with pytest.raises(data.DatasetError, match=r"train-00000-of-00002.jsonl:1 and .*train-00001-of-00002.jsonl:3 "
                                                r"both list image './img/a.jpg' in split 'train'"):
        data.prepare("image_folder", str(tmp_path / "tfds"), str(source))


def _class_folders(source, classes: str, images_per_class: int = 1) -> None:
    for split in ("train", "validation"):
        for c, class_name in enumerate(classes):
            for i in range(images_per_class):
                _write_image(source / split / class_name / f"{i}.png", seed=10 * c + i, fmt="PNG")


def test_tiffs_are_images_and_other_files_are_named_as_skipped(tmp_path, caplog):
    """preprocess decodes TIFF, but a folder of .tif files trained on none of them, and nothing said so."""
    from vit_jax.data.builders import image_folder

    _class_folders(tmp_path / "a", "xy")
    _write_image(tmp_path / "a" / "train" / "x" / "scan.tif", seed=3, fmt="TIFF")
    (tmp_path / "a" / "train" / "y" / "scan.jp2").write_bytes(b"\0" * 16)
    (tmp_path / "a" / "train" / "y" / ".DS_Store").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        layout = image_folder.scan_source(str(tmp_path / "a"))
    assert sorted(path for path, _ in layout.examples["train"]) == [
        "train/x/0.png", "train/x/scan.tif", "train/y/0.png"]
    assert "skipped 1 files in split 'train' not named .jpg/" in caplog.text and "train/y/scan.jp2" in caplog.text
    assert ".DS_Store" not in caplog.text


def test_a_second_image_folder_in_the_same_data_dir_is_refused_not_read_as_the_first(tmp_path, caplog):
    """Every image folder is prepared into DATA_DIR/image_folder/1.0.0: a second one returned the first's path,
    and training on it read the first folder's images and classes."""
    _class_folders(tmp_path / "a", "xy")
    _class_folders(tmp_path / "b", "xyz")
    tfds_dir = str(tmp_path / "tfds")
    path = data.prepare("image_folder", tfds_dir, str(tmp_path / "a"))
    both = re.escape(f"prepared from {tmp_path / 'a'}, not from {tmp_path / 'b'}")
    with pytest.raises(data.DatasetError, match=both + r" .*another --data_dir .*or delete " + re.escape(path)):
        data.prepare("image_folder", tfds_dir, str(tmp_path / "b"))
    with pytest.raises(data.DatasetError, match=both + r" .*leave config.tfds_manual_dir empty"):
        datasets.label_classes("image_folder", tfds_dir, str(tmp_path / "b"))
    assert datasets.label_classes("image_folder", tfds_dir, str(tmp_path / "a")) == ("single", 2)
    assert datasets.label_classes("image_folder", tfds_dir, "") == ("single", 2)  # the prepared copy as it is
    # The same folder named another way (relative, through a symlink) is the same folder.
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert data.prepare("image_folder", tfds_dir, os.path.relpath(tmp_path / "link")) == path
    # Datasets prepared before the source was recorded stay readable, with a warning.
    os.remove(os.path.join(path, "metadata.json"))
    with caplog.at_level(logging.WARNING):
        assert datasets.label_classes("image_folder", tfds_dir, str(tmp_path / "b")) == ("single", 2)
    assert "prepared before vit_jax recorded source folders" in caplog.text


def test_an_image_folder_scored_beside_another_dataset_is_read_as_prepared(tmp_path):
    """config.tfds_manual_dir is the run's own dataset's source: an image folder evaluated beside it (an extra
    evaluation, a few-shot task) is not checked against that folder."""
    from vit_jax import extra_evals, fewshot

    _class_folders(tmp_path / "a", "xy")
    data.prepare("image_folder", str(tmp_path / "tfds"), str(tmp_path / "a"))
    config = _config(tmp_path / "tfds", tmp_path / "imagenet_archives", num_classes=2)
    config.dataset = "imagenet2012"
    config.extra_evals = ("image_folder,validation",)
    (derived,) = extra_evals.eval_configs(config).values()
    assert (derived.dataset, derived.tfds_manual_dir, derived.num_classes) == ("image_folder", "", 2)
    task = fewshot.FewshotTask("image_folder", "train", "validation")
    derived = fewshot.task_config(config, task)
    assert (derived.dataset, derived.tfds_manual_dir, derived.num_classes) == ("image_folder", "", 2)
    # The run's own dataset keeps its source, and is checked against it.
    config.dataset = "image_folder"
    with pytest.raises(data.DatasetError, match="prepared from .*, not from .*imagenet_archives"):
        fewshot.task_config(config, task)


def test_preparing_a_folder_again_after_its_images_changed_says_so(tmp_path):
    """TFDS reuses a prepared dataset: images added to the source since were silently left out."""
    source = tmp_path / "images"
    _class_folders(source, "xy")
    tfds_dir = str(tmp_path / "tfds")
    path = data.prepare("image_folder", tfds_dir, str(source))
    assert data.prepare("image_folder", tfds_dir, str(source)) == path  # unchanged: reused
    _write_image(source / "train" / "x" / "new.png", seed=7, fmt="PNG")
    _write_image(source / "train" / "z" / "new.png", seed=8, fmt="PNG")
    changed = r"changed since it was prepared into .*\(train: 2 images prepared, 4 now; classes: 2 prepared, 3 now, "
    with pytest.raises(data.DatasetError, match=changed + r"new \['z'\]\).* Delete " + re.escape(path)):
        data.prepare("image_folder", tfds_dir, str(source))


def test_a_corrupt_image_is_skipped_and_counted_never_a_nan_batch(tmp_path, sharding, caplog):
    source = tmp_path / "images"
    for i in range(8):
        _write_image(source / "train" / ("a" if i % 2 else "b") / f"{i}.jpg", seed=i, fmt="JPEG")
        _write_image(source / "validation" / ("a" if i % 2 else "b") / f"{i}.jpg", seed=i, fmt="JPEG")
    good = (source / "train" / "a" / "1.jpg").read_bytes()
    (source / "train" / "a" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated download
    (source / "validation" / "b" / "broken.jpg").write_bytes(b"\x00" * 100)  # not an image at all
    config = _config(tmp_path / "tfds", source, num_classes=2)
    data.prepare("image_folder", config.tfds_data_dir, config.tfds_manual_dir)
    assert data.dataset_info(config).num_train_examples == 9

    before = preprocess.corrupt_images_skipped()
    with caplog.at_level(logging.WARNING):
        iterator = data.make_train_iterator(config, sharding)
        batches = [np.asarray(next(iterator)["image"]) for _ in range(3)]  # 24 examples: > 2 epochs of 9
        iterator.close()
    assert all(np.isfinite(b).all() and b.shape == (8, 16, 16, 3) for b in batches)
    assert preprocess.corrupt_images_skipped() - before >= 2
    logged = [r.getMessage() for r in caplog.records if "skipped corrupt image" in r.getMessage()]
    assert len(logged) == 1, logged  # once, however often it comes round
    assert "of the training split" in logged[0] and "skipped so far in this process" in logged[0]

    masks = [np.asarray(b["mask"]) for b in data.make_eval_iterator(config, sharding)]
    assert sum(m.sum() for m in masks) == 8 and len(masks) == 2  # 9 examples, 1 corrupt, padded to 2 batches


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 10, 3), seed % 256, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def test_imagenet21k_builds_from_synset_tars_and_folders_with_a_hashed_validation_split(tmp_path):
    manual = tmp_path / "i21k"
    manual.mkdir()
    names = {synset: [f"{synset}_{i}.JPEG" for i in range(150)] for synset in ("n00000001", "n00000002")}
    with tarfile.open(manual / "n00000001.tar", "w") as tar:  # as image-net.org serves a synset
        for i, name in enumerate(names["n00000001"]):
            _add(tar, name, _jpeg(i))
    for i, name in enumerate(names["n00000002"]):  # an extracted synset folder
        os.makedirs(manual / "n00000002", exist_ok=True)
        (manual / "n00000002" / name).write_bytes(_jpeg(i))
    with tarfile.open(manual / "winter_whole.tar", "w") as outer:  # a whole-release tar of synset tars
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w") as tar:
            names["n00000003"] = [f"n00000003_{i}.JPEG" for i in range(150)]
            for i, name in enumerate(names["n00000003"]):
                _add(tar, name, _jpeg(i))
        _add(outer, "winter_whole/n00000003.tar", inner.getvalue())

    path = data.prepare("imagenet21k", str(tmp_path / "tfds"), str(manual))
    config = demo.get_config()
    config.dataset, config.tfds_data_dir, config.num_classes = "imagenet21k", str(tmp_path / "tfds"), 3
    config.train_split, config.eval_split = "train", "validation"
    info = data.dataset_info(config)
    all_names = [n for synset_names in names.values() for n in synset_names]
    held_out = sum(imagenet21k.is_validation(n) for n in all_names)
    assert 0 < held_out < 20 and path == info.data_dir
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (450 - held_out, held_out, 3)


def test_an_eval_split_of_only_corrupt_images_is_an_error_not_a_zero_score(tmp_path):
    from vit_jax import sharding as mesh_sharding
    from vit_jax import train

    source = tmp_path / "images"
    for i in range(4):
        _write_image(source / "train" / ("a" if i % 2 else "b") / f"{i}.png", seed=i, fmt="PNG")
        (source / "validation" / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        (source / "validation" / ("a" if i % 2 else "b") / f"{i}.jpg").write_bytes(b"<html>not found</html>")
    config = _config(tmp_path / "tfds", source, num_classes=2)
    data.prepare("image_folder", config.tfds_data_dir, config.tfds_manual_dir)
    mesh = mesh_sharding.make_mesh(config)
    params = train.init_state(config, mesh, config.total_steps)["params"]
    with pytest.raises(data.DatasetError, match=r"config.eval_split='validation' of 'image_folder': no image of it "
                                                r"could be decoded"):
        train.evaluate(config, train.make_eval_step(config, mesh), params, mesh)


def test_hidden_entries_and_macos_zip_debris_are_never_splits_classes_or_images(tmp_path):
    """A macOS zip's __MACOSX/ became a split, its split folders classes, and `._a.png` resource forks training
    images (each a corrupt example)."""
    from vit_jax.data.builders import image_folder

    source = tmp_path / "zip"
    for split, class_name, name in (("train", "cat", "a"), ("train", "dog", "b"), ("val", "cat", "c"),
                                    ("val", "dog", "d")):
        _write_image(source / split / class_name / f"{name}.png", seed=ord(name), fmt="PNG")
    for debris in ("__MACOSX/train/cat/._a.png", "__MACOSX/val/dog/._d.png", "train/cat/._a.png",
                   "train/.hidden_class/e.png", ".cache/cat/f.png", "val/dog/.thumbs/g.png",
                   "val/dog/sub/__MACOSX/h.png"):
        os.makedirs(os.path.dirname(source / debris), exist_ok=True)
        (source / debris).write_bytes(b"\0\5\26\7 resource fork")
    _write_image(source / "val" / "dog" / "sub" / "i.png", seed=9, fmt="PNG")  # a real subfolder is still walked
    layout = image_folder.scan_source(str(source))
    assert layout.class_names == ("cat", "dog")
    assert {split: sorted(path for path, _ in rows) for split, rows in layout.examples.items()} == {
        "train": ["train/cat/a.png", "train/dog/b.png"], "val": ["val/cat/c.png", "val/dog/d.png", "val/dog/sub/i.png"]}


def test_hidden_record_files_are_not_records(tmp_path):
    """macOS's `._train.jsonl` beside train.jsonl was read as records (and failed to parse as JSON)."""
    from vit_jax.data.builders import image_folder

    (tmp_path / "train.jsonl").write_text('{"image": "a.jpg", "labels": ["cat"]}\n')
    (tmp_path / "._train.jsonl").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")
    (tmp_path / "._validation.jsonl").write_bytes(b"\0\5\26\7\0\2\0\0Mac OS X")
    layout = image_folder.scan_source(str(tmp_path))
    assert layout.examples == {"train": [("a.jpg", ("cat",))]}


@pytest.mark.parametrize("entry", ["val set/cat/a.png", "val.2020/cat/a.png", "train.v2.jsonl",
                                   "train.v2-00000-of-00002.jsonl"])
def test_a_split_name_tfds_cannot_read_is_refused_before_anything_is_written(tmp_path, entry):
    """`val set`, `val.2020` and `train.v2.jsonl` prepared, then failed at read with TFDS's raw ValueError."""
    source = tmp_path / "src"
    _write_image(source / "train" / "cat" / "a.png", seed=0, fmt="PNG")
    if entry.endswith(".jsonl"):
        (source / entry).write_text('{"image": "train/cat/a.png", "labels": ["cat"]}\n')
        where, split = f"records file {source / entry}", entry.split("-")[0].removesuffix(".jsonl")
    else:
        _write_image(source / entry, seed=1, fmt="PNG")
        where, split = f"folder {source / entry.split('/')[0]}", entry.split("/")[0]
    renamed = split.replace(" ", "_").replace(".", "_")
    with pytest.raises(data.DatasetError, match=re.escape(f"{where}: split name {split!r} is not one TFDS can read: "
                                                          f"a split name is letters, digits, '_' and '-' only; "
                                                          f"rename it, e.g. to {renamed!r}")):
        data.prepare("image_folder", str(tmp_path / "tfds"), str(source))
    assert not (tmp_path / "tfds").exists()


def test_symlinked_folders_are_followed_once_and_loose_images_named_as_skipped(tmp_path, caplog):
    """A symlinked subfolder's images were left out, and images directly in a split folder (of no class) too, with
    nothing said; a link back up the tree must not loop."""
    from vit_jax.data.builders import image_folder

    source = tmp_path / "a"
    _class_folders(source, "xy")
    _write_image(tmp_path / "extra" / "e.png", seed=4, fmt="PNG")
    (source / "train" / "x" / "linked").symlink_to(tmp_path / "extra", target_is_directory=True)
    (source / "train" / "y" / "up").symlink_to(source / "train", target_is_directory=True)  # a loop
    _write_image(source / "train" / "loose.png", seed=5, fmt="PNG")
    with caplog.at_level(logging.WARNING):
        layout = image_folder.scan_source(str(source))
    assert sorted(layout.examples["train"]) == [
        ("train/x/0.png", ("x",)), ("train/x/linked/e.png", ("x",)), ("train/y/0.png", ("y",))]
    assert "skipped 1 images directly in split folder 'train', of no class: loose.png; move each into " in caplog.text
    assert "not following train/y/up: a link to a folder that holds it" in caplog.text


def test_a_folder_of_no_images_is_no_split_whatever_its_name(tmp_path):
    """Only a folder that becomes a split has its name checked: notes beside the splits stay ignored."""
    from vit_jax.data.builders import image_folder

    _write_image(tmp_path / "train" / "cat" / "a.png", seed=0, fmt="PNG")
    (tmp_path / "my notes").mkdir()
    (tmp_path / "my notes" / "readme.txt").write_text("notes")
    assert list(image_folder.scan_source(str(tmp_path)).examples) == ["train"]


def test_class_folders_without_a_split_folder_are_told_where_to_go(tmp_path):
    """SOURCE/<class>/<image> (the common torchvision ImageFolder layout) said only "no images found"."""
    from vit_jax.data.builders import image_folder

    for class_name in ("cat", "dog"):
        _write_image(tmp_path / class_name / "a.png", seed=0, fmt="PNG")
    with pytest.raises(data.DatasetError, match=r"; cat, dog hold images directly, read as splits without class "
                                                r"folders: for class folders .*/<class>/<image>, move them under a "
                                                r"split folder, e\.g\. .*/train/<class>/<image>$"):
        image_folder.scan_source(str(tmp_path))


def test_a_class_listed_twice_in_classes_txt_is_an_error_naming_it_and_its_lines(tmp_path):
    """TFDS's ClassLabel raised "Some label names are duplicated", naming neither the file nor the name."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "train.jsonl").write_text('{"image": "a.jpg", "labels": ["cat"]}\n')
    (source / "classes.txt").write_text("cat\ndog\n\nemu\ndog\nemu\n")
    with pytest.raises(data.DatasetError, match=re.escape(f"{source / 'classes.txt'}: class name 'dog' is listed on "
                                                          "lines 2, 5 (and 1 more class names listed twice): list "
                                                          "each class once")):
        data.prepare("image_folder", str(tmp_path / "tfds"), str(source))


def test_integer_labels_without_classes_txt_are_numbered_in_numeric_order(tmp_path):
    """Labels 0..11 had ids in string order ('0', '1', '10', '11', '2', ...): label 2 had id 4."""
    from vit_jax.data.builders import image_folder

    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"image": f"{i}.jpg", "labels": [i, str(11 - i)]}) + "\n"
                                                  for i in range(12)))
    assert image_folder.scan_source(str(tmp_path)).class_names == tuple(str(i) for i in range(12))
    # Names that are not all integers stay in string order.
    (tmp_path / "train.jsonl").write_text('{"image": "a.jpg", "labels": [10, 2, "cat", -1]}\n')
    assert image_folder.scan_source(str(tmp_path)).class_names == ("-1", "10", "2", "cat")
    assert image_folder.sorted_labels({"-1", "10", "2", "02"}) == ["-1", "02", "2", "10"]


def test_a_copy_prepared_with_integer_labels_in_string_order_is_not_prepared_again_in_silence(tmp_path, monkeypatch):
    """A copy prepared before integer labels were ordered numerically keeps its ids: preparing its folder again
    says the order changed rather than reusing it under ids the records no longer give."""
    from vit_jax.data.builders import image_folder

    source = tmp_path / "src"
    for i in range(11):
        _write_image(source / "img" / f"{i}.jpg", seed=i, fmt="JPEG")
    (source / "train.jsonl").write_text("".join(json.dumps({"image": f"img/{i}.jpg", "labels": [i]}) + "\n"
                                                for i in range(11)))
    with monkeypatch.context() as patch:
        patch.setattr(image_folder, "sorted_labels", sorted)  # as it was prepared before
        path = data.prepare("image_folder", str(tmp_path / "tfds"), str(source))
    with pytest.raises(data.DatasetError, match=r"classes: 11 prepared, 11 now, in another order \(integer labels "
                                                r"are now in numeric order, the prepared copy has them in string "
                                                r"order\)\).* Delete " + re.escape(path)):
        data.prepare("image_folder", str(tmp_path / "tfds"), str(source))


def _synset_tar(path, synset: str, count: int = 3) -> None:
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            _add(tar, f"{synset}_{i}.JPEG", _jpeg(i))


def test_imagenet21k_a_synset_listed_twice_in_synsets_txt_is_an_error_naming_it_and_its_lines(tmp_path):
    _synset_tar(tmp_path / "n00000001.tar", "n00000001")
    (tmp_path / "synsets.txt").write_text("n00000001\nn00000002\nn00000001\n")
    with pytest.raises(data.DatasetError, match=re.escape(f"{tmp_path / 'synsets.txt'}: synset name 'n00000001' is "
                                                          "listed on lines 1, 3: list each synset once")):
        imagenet21k.Imagenet21k(manual_dir=str(tmp_path), data_dir=str(tmp_path / "tfds"))


@pytest.mark.parametrize("synsets_txt", [False, True])
@pytest.mark.parametrize("layout", ["folder_and_tar", "whole_tar_beside_its_synset_tars"])
def test_imagenet21k_a_synset_in_two_places_is_refused_naming_both(tmp_path, layout, synsets_txt):
    """Every image of it was read twice, and TFDS stopped after the whole split with an AssertionError ("Two
    examples share the same hashed key")."""
    manual = tmp_path / "i21k"
    manual.mkdir()
    _synset_tar(manual / "n00000001.tar", "n00000001")
    _synset_tar(manual / "n00000002.tar", "n00000002")
    if layout == "folder_and_tar":
        (manual / "n00000002").mkdir()
        (manual / "n00000002" / "n00000002_0.JPEG").write_bytes(_jpeg(0))
        both = f"synset n00000002 is in both {manual / 'n00000002'} and {manual / 'n00000002.tar'}: "
    else:
        with tarfile.open(manual / "fall11_whole.tar", "w") as outer:
            for synset in ("n00000001", "n00000002"):
                outer.add(manual / f"{synset}.tar", arcname=f"fall11_whole/{synset}.tar")
        both = (f"synset n00000001 is in both {manual / 'n00000001.tar'} and {manual / 'fall11_whole.tar'} "
                "(member fall11_whole/n00000001.tar) (and 1 more synsets in two places): ")
    if synsets_txt:
        (manual / "synsets.txt").write_text("n00000001\nn00000002\n")
    with pytest.raises(data.DatasetError, match=re.escape(both + "its images would be read twice. Keep one of them")):
        data.prepare("imagenet21k", str(tmp_path / "tfds"), str(manual))
    assert not (tmp_path / "tfds").exists()


def test_imagenet21k_a_lone_archive_with_synsets_txt_is_not_listed_before_preparing(tmp_path, monkeypatch):
    """Listing a compressed whole-release archive is a pass over all of it: not done when it is the only source."""
    _synset_tar(tmp_path / "n00000001.tar", "n00000001")
    with tarfile.open(tmp_path / "whole.tar.gz", "w:gz") as outer:
        outer.add(tmp_path / "n00000001.tar", arcname="whole/n00000001.tar")
    os.remove(tmp_path / "n00000001.tar")
    (tmp_path / "synsets.txt").write_text("n00000001\n")
    with monkeypatch.context() as patch:
        patch.setattr(imagenet21k, "_archive_sources", lambda archive: pytest.fail(f"listed {archive}"))
        assert imagenet21k.find_synsets(str(tmp_path)) == ["n00000001"]
    os.remove(tmp_path / "synsets.txt")  # the classes now come from the archive: listed, compressed as it is
    assert imagenet21k.find_synsets(str(tmp_path)) == ["n00000001"]


def test_imagenet21k_tar_entries_are_forgotten_once_read(tmp_path, monkeypatch):
    """tarfile keeps every entry it passed in `members` (~470 B each): ~6.6 GB per pass over a whole-release tar of
    synset folders."""
    manual = tmp_path / "i21k"
    manual.mkdir()
    _synset_tar(manual / "n00000001.tar", "n00000001", count=40)
    with tarfile.open(manual / "whole.tar", "w") as outer:
        outer.add(manual / "n00000001.tar", arcname="whole/n00000001.tar")
        for i in range(40):
            _add(outer, f"whole/n00000002/n00000002_{i}.JPEG", _jpeg(i))
    os.remove(manual / "n00000001.tar")
    opened, tar_open = [], tarfile.open

    def recording_open(*args, **kwargs):
        opened.append(tar_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(tarfile, "open", recording_open)
    assert sum(1 for _ in imagenet21k.iter_images(str(manual), lambda name: True)) == 80
    assert imagenet21k.find_synsets(str(manual)) == ["n00000001", "n00000002"]
    assert len(opened) == 3 and max(len(tar.members) for tar in opened) <= 1


def _read_bytes() -> int:
    """Bytes this process has read with read() calls so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's /proc/self/io")
def test_imagenet21k_listing_an_uncompressed_archive_reads_its_headers_not_its_data(tmp_path):
    """The class list streamed the whole archive (1.3 TB for the full release) to read its member names."""
    size = 64 << 20  # a synset tar's bytes in the archive, left a sparse hole here: never read to list the archive
    with open(tmp_path / "whole.tar", "wb") as f:
        for name in ("whole/n00000001.tar", "whole/n00000002.tar"):
            info = tarfile.TarInfo(name)
            info.size = size
            f.write(info.tobuf())
            f.seek(size, os.SEEK_CUR)
        f.write(b"\0" * 2 * tarfile.RECORDSIZE)
    before = _read_bytes()
    assert imagenet21k.find_synsets(str(tmp_path)) == ["n00000001", "n00000002"]
    assert _read_bytes() - before < size // 4
