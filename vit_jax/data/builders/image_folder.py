"""`image_folder`: the user's own images as a TFDS dataset, single-label (class per folder) or multi-label (JFT-like).

Two layouts of the source folder (`--manual_dir`), detected automatically:

* class per folder, single label:  SOURCE/<split>/<class>/<image>   e.g. SOURCE/train/cat/001.jpg
* labelled records, one or more labels per image (multi-hot, sigmoid loss):
  SOURCE/<split>.jsonl or sharded SOURCE/<split>-00000-of-00064.jsonl, one JSON object a line:
  {"image": "relative/path.jpg", "labels": ["cat", "outdoor"]}   (paths relative to SOURCE)
  An optional SOURCE/classes.txt (one name a line) fixes the class ids; otherwise they are the sorted label names.

Image bytes are stored as they are (JPEG stays JPEG), so preparing decodes nothing and needs no tensorflow;
a corrupt file is kept and skipped (and counted) when read. Splits are whatever folder / file names say.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import tensorflow_datasets as tfds

from vit_jax.data.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")


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
        rows = []
        for class_name in sorted(os.listdir(split_dir)):
            class_dir = os.path.join(split_dir, class_name)
            if not os.path.isdir(class_dir):
                continue
            for root, _, files in os.walk(class_dir):
                for name in sorted(files):
                    if _is_image(name):
                        rows.append((os.path.relpath(os.path.join(root, name), source_dir), (class_name,)))
        if rows:
            examples[split] = rows
    class_names = sorted({labels[0] for rows in examples.values() for _, labels in rows})
    return FolderLayout(multi_label=False, class_names=tuple(class_names), examples=examples)


def _scan_records(source_dir: str, record_files: list[str]) -> FolderLayout:
    examples: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for file_name in sorted(record_files):
        split = _SHARD_SUFFIX.sub("", file_name[: -len(".jsonl")])
        path = os.path.join(source_dir, file_name)
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image, labels = record["image"], record["labels"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DatasetError(f"{path}:{line_number}: expected a JSON object with 'image' (a path relative "
                                       f"to {source_dir}) and 'labels' (a list of label names), got {line.strip()!r} "
                                       f"({e})") from None
                if isinstance(labels, (str, int)):
                    labels = [labels]
                examples.setdefault(split, []).append((str(image), tuple(str(label) for label in labels)))
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


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Images from a local folder, single-label ('label') or multi-label ('labels')."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def __init__(self, *, source_dir: str, **kwargs):
        self._layout = scan_source(source_dir)
        self._source_dir = source_dir
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
        )

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
