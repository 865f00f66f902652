"""`image_folder`: the user's own images as a TFDS dataset, single-label (class per folder) or multi-label (JFT-like).

Two layouts of the source folder (`--manual_dir`), detected automatically:

* class per folder, single label:  SOURCE/<split>/<class>/<image>   e.g. SOURCE/train/cat/001.jpg
* labelled records, one or more labels per image (multi-hot, sigmoid loss):
  SOURCE/<split>.jsonl or sharded SOURCE/<split>-00000-of-00064.jsonl, one JSON object a line:
  {"image": "relative/path.jpg", "labels": ["cat", "outdoor"]}   (paths relative to SOURCE)
  An optional SOURCE/classes.txt (one name a line) fixes the class ids; otherwise they are the sorted label names.

Image bytes are stored as they are (JPEG stays JPEG), so preparing decodes nothing and needs no tensorflow;
a corrupt file is kept and skipped (and counted) when read. Splits are whatever folder / file names say.

A data_dir holds one image folder (DATA_DIR/image_folder/1.0.0), which records the absolute path of its source.
Preparing another folder into it, or training with config.tfds_manual_dir naming another folder, is an error
rather than training on the first folder's images. Training reads only the prepared copy and never scans the
source again: images added or removed afterwards are not seen. Preparing the same folder again compares the
images per split and the classes with the prepared copy, and says when they changed (delete the copy to
prepare it anew); a file replaced by another of the same name goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder

from vit_jax.data.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
SOURCE_KEY = "source_dir"  # the prepared dataset's metadata.json entry: the folder it was prepared from


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """What was found in a source folder: class names and, per split, (relative path, label names) pairs."""

    multi_label: bool
    class_names: tuple[str, ...]
    examples: dict[str, list[tuple[str, tuple[str, ...]]]]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _scan_folders(source_dir: str) -> FolderLayout:
    examples: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for split in sorted(os.listdir(source_dir)):
        split_dir = os.path.join(source_dir, split)
        if not os.path.isdir(split_dir):
            continue
        rows, skipped = [], []
        for class_name in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, class_name)
            if not os.path.isdir(class_dir):
                continue
            for root, _, files in os.walk(class_dir):
                for name in sorted(files):
                    path = os.path.relpath(os.path.join(root, name), source_dir)
                    if _is_image(name):
                        rows.append((path, (class_name,)))
                    elif not name.startswith("."):
                        skipped.append(path)
        if skipped:  # a folder of another image format would otherwise train on part of its images in silence
            logging.warning("%s: skipped %d files in split %r not named %s: %s%s", source_dir, len(skipped), split,
                            "/".join(IMAGE_EXTENSIONS), ", ".join(skipped[:5]), ", ..." if len(skipped) > 5 else "")
        if rows:
            examples[split] = rows
    class_names = sorted({labels[0] for rows in examples.values() for _, labels in rows})
    return FolderLayout(multi_label=False, class_names=tuple(class_names), examples=examples)


def _label_names(labels: object) -> tuple[str, ...]:
    """A record's 'labels' (a name, or a list of names; JSON strings or integers) as names; TypeError otherwise."""
    names = labels if isinstance(labels, list) else [labels]
    bad = [name for name in names if type(name) not in (str, int)]  # not bool, float, null, list or object
    if bad:
        raise TypeError(f"'labels' must be a label name or a list of them, strings or integers; got {bad[0]!r}")
    return tuple(str(name) for name in names)


def _scan_records(source_dir: str, record_files: list[str]) -> FolderLayout:
    examples: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    seen: dict[tuple[str, str], str] = {}  # (split, image path) -> file:line of its first record
    for file_name in sorted(record_files):
        split = _SHARD_SUFFIX.sub("", file_name[: -len(".jsonl")])
        path = os.path.join(source_dir, file_name)
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                    image, labels = record["image"], _label_names(record["labels"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DatasetError(f"{where}: expected a JSON object with 'image' (a path relative to "
                                       f"{source_dir}) and 'labels' (a label name or a list of them, strings or "
                                       f"integers), got {line.strip()!r} ({e})") from None
                if not isinstance(image, str) or not image:
                    raise DatasetError(f"{where}: 'image' must be a path relative to {source_dir}, got {image!r}")
                # TFDS keys examples by path, and two records of one image in a split stop preparing with an
                # AssertionError ("Two examples share the same hashed key").
                first = seen.setdefault((split, os.path.normpath(image)), where)
                if first != where:
                    raise DatasetError(f"{first} and {where} both list image {image!r} in split {split!r}: an "
                                       "image may appear once per split; merge the two records' labels into one")
                examples.setdefault(split, []).append((image, labels))
    classes_file = os.path.join(source_dir, "classes.txt")
    found = {label for rows in examples.values() for _, labels in rows for label in labels}
    if os.path.exists(classes_file):
        with open(classes_file, encoding="utf-8") as f:
            class_names = [line.strip() for line in f if line.strip()]
        unknown = sorted(found - set(class_names))
        if unknown:
            raise DatasetError(f"labels {unknown[:10]} (of {len(unknown)}) are not in {classes_file}; add them or "
                               "fix the records")
    else:
        class_names = sorted(found)
    return FolderLayout(multi_label=True, class_names=tuple(class_names), examples=examples)


def scan_source(source_dir: str) -> FolderLayout:
    """Find the splits, images and labels under `source_dir` (either layout in the module docstring)."""
    if not source_dir or not os.path.isdir(source_dir):
        raise DatasetError(f"image_folder needs the folder of your images as --manual_dir (config.tfds_manual_dir); "
                           f"{source_dir!r} is not a directory")
    record_files = [name for name in os.listdir(source_dir) if name.endswith(".jsonl")]
    layout = _scan_records(source_dir, record_files) if record_files else _scan_folders(source_dir)
    if not layout.examples:
        raise DatasetError(f"no images found in {source_dir}: expected {source_dir}/<split>/<class>/<image> "
                           f"({', '.join(IMAGE_EXTENSIONS)}) or {source_dir}/<split>.jsonl records")
    return layout


def recorded_source(prepared: dataset_builder.DatasetBuilder) -> str | None:
    """The absolute source folder a prepared image_folder recorded; None for one prepared before it was recorded."""
    metadata = prepared.info.metadata  # TFDS's lazy dict loads metadata.json in items(), not in get()
    return dict(metadata.items()).get(SOURCE_KEY) if metadata is not None else None


def check_source(prepared: dataset_builder.DatasetBuilder, source_dir: str) -> None:
    """Raise `DatasetError` when the prepared image_folder recorded another source folder than `source_dir`."""
    recorded = recorded_source(prepared)
    if recorded is not None and os.path.realpath(recorded) != os.path.realpath(source_dir):
        raise DatasetError(f"image_folder at {prepared.data_dir} was prepared from {recorded}, not from "
                           f"{os.path.realpath(source_dir)} (--manual_dir, config.tfds_manual_dir): a data_dir holds "
                           f"one image folder. Prepare {source_dir} into another --data_dir (config.tfds_data_dir), "
                           f"or delete {prepared.data_dir} and prepare again; to train on the prepared copy as it "
                           "is, leave config.tfds_manual_dir empty")


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images from a local folder, single-label ('label') or multi-label ('labels')."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def __init__(self, *, source_dir: str, **kwargs):
        self._layout = scan_source(source_dir)
        self._source_dir = os.path.realpath(source_dir)  # recorded: the same folder however it is named
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        label = tfds.features.ClassLabel(names=list(self._layout.class_names))
        label_key = "labels" if self._layout.multi_label else "label"
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Images from {self._source_dir}.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                label_key: tfds.features.Sequence(label) if self._layout.multi_label else label,
            }),
            supervised_keys=("image", label_key),
            metadata=tfds.core.MetadataDict({SOURCE_KEY: self._source_dir}),
        )

    def check_prepared(self, prepared: dataset_builder.DatasetBuilder) -> None:
        """Raise `DatasetError` when `prepared` (this data_dir's image folder) came from another source folder, or
        from this one with other images per split or other classes than it holds now (TFDS would reuse it)."""
        check_source(prepared, self._source_dir)
        label_key = "labels" if "labels" in prepared.info.features else "label"
        label = prepared.info.features[label_key]
        names = tuple((label.feature if label_key == "labels" else label).names)
        now = {split: len(rows) for split, rows in self._layout.examples.items()}
        then = {split: info.num_examples for split, info in prepared.info.splits.items()}
        changes = [f"{split}: {then.get(split, 0)} images prepared, {now.get(split, 0)} now"
                   for split in sorted(set(now) | set(then)) if now.get(split, 0) != then.get(split, 0)]
        if (label_key == "labels") != self._layout.multi_label:
            changes.append(f"labels: {'records' if label_key == 'labels' else 'class folders'} prepared, "
                           f"{'records' if self._layout.multi_label else 'class folders'} now")
        elif names != self._layout.class_names:
            added = [name for name in self._layout.class_names if name not in names]
            gone = [name for name in names if name not in self._layout.class_names]
            changes.append(f"classes: {len(names)} prepared, {len(self._layout.class_names)} now"
                           + (f", new {added[:5]}" if added else "") + (f", gone {gone[:5]}" if gone else "")
                           + ("" if added or gone else ", in another order"))
        if changes:
            raise DatasetError(f"{self._source_dir} has changed since it was prepared into {prepared.data_dir} "
                               f"({'; '.join(changes)}): a prepared image_folder is never scanned again. Delete "
                               f"{prepared.data_dir} and prepare again, or prepare into another --data_dir")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {split: self._generate_examples(rows) for split, rows in self._layout.examples.items()}

    def _generate_examples(self, rows: list[tuple[str, tuple[str, ...]]]):
        for relative_path, labels in rows:
            path = os.path.join(self._source_dir, relative_path)
            if not os.path.exists(path):
                raise DatasetError(f"image {path} (listed in the records of {self._source_dir}) does not exist")
            with open(path, "rb") as f:
                image = f.read()
            if self._layout.multi_label:
                yield relative_path, {"image": image, "labels": list(labels)}
            else:
                yield relative_path, {"image": image, "label": labels[0]}
