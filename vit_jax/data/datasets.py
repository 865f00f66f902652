"""Dataset registry: a config's `dataset` name -> a prepared TFDS builder, its splits, classes and label kind.

Names are TFDS names (`imagenet2012`, `cifar10`, `cifar100`, `oxford_iiit_pet`, `oxford_flowers102`, any other)
or one of ours (`digits`, `imagenet21k`, `image_folder`, see builders/). Everything is read from
`config.tfds_data_dir` as ArrayRecord (what `tfds.data_source` and grain read). `digits` is built there on first
use (it needs no download); every other dataset is prepared once with `python -m vit_jax.data.prepare`, and a
missing one is a `DatasetError` that says where it was looked for and the exact command to prepare it.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import shlex

import ml_collections
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder, naming

from vit_jax.data.builders import image_folder
from vit_jax.data.builders.digits import Digits
from vit_jax.data.builders.image_folder import ImageFolder
from vit_jax.data.builders.imagenet21k import Imagenet21k
from vit_jax.data.errors import DatasetError
from vit_jax.errors import storage_failure

OWN_BUILDERS = {"digits": Digits, "imagenet21k": Imagenet21k, "image_folder": ImageFolder}
BUILT_ON_FIRST_USE = ("digits",)
LABEL_KINDS = ("single", "multi")
# What the manual_dir of TFDS datasets that cannot be downloaded must hold, and where those files come from.
MANUAL_FILES = {"imagenet2012": (("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"), "image-net.org"),
                "imagenet2012_real": (("ILSVRC2012_img_val.tar",), "image-net.org")}  # + ReaL labels, downloaded
ARRAY_RECORD = "array_record"
# What a namespace's builder needs besides the network.
_NAMESPACE_NEEDS = {"huggingface": ", and `huggingface:` needs Hugging Face's `datasets` (pip install datasets)"}
# TFDS's ValueError when a builder is asked for ArrayRecord where the dataset was prepared in another format.
_OTHER_FORMAT = re.compile(r"File format is already set to FileFormat\.(\w+)")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about the configured dataset."""

    name: str
    data_dir: str  # the prepared dataset's directory (DATA_DIR/name/version)
    num_train_examples: int
    num_eval_examples: int
    num_classes: int
    label_kind: str  # "single" (one class per image) or "multi" (one or more: multi-hot)
    image_key: str
    label_key: str


def resolve_data_dir(data_dir: str) -> str:
    """`config.tfds_data_dir`, or TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets) when empty."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR)


def prepare_command(name: str, data_dir: str, manual_dir: str = "") -> str:
    """The exact shell command that prepares `name` into `data_dir` in the format grain reads."""
    args = ["python", "-m", "vit_jax.data.prepare", f"--dataset={name}", f"--data_dir={resolve_data_dir(data_dir)}"]
    if manual_dir or name in ("imagenet21k", "image_folder") or name in MANUAL_FILES:
        args.append(f"--manual_dir={manual_dir or '/path/to/downloads'}")
    return shlex.join(args)


def _manual_files(name: str) -> str:
    """'A and B from SOURCE': the files `name`'s manual_dir must hold."""
    files, source = MANUAL_FILES[name]
    return f"{' and '.join(files)} from {source}"


def _needs_manual(name: str) -> str:
    if name == "imagenet21k" or name == "image_folder":
        return f" ({name} is prepared from local files: see vit_jax/data/builders/{name}.py for the layout)"
    if name in MANUAL_FILES:
        return f" (--manual_dir must hold {_manual_files(name)})"
    return ""


def _prepared_as(name: str, where: str, file_format: str, data_dir: str, manual_dir: str = "") -> DatasetError:
    """The error for a dataset prepared in another file format (`tfds build` writes TFRecord by default)."""
    return DatasetError(f"dataset {name!r} at {where} was prepared as {file_format}, but grain reads {ARRAY_RECORD}; "
                        f"remove that directory (or choose another data_dir) and prepare it again with: "
                        f"{prepare_command(name, data_dir, manual_dir)}")


def _other_format(error: ValueError) -> str | None:
    found = _OTHER_FORMAT.search(str(error))
    return found.group(1).lower() if found else None


def _namespace(name: str) -> str | None:
    try:
        return naming.parse_builder_name_kwargs(name)[0].namespace
    except ValueError:  # TFDS's own error for the name follows from tfds.builder
        return None


def _did_you_mean(key: str) -> str:
    """"; did you mean [...]?" naming up to three of our and TFDS's dataset names close to `key`, or ""."""
    close = difflib.get_close_matches(key, list(OWN_BUILDERS) + list(tfds.list_builders()), n=3)
    return f"; did you mean {close}?" if close else ""


def _not_a_name(name: str, error: BaseException) -> DatasetError:
    """The error for a `config.dataset` TFDS cannot parse as name[/config][:x.y.z] (a typo, a space, a path)."""
    hint = _did_you_mean(name.strip().split(":")[0].split("/")[0])
    path = (" (a directory of prepared datasets is config.tfds_data_dir / --data_dir)"
            if "/" in name and os.path.isdir(os.path.expanduser(name)) else "")
    detail = " ".join(str(error).split())[:200]
    return DatasetError(f"config.dataset={name!r} is not a dataset name of the form name[/config][:x.y.z]{hint}"
                        f"{path} ({type(error).__name__}: {detail})")


def _tfds_builder(name: str, data_dir: str, manual_dir: str = "") -> tfds.core.DatasetBuilder:
    namespace = _namespace(name)
    try:
        return tfds.builder(name, data_dir=data_dir, file_format=ARRAY_RECORD)
    except tfds.core.registered.DatasetNotFoundError:  # a ValueError too: caught first
        base = name.split(":")[0].split("/")[0]
        if base in OWN_BUILDERS:  # ours with a version or config ('digits:1.0.0'), which they do not take
            raise DatasetError(f"config.dataset={name!r}: {base!r} is one of our datasets, which take no version or "
                               f"config; use config.dataset={base!r}") from None
        raise DatasetError(f"config.dataset={name!r} is neither a TFDS dataset nor one of ours "
                           f"{sorted(OWN_BUILDERS)}{_did_you_mean(name.split(':')[0])}") from None
    except TypeError as e:  # a config written as key=value (cifar10/k=v) reaches the builder's constructor
        raise _not_a_name(name, e) from None
    except (ValueError, AssertionError) as e:  # TFDS asserts a version it does not know
        file_format = _other_format(e) if isinstance(e, ValueError) else None
        if file_format is None:
            unknown = _unknown_config_or_version(name)
            if unknown is None:
                raise _not_a_name(name, e) from None
            raise unknown from None
        where = tfds.builder(name, data_dir=data_dir, file_format=file_format).data_dir
        raise _prepared_as(name, str(where), file_format, data_dir, manual_dir) from None
    except Exception as e:  # noqa: BLE001 (a namespace's builder: network or package errors of any type)
        if namespace is None:
            raise
        cause = f"{type(e).__name__}: {e}"
        if e.__cause__ is not None and str(e.__cause__) != str(e):  # TFDS wraps the network's error
            cause += f" ({type(e.__cause__).__name__}: {e.__cause__})"
        raise DatasetError(f"config.dataset={name!r}: TFDS could not make the builder of this namespaced dataset "
                           f"({namespace!r}): {cause}. TFDS looks namespaced datasets up over the network, to prepare "
                           f"and to read them{_NAMESPACE_NEEDS.get(namespace, '')}. Offline, use a TFDS dataset "
                           "(tfds.list_builders()) or your own images with config.dataset='image_folder'") from e


def _unknown_config_or_version(name: str) -> DatasetError | None:
    """The error for `name/config:version` naming a config or version its TFDS dataset does not have, listing
    the ones it has; None when both are fine or cannot be checked (the caller's error is another)."""
    if "=" in name:  # builder keyword arguments (`name/config:1.0.0/k=v`): TFDS's own error says more
        return None
    base, _, version = name.partition(":")
    base, _, config = base.partition("/")
    try:
        cls = tfds.builder_cls(base)
    except Exception:  # noqa: BLE001 (a namespaced or community dataset: the caller's error says more)
        return None
    names = list(dict.fromkeys(c.name for c in cls.BUILDER_CONFIGS))
    if config and config not in names:
        valid = f"its configs: {names}, written '{base}/<config>'" if names else f"it has none: write {base!r}"
        return DatasetError(f"config.dataset={name!r}: TFDS dataset {base!r} has no config {config!r} ({valid})")
    if not version:
        return None
    # A version can live on the config (eurosat's, coco's) or on the class.
    chosen = [c for c in cls.BUILDER_CONFIGS if c.name == config] if config else [cls.default_builder_config]
    known: list[str] = []
    for builder_config in chosen or [None]:
        supported = (builder_config.supported_versions if builder_config and builder_config.supported_versions
                     else cls.SUPPORTED_VERSIONS) or []
        try:
            canonical = [dataset_builder.canonical_version_for_config(cls, builder_config)]
        except ValueError:
            canonical = []
        known += [str(v) for v in (*canonical, *supported) if v and str(v) not in known]
    if not known:
        return None
    try:
        matched = any(tfds.core.Version(v).match(version) for v in known)
    except ValueError:  # not x.y.z
        return DatasetError(f"config.dataset={name!r}: {version!r} is not a version: write x.y.z, each a number or * "
                            f"({base!r} has {known})")
    if matched:
        return None
    return DatasetError(f"config.dataset={name!r}: TFDS dataset {base!r} has no version {version!r} (its "
                        f"versions: {known}; or leave the version out for the latest)")


def _exists(path: str) -> bool:
    """Whether `path` exists: a local path (os.stat; DatasetError when that cannot be told), or gs:// (any
    tf.io.gfile URI), where TFDS and ArrayRecord read too."""
    if "://" not in path:
        try:
            os.stat(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:  # no permission, a symlink loop: not "missing", which would say to prepare it
            raise DatasetError(f"{path}: cannot check whether it exists ({e.strerror or e})") from None
    import tensorflow as tf

    try:
        return tf.io.gfile.exists(path)
    except tf.errors.OpError as e:  # a bucket this machine may not read, no network
        raise DatasetError(f"{path}: cannot check whether it exists ({type(e).__name__}: {e.message})") from e


def _own_builder_dir(name: str, data_dir: str) -> str:
    return os.path.join(data_dir, name, str(OWN_BUILDERS[name].VERSION))


def _check_writable_data_dir(data_dir: str) -> None:
    """A local data dir datasets can be written into (created if missing), else a `DatasetError` saying why."""
    where = f"--data_dir={data_dir} (config.tfds_data_dir)"
    try:
        os.makedirs(data_dir, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{where}: cannot create it ({e.strerror or e}); choose a writable directory") from None
    if not os.access(data_dir, os.W_OK):
        raise DatasetError(f"{where} is not writable: choose a directory datasets can be written into")


def prepare(name: str, data_dir: str, manual_dir: str = "") -> str:
    """Build dataset `name` into `data_dir` as ArrayRecord (downloading if TFDS can); returns its directory."""
    data_dir = resolve_data_dir(data_dir)
    # A shell leaves `~` in --manual_dir=~/x alone; TFDS expands it for its own builders, ours need it done here.
    manual_dir = os.path.expanduser(manual_dir) if manual_dir and "://" not in manual_dir else manual_dir
    if "://" not in data_dir and os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DatasetError(f"--data_dir={data_dir} (config.tfds_data_dir) is a file, not a directory: give the "
                           "directory datasets are written into")
    if name in MANUAL_FILES:
        # Without --manual_dir TFDS looks in DATA_DIR/downloads/manual.
        where = manual_dir or os.path.join(data_dir, "downloads", "manual")
        missing = [f for f in MANUAL_FILES[name][0] if not _exists(os.path.join(where, f))]
        if missing:
            given = f"--manual_dir={manual_dir}" if manual_dir else f"TFDS's default manual directory {where}"
            raise DatasetError(f"{name} is prepared from files you download yourself, and {given} does not hold "
                               f"{' or '.join(missing)}: put {_manual_files(name)} in a directory and run: "
                               f"{prepare_command(name, data_dir, manual_dir or '/path/to/downloads')}")
    if name not in OWN_BUILDERS:
        builder = _tfds_builder(name, data_dir, manual_dir)
    else:
        try:
            if name == "digits":
                builder = Digits(data_dir=data_dir, file_format=ARRAY_RECORD)
            elif name == "imagenet21k":
                builder = Imagenet21k(manual_dir=manual_dir, data_dir=data_dir, file_format=ARRAY_RECORD)
            else:
                builder = ImageFolder(source_dir=manual_dir, data_dir=data_dir, file_format=ARRAY_RECORD)
        except ValueError as e:  # an earlier preparation in another format, as _tfds_builder finds for TFDS's
            file_format = _other_format(e)
            if file_format is None:
                raise
            raise _prepared_as(name, _own_builder_dir(name, data_dir), file_format, data_dir, manual_dir) from None
        prepared_dir = _own_builder_dir(name, data_dir)
        if name == "image_folder" and _exists(os.path.join(prepared_dir, "dataset_info.json")):
            builder.check_prepared(tfds.builder_from_directory(prepared_dir))  # TFDS would reuse it as it is
    if "://" not in data_dir:
        _check_writable_data_dir(data_dir)  # created now, once every other check passed
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
    try:
        builder.download_and_prepare(file_format=ARRAY_RECORD, download_config=download_config)
    except Exception as e:  # TFDS and ArrayRecord report a full disk as a RuntimeError naming the split
        cause = storage_failure(e, any_os_error=False)
        if cause is None:
            raise
        raise DatasetError(f"could not write {name} into {builder.data_dir}: {cause}; free space (or fix "
                           f"permissions) and run again: {prepare_command(name, data_dir, manual_dir)}") from e
    return str(builder.data_dir)


def _check_image_folder_source(builder: tfds.core.DatasetBuilder, manual_dir: str) -> None:
    """The prepared image folder must be `manual_dir` (it records its source); one prepared before the source was
    recorded cannot be checked, and is used with a warning."""
    source_dir = os.path.expanduser(manual_dir)
    if image_folder.recorded_source(builder) is None:
        logging.warning("image_folder at %s was prepared before vit_jax recorded source folders: cannot check that it "
                        "holds the images of config.tfds_manual_dir=%s (delete it and prepare again to check)",
                        builder.data_dir, source_dir)
    else:
        image_folder.check_source(builder, source_dir)


def load_builder(name: str, data_dir: str, manual_dir: str = "") -> tfds.core.DatasetBuilder:
    """The prepared ArrayRecord builder of `name`; builds `digits` on first use, else raises `DatasetError`."""
    data_dir = resolve_data_dir(data_dir)
    if name in OWN_BUILDERS:
        builder_dir = _own_builder_dir(name, data_dir)
        if not _exists(os.path.join(builder_dir, "dataset_info.json")):
            if name in BUILT_ON_FIRST_USE:
                try:
                    prepare(name, data_dir)
                except OSError:
                    # Another process on this machine may have finished the same build first.
                    if not _exists(os.path.join(builder_dir, "dataset_info.json")):
                        raise
            else:
                raise DatasetError(f"dataset {name!r} is not prepared: looked for {builder_dir}. Prepare it with: "
                                   f"{prepare_command(name, data_dir, manual_dir)}{_needs_manual(name)}")
        builder = tfds.builder_from_directory(builder_dir)
        if name == "image_folder" and manual_dir:
            _check_image_folder_source(builder, manual_dir)
    else:
        builder = _tfds_builder(name, data_dir, manual_dir)
        if not builder.is_prepared():
            raise DatasetError(f"dataset {name!r} is not prepared: looked for {builder.data_dir}. Prepare it with: "
                               f"{prepare_command(name, data_dir, manual_dir)}{_needs_manual(name)}")
    if builder.info.file_format is not None and builder.info.file_format.value != ARRAY_RECORD:
        raise _prepared_as(name, str(builder.data_dir), builder.info.file_format.value, data_dir, manual_dir)
    return builder


def _label_kind_and_classes(feature, name: str, label_key: str) -> tuple[str, int]:
    if isinstance(feature, tfds.features.ClassLabel):
        return "single", feature.num_classes
    if isinstance(feature, tfds.features.Sequence) and isinstance(feature.feature, tfds.features.ClassLabel):
        return "multi", feature.feature.num_classes
    raise DatasetError(f"dataset {name!r}: feature {label_key!r} is {feature!r}, not a class label or a sequence "
                       "of class labels")


def _keys_and_labels(builder: tfds.core.DatasetBuilder, name: str) -> tuple[str, str, str, int]:
    """(image key, label key, "single" or "multi", class count) of a prepared dataset, from its features."""
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    features = builder.info.features
    if image_key not in features or label_key not in features:
        raise DatasetError(f"dataset {name!r} has features {sorted(features)}, expected an image and a label")
    return (image_key, label_key, *_label_kind_and_classes(features[label_key], name, label_key))


def manual_dir_for(config: ml_collections.ConfigDict, name: str) -> str:
    """`config.tfds_manual_dir` when `name` is the run's dataset, else "": the manual dir is that dataset's source
    (an image folder's is checked against it), and another dataset (a few-shot task, an extra evaluation) is read
    as it was prepared."""
    return config.tfds_manual_dir if name == config.dataset else ""


def label_classes(name: str, data_dir: str, manual_dir: str = "") -> tuple[str, int]:
    """("single" or "multi", class count) of prepared dataset `name`, read from its features."""
    _, _, kind, num_classes = _keys_and_labels(load_builder(name, data_dir, manual_dir), name)
    return kind, num_classes


def split_size(builder: tfds.core.DatasetBuilder, split: str, field: str) -> int:
    """Examples in `split` (TFDS split syntax such as `train[:98%]`); a bad split names the valid ones."""
    try:
        size = builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
        raise DatasetError(f"config.{field}={split!r} is not a split of {builder.name} at {builder.data_dir} "
                           f"(splits: {sorted(builder.info.splits)}; slices like 'train[:98%]' work): {e}") from None
    if size <= 0:  # a reversed slice, 'test[50:10]', counts negative; 'test[99.9%:]' of a small split rounds to 0
        sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
        raise DatasetError(f"config.{field}={split!r} of {builder.name} at {builder.data_dir} has no examples "
                           f"(split sizes: {sizes}); choose a non-empty split or slice (a slice's start comes "
                           "before its end, and a percentage of a small split rounds to whole examples)")
    return size


def shared_examples(builder: tfds.core.DatasetBuilder, split: str, other: str) -> int:
    """How many examples two split specs (TFDS syntax: `train[:90%]`, `train[80%:]+test`) have in common."""
    def ranges(spec: str) -> list[tuple[str, int, int]]:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits)
        return [(i.splitname, i.from_ or 0, builder.info.splits[i.splitname].num_examples if i.to is None else i.to)
                for i in instructions]

    return sum(max(0, min(stop, other_stop) - max(start, other_start))
               for name, start, stop in ranges(split) for other_name, other_start, other_stop in ranges(other)
               if name == other_name)


def dataset_info_from_builder(builder: tfds.core.DatasetBuilder, name: str, train_split: str | None,
                              eval_split: str, num_classes: int, label_kind: str) -> DatasetInfo:
    """Check the config's class count and label kind against the prepared dataset and describe it.

    `train_split` None: only the eval split is checked (evaluation), and `num_train_examples` is 0; a single-label
    (softmax) model may then be scored on a multi-label set, as on ImageNet ReaL (a top-1 in the set is right).
    """
    image_key, label_key, kind, found_classes = _keys_and_labels(builder, name)
    if num_classes != found_classes:
        raise DatasetError(f"config.num_classes={num_classes} but dataset {name!r} has {found_classes} classes; "
                           f"set --config.num_classes={found_classes}")
    if label_kind not in LABEL_KINDS:
        raise DatasetError(f"config.label_kind={label_kind!r} is invalid: expected one of {LABEL_KINDS}")
    if kind == "multi" and label_kind == "single" and train_split is not None:  # a softmax model may be scored
        raise DatasetError(f"dataset {name!r} has one or more labels per image ({label_key!r}); set "
                           "--config.label_kind=multi (multi-hot labels, sigmoid loss)")
    info = DatasetInfo(name=name, data_dir=str(builder.data_dir),
                       num_train_examples=0 if train_split is None else split_size(builder, train_split,
                                                                                    "train_split"),
                       num_eval_examples=split_size(builder, eval_split, "eval_split"),
                       num_classes=found_classes, label_kind=label_kind, image_key=image_key, label_key=label_key)
    shared = 0 if train_split is None else shared_examples(builder, train_split, eval_split)
    if shared:  # allowed (a training-set score is a check of its own), but the score is then not a test score
        logging.warning("config.eval_split=%r and config.train_split=%r of %s share %d examples (of %d evaluated): "
                        "the evaluation scores images the model trains on", eval_split, train_split, name, shared,
                        info.num_eval_examples)
    return info


def dataset_info(config: ml_collections.ConfigDict, train: bool = True) -> DatasetInfo:
    """Sizes, classes and label kind of `config.dataset`, checked against the config (see `DatasetInfo`);
    `train=False` (evaluation) checks the eval split only."""
    builder = load_builder(config.dataset, config.tfds_data_dir, config.tfds_manual_dir)
    return dataset_info_from_builder(builder, config.dataset, config.train_split if train else None,
                                     config.eval_split, config.num_classes, config.label_kind)


class LabeledSource:
    """Random access to a split as {"image": encoded bytes, "label": int | int array, "index": int}.

    Images are not decoded here (grain workers decode them with pillow, and skip corrupt ones), and the other
    images an example holds are never decoded (oxford_iiit_pet's segmentation mask would double each read's
    decoding); picklable, so grain's worker processes can each open it.
    """

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, image_key: str, label_key: str):
        # (A Video feature cannot be skipped: TFDS decodes it in a batch call that SkipDecoding lacks.)
        skipped = [key for key, feature in builder.info.features.items()
                   if key == image_key or isinstance(feature, tfds.features.Image)]
        self._source = builder.as_data_source(split=split, decoders={k: tfds.decode.SkipDecoding() for k in skipped})
        self._image_key = image_key
        self._label_key = label_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        example = self._source[index]
        return {"image": example[self._image_key], "label": example[self._label_key], "index": index}

    def __repr__(self) -> str:
        return f"LabeledSource({self._source!r})"


def open_split(config: ml_collections.ConfigDict, split: str, *, train: bool = False
               ) -> tuple[LabeledSource, DatasetInfo]:
    """A random-access source over `split` of `config.dataset` and the dataset's checked description; `train`:
    checked as the training split (a single-label run may evaluate on a multi-label set, not train on one)."""
    builder = load_builder(config.dataset, config.tfds_data_dir, config.tfds_manual_dir)
    train_split = split if train else None  # evaluating reads no other split
    info = dataset_info_from_builder(builder, config.dataset, train_split, config.eval_split,
                                     config.num_classes, config.label_kind)
    return LabeledSource(builder, split, info.image_key, info.label_key), info

