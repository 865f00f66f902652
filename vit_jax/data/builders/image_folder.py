"""`image_folder`: the user's own images as a TFDS dataset, single-label (class per folder) or multi-label (JFT-like).

Two layouts of the source folder (`--manual_dir`), detected automatically:

* class per folder, single label:  SOURCE/<split>/<class>/<image>   e.g. SOURCE/train/cat/001.jpg
* labelled records, one or more labels per image (multi-hot, sigmoid loss):
  SOURCE/<split>.jsonl or sharded SOURCE/<split>-00000-of-00064.jsonl, one JSON object a line:
  {"image": "relative/path.jpg", "labels": ["cat", "outdoor"]}   (paths relative to SOURCE)
  An optional SOURCE/classes.txt (one name a line, each once) fixes the class ids; otherwise they are the sorted
  label names, in numeric order when every name is an integer (labels 0..N-1 get ids 0..N-1; a copy prepared when
  they were in string order, '0', '1', '10', '2', keeps its ids, and preparing its folder again says the order changed).

Split names (folder names, or record file names without .jsonl and the shard suffix) must be letters, digits, `_`
and `-`, as TFDS reads no other split. Hidden entries (a name starting with `.`, e.g. .DS_Store or macOS's `._*`
resource forks) and `__MACOSX` folders left by unzipping a macOS archive are skipped at every level: they are never
splits, classes, images or record files.

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
from collections.abc import Collection

import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder

from vit_jax.data.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
_SPLIT_NAME = re.compile(r"[\w-]+")  # what TFDS parses as a split name (tensorflow_datasets/core/splits.py)
_INTEGER = re.compile(r"-?[0-9]+")
SOURCE_KEY = "source_dir"  # the prepared dataset's metadata.json entry: the folder it was prepared from


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """What was found in a source folder: class names and, per split, (relative path, label names) pairs."""

    multi_label: bool
    class_names: tuple[str, ...]
    examples: dict[str, list[tuple[str, tuple[str, ...]]]]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(name: str) -> bool:
    """A hidden entry (.DS_Store, macOS's `._x.png` resource forks) or the `__MACOSX` folder a macOS zip leaves:
    never a split, class, image or record file (a `._x.png` is no image, and would be one corrupt example)."""
    return name.startswith(".") or name == "__MACOSX"


def _listdir(path: str) -> list[str]:
    """The sorted entries of `path` that are not hidden."""
    return sorted(name for name in os.listdir(path) if not _is_hidden(name))


def _check_split_name(split: str, where: str) -> None:
    """Raise `DatasetError` for a split name TFDS cannot read (it prepares, then fails at read with a ValueError)."""
    if not _SPLIT_NAME.fullmatch(split):
        renamed = re.sub(r"[^\w-]+", "_", split)
        raise DatasetError(f"{where}: split name {split!r} is not one TFDS can read: a split name is letters, digits, "
                           f"'_' and '-' only; rename it, e.g. to {renamed!r}")


def _first_names(names: list[str], count: int = 5) -> str:
    """The first `count` of `names`, comma-separated, with ", ..." when there are more (a warning's list)."""
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _links_up(path: str, real_parent: str) -> bool:
    """Whether `path` is a symlink to its own folder `real_parent` (a real path) or to one of that folder's
    ancestors: following it would walk the tree again, under the wrong class."""
    if not os.path.islink(path):
        return False
    target = os.path.realpath(path)
    return real_parent == target or real_parent.startswith(target.rstrip(os.sep) + os.sep)


def _scan_folders(source_dir: str) -> FolderLayout:
    """The class-per-folder layout: SOURCE/<split>/<class>/**/<image>, hidden entries and `__MACOSX` skipped at the
    split, class, subfolder and file level; files of no image extension, and images directly in a split folder (of
    no class), are skipped with a warning naming them. Symlinked folders are followed (as torchvision's
    ImageFolder does), each real folder once per class; a link back up the tree is skipped with a warning."""
    examples: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for split in _listdir(source_dir):
        split_dir = os.path.join(source_dir, split)
        if not os.path.isdir(split_dir):
            continue
        rows, skipped = [], []
        loose = [name for name in _listdir(split_dir)
                 if _is_image(name) and os.path.isfile(os.path.join(split_dir, name))]
        for class_name in _listdir(split_dir):
            class_dir = os.path.join(split_dir, class_name)
            if not os.path.isdir(class_dir):
                continue
            seen = set()
            for root, dirs, files in os.walk(class_dir, followlinks=True):
                real = os.path.realpath(root)
                if real in seen:  # a second link to a folder already walked
                    dirs[:] = []
                    continue
                seen.add(real)
                loops = [d for d in dirs if _links_up(os.path.join(root, d), real)]
                if loops:
                    logging.warning("%s: not following %s: a link to a folder that holds it", source_dir,
                                    ", ".join(os.path.relpath(os.path.join(root, d), source_dir) for d in loops))
                dirs[:] = sorted(d for d in dirs if not _is_hidden(d) and d not in loops)  # what os.walk enters
                for name in sorted(files):
                    path = os.path.relpath(os.path.join(root, name), source_dir)
                    if _is_hidden(name):
                        continue
                    if _is_image(name):
                        rows.append((path, (class_name,)))
                    else:
                        skipped.append(path)
        if skipped:  # a folder of another image format would otherwise train on part of its images in silence
            logging.warning("%s: skipped %d files in split %r not named %s: %s", source_dir, len(skipped), split,
                            "/".join(IMAGE_EXTENSIONS), _first_names(skipped))
        if loose:  # torchvision's ImageFolder skips them too, in silence
            logging.warning("%s: skipped %d images directly in split folder %r, of no class: %s; move each into "
                            "%s/<class>/", source_dir, len(loose), split, _first_names(loose), split_dir)
        if rows:
            _check_split_name(split, f"folder {split_dir}")
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


def read_names(path: str, kind: str) -> list[str]:
    """The names in `path`, one a line (blank lines skipped), as class ids in order; `DatasetError` naming the file,
    the name and its line numbers for a name listed twice (TFDS's ClassLabel would refuse it naming neither)."""
    names: list[str] = []
    lines: dict[str, list[int]] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            name = line.strip()
            if name:
                names.append(name)
                lines.setdefault(name, []).append(line_number)
    repeated = [name for name, numbers in lines.items() if len(numbers) > 1]
    if repeated:
        others = f" (and {len(repeated) - 1} more {kind} names listed twice)" if len(repeated) > 1 else ""
        raise DatasetError(f"{path}: {kind} name {repeated[0]!r} is listed on lines "
                           f"{', '.join(map(str, lines[repeated[0]]))}{others}: list each {kind} once (its position "
                           "is its id); delete the repeats")
    return names


def sorted_labels(names: Collection[str]) -> list[str]:
    """Label names as class ids: in numeric order when every one is an integer (so label 2 has id 2 when the labels
    are 0..N-1, not '10' after '1'), else in string order."""
    if names and all(_INTEGER.fullmatch(name) for name in names):
        return sorted(names, key=lambda name: (int(name), name))
    return sorted(names)


def _scan_records(source_dir: str, record_files: list[str]) -> FolderLayout:
    """The labelled-records layout: the JSONL `record_files` in `source_dir` (hidden ones, e.g. macOS's `._x.jsonl`,
    already left out), checked line by line; classes from classes.txt, else from the labels found."""
    examples: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    seen: dict[tuple[str, str], str] = {}  # (split, image path) -> file:line of its first record
    for file_name in sorted(record_files):
        split = _SHARD_SUFFIX.sub("", file_name[: -len(".jsonl")])
        path = os.path.join(source_dir, file_name)
        _check_split_name(split, f"records file {path}")
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
        class_names = read_names(classes_file, "class")
        unknown = sorted(found - set(class_names))
        if unknown:
            raise DatasetError(f"labels {unknown[:10]} (of {len(unknown)}) are not in {classes_file}; add them or "
                               "fix the records")
    else:
        class_names = sorted_labels(found)
    return FolderLayout(multi_label=True, class_names=tuple(class_names), examples=examples)


def scan_source(source_dir: str) -> FolderLayout:
    """Find the splits, images and labels under `source_dir` (either layout in the module docstring), skipping hidden
    entries and `__MACOSX`; `DatasetError` for a split name TFDS cannot read, before anything is written."""
    if not source_dir or not os.path.isdir(source_dir):
        raise DatasetError(f"image_folder needs the folder of your images as --manual_dir (config.tfds_manual_dir); "
                           f"{source_dir!r} is not a directory")
    record_files = [name for name in _listdir(source_dir) if name.endswith(".jsonl")]
    layout = _scan_records(source_dir, record_files) if record_files else _scan_folders(source_dir)
    if not layout.examples:
        flat = [name for name in _listdir(source_dir) if os.path.isdir(os.path.join(source_dir, name))
                and any(_is_image(f) for f in _listdir(os.path.join(source_dir, name)))]
        hint = (f"; {', '.join(flat[:3])}{' ...' if flat[3:] else ''} hold images directly, read as splits without "
                f"class folders: for class folders {source_dir}/<class>/<image>, move them under a split folder, "
                f"e.g. {source_dir}/train/<class>/<image>") if flat else ""
        raise DatasetError(f"no images found in {source_dir}: expected {source_dir}/<split>/<class>/<image> "
                           f"({', '.join(IMAGE_EXTENSIONS)}) or {source_dir}/<split>.jsonl records{hint}")
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


def _order_note(prepared: tuple[str, ...], now: tuple[str, ...]) -> str:
    """Why the same classes may now be in another order: integer labels were once in string order ('10' before '2'),
    and are now in numeric order (a copy prepared before keeps its ids, so it is not prepared again in silence)."""
    if list(prepared) == sorted(prepared) and list(now) == sorted_labels(now) != sorted(now):
        return " (integer labels are now in numeric order, the prepared copy has them in string order)"
    return ""


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
            now_names = self._layout.class_names
            added = [name for name in now_names if name not in names]
            gone = [name for name in names if name not in now_names]
            changes.append(f"classes: {len(names)} prepared, {len(now_names)} now"
                           + (f", new {added[:5]}" if added else "") + (f", gone {gone[:5]}" if gone else "")
                           + ("" if added or gone else ", in another order" + _order_note(names, now_names)))
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
