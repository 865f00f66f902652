"""`python -m vit_jax.predict --config=configs/demo.py --checkpoint=PATH [--json] IMAGE ...`: top-k labels.

Classifies JPEG/PNG (anything pillow reads) files of any size with a trained model and prints, per image, the
`--top_k` (default 5) most probable classes and their probabilities; with `--json`, one JSON object per image
and line: `{"image": PATH, "top_k": [{"label": NAME, "index": I, "prob": P}, ...]}`.

Images are preprocessed exactly as evaluation does (`vit_jax.data.preprocess`: the central
`pp.eval_crop_fraction` of each side, resized to `config.image_size` as `pp.antialias` says, values in
[-1, 1]); for phone photos many times `image_size`, `--config.pp.antialias=True` avoids aliasing. Probabilities are
a softmax over the classes (a sigmoid per class for `config.label_kind="multi"`, or when the training run of
an orbax checkpoint recorded that kind). Label names come from
`--labels` (a text file, one name per line) or else the config's dataset (its TFDS class names), else the
class index stands in. The checkpoint is a training workdir, its `checkpoints/` directory or anything else
`vit_jax.interop.load_pretrained` reads; its position embeddings are resized to `config.image_size` if needed
(a warning), its head is kept as trained. An orbax checkpoint's recorded run config gives the label kind; where
it evaluated with another `image_size`, `pp.eval_crop_fraction` or `pp.antialias`, a warning names the flag that
matches the run (the config's values are kept: another resolution may be wanted).

Images are read and classified `BATCH_SIZE` at a time (memory does not grow with their number); the
checkpoint is opened once a batch holds a readable image. A missing or unreadable file is one `error: PATH: ...` line
on stderr; the other images are still classified, and the exit code is 2.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags, logging
from flax import traverse_util
from ml_collections import config_flags

from vit_jax import cli, config_check, xla_options
from vit_jax.errors import UserError
from vit_jax.models.layers import LOW_PRECISION
from vit_jax.models.vit import build_model

DEFAULT_TOP_K = 5
BATCH_SIZE = 32  # images per forward pass: bounds memory, and one compiled shape serves every batch


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top classes of one image, most probable first: dicts {"label", "index", "prob"}."""

    image: str
    top_k: list[dict[str, Any]]

    def to_json(self) -> str:
        """One line: {"image": ..., "top_k": [{"label": ..., "index": ..., "prob": ...}, ...]}."""
        return json.dumps({"image": self.image, "top_k": self.top_k})

    def to_text(self) -> str:
        """The image's path, then one `probability  label` line per class."""
        lines = [self.image]
        for entry in self.top_k:
            index = "" if entry["label"] == str(entry["index"]) else f"  (class {entry['index']})"
            lines.append(f"  {100 * entry['prob']:6.2f}%  {entry['label']}{index}")
        return "\n".join(lines)


def read_image(path: str | pathlib.Path, image_size: int, crop_fraction: float = 1.0,
               antialias: bool = False) -> np.ndarray:
    """(image_size, image_size, 3) float32 in [-1, 1], preprocessed as evaluation does; bad files are `UserError`."""
    from vit_jax.data import preprocess  # imports grain/TFDS: only once images are read

    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass image files (e.g. {path}/*.jpg)")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror or e})") from e
    try:
        return preprocess.eval_pixels(preprocess.open_image(data), image_size, crop_fraction, antialias)
    except preprocess.CorruptImageError as e:
        detail = re.sub(r"\s*<_io\.BytesIO object at \w+>", "", " ".join(str(e).split()))  # no memory addresses
        raise UserError(f"{path}: not an image file pillow can read (JPEG, PNG, ...): {detail}") from e


def load_params(checkpoint: str, config: ml_collections.ConfigDict, source_format: str | None = None
                ) -> tuple[dict[str, Any], int]:
    """The trained params (position embeddings fitted to `config.image_size`) and their number of classes.

    The head is the checkpoint's own, whatever `config.num_classes` says: a new head would predict nothing.
    Sets the config's numerics (GELU, LayerNorm epsilon) to the weights' origin, as `load_pretrained` does.
    """
    from vit_jax import interop  # imported here: only this entry point needs the checkpoint readers

    problem = config_check.image_size_problem(config.image_size, config.model.patch_size)
    if problem:
        raise UserError(f"config.image_size={config.image_size!r} is invalid: {problem}")
    try:  # at the checkpoint's own resolution: fitting it to config.image_size is then ours to report
        params = interop.load_pretrained(checkpoint, config.model, source_format=source_format, require_head=True)
    except interop.MissingHeadError as e:
        raise UserError(f"--checkpoint={checkpoint}: has no classification head (a masked-patch-prediction "
                        "or feature-extractor checkpoint?); predict needs a fine-tuned classifier") from e
    return fit_position_embeddings(params, config, checkpoint), int(np.shape(params["head"]["kernel"])[-1])


def fit_position_embeddings(params: dict[str, Any], config: ml_collections.ConfigDict, checkpoint: str
                            ) -> dict[str, Any]:
    """`params` with position embeddings for `config.image_size`, resized from the checkpoint's own grid if it
    differs (bilinear, the class token's kept apart: what `load_pretrained` does) with a warning: a model
    classifying at a resolution it was not trained at can score worse, and predict logs only warnings."""
    from vit_jax import interop

    side, patch = interop.grid_side(params, checkpoint), config.model.patch_size
    wanted = config.image_size // patch
    if side == wanted:
        return params
    logging.warning("%s: resized its position embeddings from the %dx%d patch grid (%dpx, as it was trained) to "
                    "%dx%d for config.image_size=%d; --config.image_size=%d classifies at its own resolution",
                    checkpoint, side, side, side * patch, wanted, wanted, config.image_size, side * patch)
    encoder = params["Transformer"]
    posemb = np.asarray(encoder["posembed_input"]["pos_embedding"])
    resized = interop.resize_posemb(posemb, wanted, num_prefix_tokens=1 if "cls" in params else 0)
    return {**params, "Transformer": {**encoder, "posembed_input": {"pos_embedding": resized}}}


def read_labels_file(path: str, num_classes: int) -> list[str]:
    """Class names from a text file, one per line (line i names class i); must name every class."""
    try:
        names = [line.strip() for line in pathlib.Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--labels={path}: cannot read it as a UTF-8 text file ({e})") from e
    while names and not names[-1]:
        names.pop()
    blank = [number for number, name in enumerate(names, 1) if not name]
    if blank:  # it named a class '' and shifted every later name by one line
        more = f" (and {len(blank) - 1} more)" if blank[1:] else ""
        raise UserError(f"--labels={path}: line {blank[0]} is blank{more}: give one name per line, class 0 first, "
                        "with no blank lines between them")
    if len(names) != num_classes:
        raise UserError(f"--labels={path}: has {len(names)} names, but the checkpoint's head has {num_classes} "
                        "classes: give one name per line, class 0 first")
    return names


def dataset_label_names(config: ml_collections.ConfigDict, num_classes: int) -> list[str] | None:
    """Class names of `config.dataset` (its TFDS ClassLabel), or None if not available or of another count.

    Read from the prepared dataset (`vit_jax.data.datasets.load_builder`, which also builds `digits` on first
    use); for TFDS datasets not prepared here, from the builder's own metadata (no download).
    """
    import tensorflow_datasets as tfds

    from vit_jax.data import datasets

    try:
        builder = datasets.load_builder(config.dataset, config.tfds_data_dir, config.tfds_manual_dir)
    except UserError:
        if config.dataset in datasets.OWN_BUILDERS:
            return None
        try:
            builder = tfds.builder(config.dataset)  # metadata only: nothing is downloaded or prepared
        except (tfds.core.registered.DatasetNotFoundError, OSError, ValueError):
            return None
    label_key = (builder.info.supervised_keys or ("image", "label"))[1]
    features = builder.info.features
    feature = features[label_key] if label_key in features else None
    if isinstance(feature, tfds.features.Sequence):
        feature = feature.feature
    if not isinstance(feature, tfds.features.ClassLabel) or feature.num_classes != num_classes:
        return None
    return list(feature.names)


def make_classifier(model_config: ml_collections.ConfigDict, num_classes: int, label_kind: str = "single",
                    with_logits: bool = False) -> Callable[[Any, np.ndarray], Any]:
    """`probs(params, images)`, jitted: softmax over classes ("single") or a sigmoid per class ("multi").

    `with_logits`: `(probs, logits)`, the logits to rank by (float32 probabilities of 1.0 or 0.0 tie).
    """
    model = build_model(model_config, num_classes)

    @functools.partial(jax.jit, compiler_options=xla_options.compiler_options())
    def probabilities(params: Any, images: jax.Array) -> Any:
        logits = model.apply({"params": params}, images, train=False).astype(jnp.float32)
        probs = jax.nn.sigmoid(logits) if label_kind == "multi" else jax.nn.softmax(logits, axis=-1)
        return (probs, logits) if with_logits else probs

    return probabilities


_CAST_FOR_INFERENCE = ("Transformer", "embedding")  # pre_logits and the heads compute in float32


def cast_for_inference(params: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    """Unboxed `params` with the matmul kernels cast once to a bf16/f16 compute `dtype` (others unchanged).

    The model casts those float32 kernels to its compute dtype at every call (86M values per ViT-B/16 forward, ~10%
    of a bf16 forward on CPU); cast once, the results are the same bits. LayerNorm and the BiT trunk's weight
    standardisation compute in float32 from their float32 params, and so do `pre_logits` and the head, so only the
    kernels of the patch embedding and the encoder's Dense layers are cast.
    """
    params = nn.unbox(dict(params))
    dtype = jnp.dtype(dtype)
    if dtype not in LOW_PRECISION:
        return params
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({
        path: jnp.asarray(value, dtype) if path[0] in _CAST_FOR_INFERENCE and path[-1] == "kernel" else value
        for path, value in flat.items()})


def top_k(probs: np.ndarray, k: int, names: Sequence[str] | None = None,
          logits: np.ndarray | None = None) -> list[dict[str, Any]]:
    """The k most probable classes of one image's `probs`, most probable first, ranked by `logits` if given
    (probabilities saturated to the same float tie where logits do not); ties: lower index first."""
    scores = np.asarray(probs if logits is None else logits)
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"label": names[i] if names is not None else str(int(i)), "index": int(i), "prob": float(probs[i])}
            for i in order]


def make_predictor(config: ml_collections.ConfigDict, params: Mapping[str, Any], *, k: int = DEFAULT_TOP_K,
                   names: Sequence[str] | None = None, batch_size: int = BATCH_SIZE
                   ) -> Callable[[Sequence[tuple[str, np.ndarray]]], list[Prediction]]:
    """`predict_images(images)`: top-k predictions of `params` for named preprocessed images ((S, S, 3) in
    [-1, 1]), in their order, computed `batch_size` at a time (one compiled shape: the last batch is padded)."""
    params = cast_for_inference(params, config.model.dtype)  # unboxed too
    num_classes = int(np.shape(params["head"]["kernel"])[-1])
    classify = make_classifier(config.model, num_classes, config.label_kind, with_logits=True)

    def predict_images(images: Sequence[tuple[str, np.ndarray]]) -> list[Prediction]:
        predictions = []
        for start in range(0, len(images), batch_size):
            named = images[start:start + batch_size]
            chunk = np.stack([image for _, image in named]).astype(np.float32)
            padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], np.float32)])
            probs, logits = (np.asarray(x)[:len(chunk)] for x in classify(params, padded))
            predictions += [Prediction(name, top_k(p, k, names, scores))
                            for (name, _), p, scores in zip(named, probs, logits)]
        return predictions

    return predict_images


def predict(config: ml_collections.ConfigDict, params: Mapping[str, Any], images: Sequence[tuple[str, np.ndarray]],
            *, k: int = DEFAULT_TOP_K, names: Sequence[str] | None = None) -> list[Prediction]:
    """Top-k predictions of `params` for named preprocessed `images` ((S, S, 3) in [-1, 1]), in their order."""
    if not images:
        return []
    batch_size = min(BATCH_SIZE, len(images))
    return make_predictor(config, params, k=k, names=names, batch_size=batch_size)(images)


# What evaluation preprocesses with, as dotted config fields: a run's scores were measured with its own values.
_EVAL_PREPROCESSING = ("image_size", "pp.eval_crop_fraction", "pp.antialias")


def follow_recorded_run(config: ml_collections.ConfigDict, checkpoint: str, source_format: str | None = None) -> None:
    """Compare `config` with the run config the training run of an orbax `checkpoint` recorded (other formats
    record none): adopt its `label_kind` (a sigmoid run's logits read through a softmax rank the same but give
    other probabilities), and warn where this config preprocesses otherwise (`recorded_preprocessing_differences`)
    — not adopted: another resolution or crop may be what the user wants."""
    from vit_jax import interop

    recorded = interop.recorded_run_config(checkpoint, source_format)
    config_check.adopt_recorded_label_kind(config, recorded, checkpoint)
    for difference in recorded_preprocessing_differences(config, recorded):
        logging.warning("%s: %s", checkpoint, difference)


def _dotted_get(tree: Any, field: str) -> Any:
    """`tree`'s value at a dotted `field` ("pp.antialias") of a ConfigDict or a dict; None where it has none."""
    for key in field.split("."):
        tree = tree.get(key) if hasattr(tree, "get") else None
    return tree


def recorded_preprocessing_differences(config: ml_collections.ConfigDict, recorded: Mapping[str, Any]) -> list[str]:
    """One line per evaluation-preprocessing field (`_EVAL_PREPROCESSING`) where `config` differs from the
    `recorded` run config (a dict): both values, and the flag that matches the run. Fields the run did not
    record are skipped."""
    lines = []
    for field in _EVAL_PREPROCESSING:
        trained, current = _dotted_get(recorded, field), _dotted_get(config, field)
        if trained is not None and trained != current:
            lines.append(f"the training run evaluated with {field}={trained!r}, this config has {current!r}; "
                         f"pass --config.{field}={trained} to preprocess as the run did")
    return lines


def _define_flags() -> None:
    """Flags of the command; defined only when run as a program, so importing this module defines none."""
    config_flags.DEFINE_config_file("config", None, "Config file the model was trained with, e.g. configs/demo.py.",
                                    lock_config=True)
    flags.DEFINE_string("checkpoint", None, "A training workdir, its checkpoints/ dir, or any checkpoint "
                                            "vit_jax.interop reads (.npz, timm/HF weights, orbax).")
    flags.DEFINE_string("source_format", None, "Checkpoint format, if its contents do not tell (see vit_jax.interop).")
    flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "How many classes to show per image.")
    flags.DEFINE_bool("json", False, "One JSON object per image and line instead of text.")
    flags.DEFINE_string("labels", None, "Text file of class names, one per line (default: the dataset's names).")
    flags.mark_flags_as_required(["config", "checkpoint"])


def check_source_format(value: str | None) -> None:
    """--source_format must be a format `vit_jax.interop` reads (checked before the checkpoint: the readers' error
    for it would be taken for one about the checkpoint)."""
    from vit_jax import interop

    if value is not None and value not in ("auto", *interop.SOURCE_FORMATS):
        raise UserError(f"--source_format={value} is invalid: expected one of {', '.join(interop.SOURCE_FORMATS)} "
                        "(or leave it out: detected from the checkpoint)")


def _load_predictor(config: ml_collections.ConfigDict, batch_size: int
                    ) -> Callable[[Sequence[tuple[str, np.ndarray]]], list[Prediction]]:
    """The command's predictor: the checkpoint's params, its run's label kind, and class names from
    `--labels` or the dataset."""
    checkpoint, source_format = cli.checkpoint_path(flags.FLAGS.checkpoint), flags.FLAGS.source_format
    with cli.checkpoint_errors(checkpoint):  # the readers' errors name the path: say it is --checkpoint's
        follow_recorded_run(config, checkpoint, source_format)
        params, num_classes = load_params(checkpoint, config, source_format)
    if flags.FLAGS.labels:
        names = read_labels_file(cli.local_path(flags.FLAGS.labels), num_classes)
    else:
        names = dataset_label_names(config, num_classes)
        if names is None and num_classes != config.num_classes:
            print(f"note: the checkpoint has {num_classes} classes, config.dataset={config.dataset!r} has "
                  f"{config.num_classes}: printing class indices (--labels=FILE names them)", file=sys.stderr)
        elif names is None:
            logging.info("no class names for dataset %r with %d classes: printing class indices",
                         config.dataset, num_classes)
    return make_predictor(config, params, k=min(flags.FLAGS.top_k, num_classes), names=names,
                          batch_size=batch_size)


def main(argv: Sequence[str]) -> None:
    config = flags.FLAGS.config
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # the predictions, not the checkpoint readers' progress
    config_check.validate_model(config.model, config.image_size)
    config_check.validate_eval_crop(config.pp)
    config_check.validate_label_kind(config)  # anything but "multi" was read as a softmax
    if flags.FLAGS.top_k < 1:
        raise UserError(f"--top_k={flags.FLAGS.top_k}: expected a positive integer")
    cli.checkpoint_path(flags.FLAGS.checkpoint)  # an empty one is refused before any image is read
    check_source_format(flags.FLAGS.source_format)
    paths = argv[1:]
    if not paths:
        raise UserError("no IMAGE given: pass one or more image files after the flags")
    predict_images, failures = None, []
    for start in range(0, len(paths), BATCH_SIZE):  # decoded a batch at a time: memory stays bounded
        images = []
        for path in paths[start:start + BATCH_SIZE]:
            try:
                images.append((path, read_image(path, config.image_size, config.pp.eval_crop_fraction,
                                                config.pp.antialias)))
            except UserError as e:
                failures.append(path)
                print(f"error: {e}", file=sys.stderr, flush=True)
        if images and predict_images is None:  # the checkpoint is opened once an image is readable
            predict_images = _load_predictor(config, min(BATCH_SIZE, len(paths)))
        for prediction in predict_images(images) if images else ():
            print(prediction.to_json() if flags.FLAGS.json else prediction.to_text(), flush=True)
    if failures:
        raise UserError(f"{len(failures)} of {len(paths)} images could not be read: {', '.join(failures)}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
