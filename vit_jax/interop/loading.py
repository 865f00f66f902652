"""`load_pretrained` and `save_as`: any supported checkpoint -> our params, and our params -> any format.

Sources: official / big_vision `.npz`; timm or HF weights (`.safetensors`, `.bin`, `.pth`, or an HF model
directory with `config.json`), told apart by their key names; our own orbax checkpoints. Loading adapts the
checkpoint to the target model (new head, resized position embeddings, dropped pre-logits; each logged) and
sets the model config's numerics (GELU flavour, LayerNorm eps) to those the weights were trained with.
Paths may be remote (gs://...): read from a cached local copy, written through a temporary one (`remote`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Iterator
from typing import Any

import ml_collections
from absl import logging

from vit_jax import config_check
from vit_jax.errors import storage_failure
from vit_jax.interop import npz, orbax_io, remote, surgery, torch_hub
from vit_jax.interop.common import (
    OFFICIAL_NUMERICS,
    POSEMB_KEY,
    TIMM_NUMERICS,
    CheckpointError,
    Flat,
    MissingHeadError,
    Numerics,
    canonical_to_params,
    check_matches,
    expected_shapes,
    params_to_canonical,
    posemb_sincos_2d,
    with_class_token_slot,
)

SOURCE_FORMATS = ("npz", "timm", "hf", "orbax")
TARGET_FORMATS = ("orbax", "npz", "timm", "hf")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read into the canonical layout, before it is fitted to a model."""

    flat: Flat
    source_format: str  # one of SOURCE_FORMATS
    numerics: Numerics | None  # None: the source does not say (an orbax checkpoint without a recorded config)
    location: str  # the file or directory actually read


def detect_format(path: str) -> str:
    """'npz', 'timm', 'hf' or 'orbax' from the file's contents (magic bytes, archive members, key names)."""
    return _read(path, None, num_heads=None).source_format


def read_checkpoint(path: str, num_heads: int, source_format: str | None = None) -> Checkpoint:
    """Read any supported checkpoint into canonical flat params (`num_heads` splits fused torch projections)."""
    return _read(path, source_format, num_heads)


def _read(path: str, source_format: str | None, num_heads: int | None) -> Checkpoint:
    path = os.fspath(path)
    if source_format not in (None, "auto") + SOURCE_FORMATS:
        raise CheckpointError(f"source_format must be one of {SOURCE_FORMATS} (or None to detect), "
                              f"got {source_format!r}")
    with _from_local_copy(path) as local:
        ckpt = _read_local(local, source_format, num_heads)
    if local != path:
        ckpt.location = f"{path} (copied to {ckpt.location})"
        ckpt.numerics = _named_remotely(ckpt.numerics, local, path)
    return ckpt


def _named_remotely(numerics: Numerics | None, local: str, path: str) -> Numerics | None:
    """`numerics` with the remote path in its origin where it names the local copy."""
    if numerics is None:
        return numerics
    return dataclasses.replace(numerics, origin=numerics.origin.replace(local, path))


@contextlib.contextmanager
def _from_local_copy(path: str) -> Iterator[str]:
    """A local path for `path` (`remote.local_copy`); errors about the copy name the remote path too."""
    local = remote.local_copy(path)
    try:
        yield local
    except CheckpointError as e:
        if local == path:
            raise
        raise CheckpointError(f"{path} (copied to {local}): {e}") from e


def _reads_as_orbax(path: str, source_format: str | None) -> bool:
    """Whether the local `path` is read as our orbax checkpoint: asked for (a file is then an error), or detected."""
    if source_format == "orbax" and os.path.isfile(path):  # it was a NotADirectoryError traceback
        raise CheckpointError(f"{path}: the orbax format was asked for, but this is a file; an orbax checkpoint is a "
                              "directory (a workdir, its checkpoints/ or one step): ask for the file's own format "
                              "(npz, timm, hf) or leave it to be detected")
    return source_format == "orbax" or (source_format in (None, "auto") and orbax_io.is_orbax_dir(path))


def _read_local(path: str, source_format: str | None, num_heads: int | None) -> Checkpoint:
    orbax_io.split_item(path)  # a step's "ema" item its run did not keep: an error saying so
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if _reads_as_orbax(path, source_format):
        flat, numerics, step_dir = orbax_io.read_orbax(path)
        return Checkpoint(flat, "orbax", numerics, step_dir)
    weights_path, config_path = _weights_and_config(path)
    kind = _file_kind(weights_path) if source_format in (None, "auto") else None
    if (source_format == "npz" or kind == "npz") and num_heads is None:  # format detection only
        return Checkpoint({}, "npz", OFFICIAL_NUMERICS, weights_path)
    if source_format == "npz" or kind == "npz":
        return Checkpoint(npz.to_canonical(npz.read_npz(weights_path), weights_path), "npz", OFFICIAL_NUMERICS,
                          weights_path)
    if num_heads is None:  # format detection only: the key names suffice
        return Checkpoint({}, _torch_flavour(weights_path, source_format), None, weights_path)
    state = torch_hub.read_state_dict(weights_path)
    flavour = source_format if source_format in ("timm", "hf") else torch_hub.flavour_of(state, weights_path)
    if flavour == "timm":
        flat = torch_hub.timm_to_canonical(state, num_heads, weights_path, config_path)
    else:
        flat = torch_hub.hf_to_canonical(state, num_heads, weights_path)
    transform = torch_hub.input_transform(config_path, flavour)
    if transform is not None and not transform.is_identity():
        flat = surgery.fold_input_transform(flat, transform.scale, transform.shift, weights_path)
        logging.info("%s: trained on inputs normalised as its %s says: folded into the patch embedding, which "
                     "now takes vit_jax's [-1, 1] images and computes what it computed at home", weights_path,
                     transform.origin)
    return Checkpoint(flat, flavour, _torch_numerics(weights_path, config_path, flavour, num_heads), weights_path)


def _weights_and_config(path: str) -> tuple[str, str | None]:
    """(weights file, its config.json or None) of a local path: an HF model directory (or timm hub download,
    which looks the same) gives both; a file, itself and the config.json beside it, if any."""
    if os.path.isdir(path):
        return torch_hub.hf_dir_files(path)
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    return path, beside if os.path.isfile(beside) else None


def _torch_numerics(weights_path: str, config_path: str | None, flavour: str, num_heads: int | None) -> Numerics:
    """The numerics of timm or HF weights (checking `num_heads`, when given, against whatever records it): one
    rule for loading and for `source_numerics`, so both set the same GELU flavour and eps."""
    if flavour == "timm":
        return torch_hub.timm_numerics(weights_path, config_path, num_heads)
    return torch_hub.hf_numerics(config_path, num_heads, weights_path)


def _torch_flavour(path: str, source_format: str | None) -> str:
    """'timm' or 'hf': the one asked for, else told from the key names (a safetensors file's header only)."""
    if source_format in ("timm", "hf"):
        return source_format
    return torch_hub.flavour_of(torch_hub.read_keys(path), path)


def _file_kind(path: str) -> str:
    """'npz' or 'torch' (safetensors / torch zip / legacy pickle) from the first bytes; anything else is an error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.endswith(".npz"):
        return "npz"  # read_npz refuses pickles and other impostors with a precise message
    if torch_hub.is_safetensors(path):
        return "torch"
    if magic in (npz.ZIP_MAGIC, npz.EMPTY_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e})") from e
        return "npz" if not names or any(n.endswith(".npy") for n in names) else "torch"  # empty: "no arrays"
    if magic.startswith(npz.PICKLE_MAGIC):
        return "torch"  # a legacy torch file; read only with torch.load(weights_only=True)
    truncated = torch_hub.truncated_safetensors(path)
    if truncated:
        raise CheckpointError(f"{path}: {truncated}; download or copy it again")
    raise CheckpointError(f"{path}: unrecognised checkpoint file (not .npz, safetensors or torch; starts with "
                          f"{magic!r}); valid: official .npz, timm/HF .safetensors/.bin/.pth, an orbax directory")


def _source_grid_side(flat: Flat, source: str) -> int:
    posemb = flat.get(POSEMB_KEY)
    if posemb is None:
        raise CheckpointError(f"{source}: no position-embedding parameter ({POSEMB_KEY}): a big_vision "
                              "posemb='sincos2d' model? Its fixed sin-cos embeddings are built for the grid of the "
                              "image_size given: pass image_size (e.g. the 224 it was trained at)")
    if posemb.ndim != 3:
        raise CheckpointError(f"{source}: {POSEMB_KEY} has shape {tuple(posemb.shape)}, expected (1, tokens, "
                              "width); pass image_size explicitly")
    tokens = posemb.shape[1] - (1 if "cls" in flat else 0)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"{source}: {tokens} position embeddings are not a square patch grid")
    return side


def grid_side(params: Any, source: str = "params") -> int:
    """The side of the square patch grid a model's `params` (nested, in our layout) hold position embeddings for:
    the resolution they were made for is this x the patch size. A CheckpointError naming `source` if none."""
    return _source_grid_side(params_to_canonical(params), source)


def _check_image_size(image_size: int, patch_size: int) -> None:
    """Refuse an `image_size` that is not a whole number of patches: the position embeddings (and an export's
    config) would silently be those of the smaller size."""
    problem = config_check.image_size_problem(image_size, patch_size)
    if problem:
        raise CheckpointError(f"image_size={image_size!r} is invalid: {problem}")


def load_pretrained(path: str, model_config: ml_collections.ConfigDict, *, num_classes: int | None = None,
                    image_size: int | None = None, source_format: str | None = None,
                    resize_method: str = "bilinear", set_numerics: bool = True,
                    masked_patch_classes: int = 0, reset_head: bool = False,
                    require_head: bool = False) -> dict[str, Any]:
    """Params for the model `model_config` describes, from any supported checkpoint.

    `num_classes` / `image_size` (default: the checkpoint's own) give the target model; a different class
    count gets a new zero-initialised head (`reset_head`: whatever the class count), a different resolution
    (a multiple of the patch size) resized position embeddings, and a `representation_size=0` config drops the
    checkpoint's pre_logits — each logged; `require_head` (evaluation) raises CheckpointError instead of putting
    in a new head. A masked-patch-prediction checkpoint loses its pre-training head (logged) and gets a new zero
    head; `masked_patch_classes > 0` targets the pre-training model instead
    (`vit_jax.masked_patch.build_pretraining_model`). With `set_numerics`, `model_config.gelu_approximate` and
    `.layernorm_epsilon` are set (in place) to the weights' origin, so `build_model(model_config, ...)` computes
    what the weights computed at home. Returns a nested dict of float32 numpy arrays in the model's layout
    (scanned when `model_config.scan`).
    """
    if image_size is not None:
        _check_image_size(image_size, model_config.patch_size)
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                                    or num_classes < 1):
        raise CheckpointError(f"num_classes={num_classes!r} is invalid: expected a positive integer (or None: the "
                              "checkpoint's own)")
    if resize_method not in surgery.RESIZE_METHODS:
        raise CheckpointError(f"resize_method={resize_method!r} is invalid: expected one of {surgery.RESIZE_METHODS}")
    ckpt = read_checkpoint(path, model_config.num_heads, source_format)
    flat = ckpt.flat
    if num_classes is None and masked_patch_classes:
        num_classes = 1  # the pre-training model has no classification head: its class count builds nothing
    if num_classes is None:
        head = flat.get("head/kernel")
        if head is None and not any(key.startswith("Transformer/encoderblock") for key in flat):
            shown = ", ".join(sorted(flat)[:8]) + (", ..." if len(flat) > 8 else "")
            raise CheckpointError(f"{ckpt.location}: not a ViT checkpoint: none of its {len(flat)} key(s) is a "
                                  f"transformer block's ({shown})")
        if head is None:
            raise MissingHeadError(f"{ckpt.location}: has no classification head (head/kernel); give the class "
                                   "count of a new zero head (num_classes, --num_classes on the command line)")
        num_classes = int(head.shape[-1])
    if image_size is None:
        image_size = _source_grid_side(flat, ckpt.location) * model_config.patch_size
    expected = expected_shapes(model_config, num_classes, image_size, masked_patch_classes)
    flat = _with_sincos_posemb(flat, expected, ckpt)
    flat, actions = surgery.adapt_to_model(flat, expected, head_bias_init=model_config.head_bias_init,
                                           resize_method=resize_method, reset_head=reset_head,
                                           require_head=require_head,
                                           source=f"{ckpt.location} ({ckpt.source_format})")
    for action in actions:
        logging.info("%s: %s", ckpt.location, action)
    if set_numerics and ckpt.numerics is not None:
        apply_numerics(model_config, ckpt.numerics)
    target = (f"a masked-patch model ({masked_patch_classes} colours)" if masked_patch_classes
              else f"a {num_classes}-class model")
    logging.info("%s: loaded %d arrays (%s) for %s at %dpx", ckpt.location, len(flat), ckpt.source_format, target,
                 image_size)
    return canonical_to_params(flat, model_config.scan)


def _with_sincos_posemb(flat: Flat, expected: dict[str, tuple], ckpt: Checkpoint) -> Flat:
    """`flat` with the position embeddings of a big_vision posemb='sincos2d' `.npz`, which stores none (they are a
    fixed function of the grid): `posemb_sincos_2d` for the target grid, with a zero class-token slot for a
    class-token model (big_vision adds them before prepending the class token). The model's learned embeddings
    start as them (logged). Any other checkpoint is returned as it is."""
    want = expected.get(POSEMB_KEY)
    if ckpt.source_format != "npz" or want is None or POSEMB_KEY in flat:
        return flat
    has_cls = "cls" in expected
    side = math.isqrt(want[1] - has_cls)
    try:
        posemb = posemb_sincos_2d(side, side, want[2])
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt.location}: no position-embedding parameter to load; {e}") from e
    logging.info("%s: no position-embedding parameter (a big_vision posemb='sincos2d' model): built its fixed 2-D "
                 "sin-cos embeddings for the %dx%d patch grid%s, the start of the model's learned ones",
                 ckpt.location, side, side, " with a zero class-token slot" if has_cls else "")
    return {**flat, POSEMB_KEY: with_class_token_slot(posemb, has_cls, has_slot=False)}


def source_numerics(path: str, source_format: str | None = None) -> Numerics | None:
    """The numerics the weights at `path` were computed with, cheaply: no weights are read for an `.npz`, a
    `.safetensors` file (timm or HF is told from its header's key names) or an HF directory (its config.json);
    an orbax checkpoint's recorded config is read. A torch `.bin` / `.pth` has no index of its names, so it is
    read whole to tell timm from HF. None when the source does not say. A remote checkpoint is copied into the
    cache first (`remote.local_copy`), where `load_pretrained` finds it."""
    path = os.fspath(path)
    with _from_local_copy(path) as local:
        return _named_remotely(_local_numerics(local, source_format), local, path)


def _local_numerics(path: str, source_format: str | None) -> Numerics | None:
    if _reads_as_orbax(path, source_format):
        return orbax_io.read_numerics(path)
    ckpt = _read_local(path, source_format, num_heads=None)  # the format, told as loading tells it
    if ckpt.source_format == "npz":
        return OFFICIAL_NUMERICS
    weights_path, config_path = _weights_and_config(path)
    return _torch_numerics(weights_path, config_path, ckpt.source_format, None)


def recorded_run_config(path: str, source_format: str | None = None) -> dict:
    """The config recorded by the training run that wrote the orbax checkpoint at `path` (a dict; {} for
    other formats, which record none). Reads only the step's "meta" item (of the cached copy, if remote)."""
    path = os.fspath(path)
    with _from_local_copy(path) as local:
        if _reads_as_orbax(local, source_format):
            return orbax_io.read_recorded_config(local)
    return {}


def apply_source_numerics(path: str, model_config: ml_collections.ConfigDict,
                          source_format: str | None = None) -> Numerics | None:
    """Set `model_config`'s GELU flavour and LayerNorm eps (in place) to those of the weights at `path`.

    What `load_pretrained` does as it loads; on its own for a run resumed from its own checkpoint, whose
    model must compute as the pre-trained weights it started from did.
    """
    numerics = source_numerics(path, source_format)
    if numerics is not None:
        apply_numerics(model_config, numerics)
    return numerics


def apply_numerics(model_config: ml_collections.ConfigDict, numerics: Numerics) -> bool:
    """Set `model_config`'s GELU flavour and LayerNorm eps to `numerics` (in place), logging a change; whether
    they changed."""
    current = (model_config.gelu_approximate, float(model_config.layernorm_epsilon))
    wanted = (numerics.gelu_approximate, float(numerics.layernorm_epsilon))
    if current == wanted:
        return False
    try:
        model_config.gelu_approximate, model_config.layernorm_epsilon = wanted
    except (AttributeError, TypeError) as e:
        raise CheckpointError(f"cannot set the weights' numerics on a frozen model config (need "
                              f"gelu_approximate={wanted[0]}, layernorm_epsilon={wanted[1]:g}); pass a ConfigDict "
                              "or set_numerics=False") from e
    logging.info("numerics of %s: set model.gelu_approximate=%s, model.layernorm_epsilon=%g (were %s, %g)",
                 numerics.origin, wanted[0], wanted[1], current[0], current[1])
    return True


# The file a single-file target is written as; readers (and `detect_format`) go by the suffix.
TARGET_SUFFIXES = {"npz": ".npz", "timm": ".safetensors"}


def check_destination(path: str, target_format: str, overwrite: bool = False) -> None:
    """Refuse a destination `save_as` would fail on or that holds something already (nothing is overwritten):
    a file target (npz, timm) must be a new file named with its format's suffix in an existing directory; a
    directory target (hf, orbax) must be new or empty.

    `overwrite` lets an existing npz / timm file be replaced and an HF directory be written into (its
    config.json and weights replaced, other files kept); an orbax directory is never reused (its steps would mix).
    """
    if target_format not in TARGET_FORMATS:
        raise CheckpointError(f"target_format must be one of {TARGET_FORMATS}, got {target_format!r}")
    path = os.fspath(path)
    suffix = TARGET_SUFFIXES.get(target_format)
    if suffix and not path.endswith(suffix):
        raise CheckpointError(f"{path}: a {target_format} checkpoint is one {suffix} file; name it *{suffix}")
    keep_existing = not overwrite or target_format == "orbax"
    if remote.is_remote(path):
        if keep_existing and not remote.is_empty_or_missing(path):
            held = "exists; give a new file" if suffix else "exists and is not empty; give a new directory"
            raise CheckpointError(f"{path}: {held} (nothing is overwritten)")
        return
    if suffix:
        _check_file_destination(path, target_format, suffix, keep_existing)
        return
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{path}: is a file; a {target_format} checkpoint is a directory: give a new one")
    if keep_existing and os.path.isdir(path) and os.listdir(path):
        raise CheckpointError(f"{path}: exists and is not empty; give a new directory for the {target_format} "
                              "checkpoint (nothing is overwritten)")


def _check_file_destination(path: str, target_format: str, suffix: str, keep_existing: bool) -> None:
    """`check_destination` for a local single-file target."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory; a {target_format} checkpoint is one {suffix} file")
    if keep_existing and os.path.lexists(path):
        raise CheckpointError(f"{path}: exists; give a new file name or remove it first (nothing is "
                              "overwritten)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{path}: its directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{path}: its directory {parent} is not writable")


def save_as(params: Any, model_config: ml_collections.ConfigDict, path: str, target_format: str, *,
            overwrite: bool = False, label_kind: str = "single") -> str:
    """Write `params` (of the model `model_config` describes) as `target_format`; returns what was written.

    "npz": an original-layout `.npz` (vision_transformer / timm `_load_weights` read it). "timm": a timm
    VisionTransformer `.safetensors`. "hf": a directory with `config.json` + `model.safetensors` for
    `ViTForImageClassification.from_pretrained`. "orbax": a CheckpointManager directory (step 0) that
    `load_pretrained` and `config.pretrained` read.

    An existing destination is refused (`check_destination`) unless `overwrite` (never for orbax). Files are
    written atomically: a failed export leaves the destination as it was. `label_kind` is the run config's (a
    "multi" model's HF config.json says problem_type "multi_label_classification": HF applies a sigmoid, not a
    softmax); an orbax export records it as its run config's, which predict and evaluation adopt; npz and timm
    record no loss.
    """
    _check_label_kind(label_kind)
    check_destination(path, target_format, overwrite)
    path = os.fspath(path)
    if remote.is_remote(path):
        return _save_remote(params, model_config, path.rstrip("/"), target_format, label_kind)
    existed = os.path.exists(path)  # check_destination: nothing, or an empty directory
    try:
        return _write(params, model_config, path, target_format, shown=path, label_kind=label_kind)
    except OSError as e:  # a read-only disk or directory, a file system that takes no files, a full disk
        raise CheckpointError(f"{path}: cannot write there ({e.strerror or e}); the destination is left as it "
                              "was") from e
    except Exception as e:  # safetensors' and orbax's (TensorStore's) own errors for a full disk
        cause = storage_failure(e)
        if cause is None:
            raise
        if target_format == "orbax" and existed:  # orbax leaves its temporary step directory behind
            _remove_contents(path)
        elif target_format == "orbax":
            shutil.rmtree(path, ignore_errors=True)
        raise CheckpointError(f"{path}: cannot write there ({cause}); the destination is left as it was") from e


def _remove_contents(directory: str) -> None:
    """Delete what is inside `directory` (a failed write into a directory that was empty), keeping it."""
    for name in os.listdir(directory):
        entry = os.path.join(directory, name)
        if os.path.isdir(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.remove(entry)


def _check_label_kind(label_kind: str) -> None:
    """Refuse a `label_kind` that is no run config's (`config_check.LABEL_KINDS`)."""
    if label_kind not in config_check.LABEL_KINDS:
        raise CheckpointError(f"label_kind={label_kind!r} is invalid: expected one of {config_check.LABEL_KINDS} "
                              "(the run config's label_kind)")


def _write(params: Any, model_config: ml_collections.ConfigDict, path: str, target_format: str, shown: str,
           label_kind: str = "single") -> str:
    """`save_as` into the local `path`; logs and the returned path name `shown` (the remote destination of a copy)
    instead."""
    flat = params_to_canonical(params)
    if "head/kernel" not in flat:
        raise CheckpointError("params have no head/kernel: not a classification model's params")
    num_classes = int(flat["head/kernel"].shape[-1])
    image_size = _source_grid_side(flat, "params") * model_config.patch_size  # `grid_side` of the flat params
    check_matches(flat, expected_shapes(model_config, num_classes, image_size), "params")
    m = model_config
    _require(target_format in ("npz", "orbax") or not m.get("axial", False),
             f"{target_format} has no axial ViT (axial=True: row and column attention); export to npz or orbax")
    if target_format == "npz":
        _warn_numerics(m, OFFICIAL_NUMERICS, "npz")
        npz.write_npz(flat, path)
    elif target_format == "timm":
        _require(not m.resnet_layers, "timm export of hybrids is not supported (timm's ResNetV2 uses other eps); "
                                      "export to npz, which timm's _load_weights reads")
        _require(not m.representation_size, "timm's VisionTransformer has no pre_logits layer; fine-tune with "
                                             "model.representation_size=0 or export to npz/orbax")
        # timm takes the GELU flavour as a constructor argument (act_layer), so only the LayerNorm eps can differ.
        _warn_numerics(m, dataclasses.replace(TIMM_NUMERICS, gelu_approximate=bool(m.gelu_approximate)), "timm")
        torch_hub.write_safetensors(torch_hub.canonical_to_timm(flat), path,
                                    metadata=torch_hub.export_metadata(m))
        extra = (", global_pool='avg', class_token=False, fc_norm=False" if m.classifier == "gap" else "") + (
            ", act_layer='gelu_tanh'" if m.gelu_approximate else "")
        # The overlay's num_classes is the file's head: without it timm assumes the registered model's (1000 for
        # most) and, for any other count, drops the file's head for a fresh random one (an INFO line, no error).
        # Its input size and mean and std are our input's, for timm.data.resolve_data_config (a DeiT's mean and
        # std are ImageNet's, not [-1, 1]).
        logging.info("timm: timm.create_model(<vit name>, pretrained=True, num_classes=%d, img_size=%d, "
                     "pretrained_cfg_overlay=dict(file=%r, num_classes=%d, input_size=(3, %d, %d), "
                     "mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))%s)",
                     num_classes, image_size, shown, num_classes, image_size, image_size, extra)
    elif target_format == "hf":
        _require(m.classifier == "token", "HF ViTForImageClassification classifies the class token; "
                                          "classifier='gap' cannot be exported to hf")
        _require(not m.resnet_layers, "HF export of hybrids is not supported; export to npz")
        _require(not m.representation_size, "HF ViTForImageClassification has no pre_logits layer; fine-tune "
                                            "with model.representation_size=0 or export to npz/orbax")
        _write_hf_dir(flat, torch_hub.hf_config(m, num_classes, image_size, label_kind),
                      torch_hub.hf_preprocessor_config(image_size), torch_hub.export_metadata(m), path)
    else:
        meta = {"step": 0, "config": {"model": m.to_dict(), "label_kind": label_kind},  # what predict adopts
                "source": "vit_jax.interop.save_as"}
        written = orbax_io.write_orbax(canonical_to_params(flat, m.scan), json.loads(json.dumps(meta)), path)
        shown += written[len(path):].replace(os.sep, "/")  # the step directory
    logging.info("wrote %s (%s, %d classes, %dpx)", shown, target_format, num_classes, image_size)
    return shown


def _write_hf_dir(flat: Flat, hf_config: dict[str, Any], preprocessor: dict[str, Any], metadata: dict[str, str],
                  path: str) -> None:
    """`path`/model.safetensors (with `metadata`: our numerics and head count, kept if the file is copied
    without its config.json), `path`/preprocessor_config.json and `path`/config.json, written into a temporary
    sibling directory that is then renamed into place: a failure part-way leaves no directory that looks like a
    model but cannot be loaded (and that `check_destination` would refuse to reuse). Into an existing non-empty
    directory (`overwrite`) the files are moved one by one, the weights first, config.json (what marks a model
    directory) last."""
    path = os.path.normpath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    os.mkdir(tmp)  # not tempfile.mkdtemp: its 0700 mode would become the model directory's
    try:
        torch_hub.write_safetensors(torch_hub.canonical_to_hf(flat), os.path.join(tmp, "model.safetensors"),
                                    metadata=metadata)
        for name, content in ((torch_hub.PREPROCESSOR_JSON, preprocessor), ("config.json", hf_config)):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        if os.path.isdir(path) and os.listdir(path):
            for name in ("model.safetensors", torch_hub.PREPROCESSOR_JSON, "config.json"):
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
        else:
            os.replace(tmp, path)  # a new directory, or one over an empty one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _save_remote(params: Any, model_config: ml_collections.ConfigDict, path: str, target_format: str,
                 label_kind: str) -> str:
    """`save_as` to a remote path: written into a temporary local directory, then copied up."""
    with tempfile.TemporaryDirectory(prefix="vit_jax_save_") as tmp:
        local = os.path.join(tmp, path.rsplit("/", 1)[-1])
        written = _write(params, model_config, local, target_format, shown=path, label_kind=label_kind)
        remote.upload(local, path)
    return written


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointError(message)


def _warn_numerics(model_config: ml_collections.ConfigDict, home: Numerics, target: str) -> None:
    if (bool(model_config.gelu_approximate), float(model_config.layernorm_epsilon)) != (
            home.gelu_approximate, home.layernorm_epsilon):
        logging.warning("%s readers compute with %s; these params were computed with gelu_approximate=%s, "
                        "layernorm_epsilon=%g: outputs will differ slightly", target, home.origin,
                        model_config.gelu_approximate, model_config.layernorm_epsilon)
