"""Official `.npz` checkpoints (vision_transformer, AugReg, hybrids, big_vision) <-> canonical flat params.

Reads with `allow_pickle=False` after checking the file really is a zip archive of `.npy` arrays, so a pickle
with an `.npz` name is refused before numpy sees it. The big_vision variants are normalised to the original
layout: `params/`, `params/img/` and `opt/target/` prefixes are stripped; blocks stacked over depth
(`Transformer/encoderblock/...`, from `nn.scan`) are split; big_vision's block names (`MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`) are renamed; its `pos_embedding` (top level, or `Transformer/pos_embedding` in
pre-2022 files) becomes ours, with a zero class-token slot put first when it has none (big_vision adds the
position embeddings before prepending the class token); GroupNorm params stored with leading singleton axes are
squeezed.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from collections.abc import Iterable
from typing import Any

import ml_dtypes
import numpy as np
from absl import logging

from vit_jax.interop.common import (
    POSEMB_KEY,
    CheckpointError,
    Flat,
    unstack_scanned,
    with_class_token_slot,
    write_atomically,
)

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"  # a zip of no members (np.savez with no arrays) starts with its end record
PICKLE_MAGIC = b"\x80"
# Prefixes of the param tree inside the various release files (anything else in such a file is optimizer
# state or another tower, e.g. big_vision's `params/txt/`, and is not part of the image model).
PREFIXES = ("opt/target/", "params/img/", "params/", "")
_BIG_VISION_RENAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                       "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def read_npz(path: str) -> Flat:
    """The weight arrays of an `.npz` archive as float32 numpy, refusing pickles and naming the file on any failure.

    Only the members under the param tree's prefix (`PREFIXES`, chosen from the member names) are read, so
    optimizer state or another tower stored beside the params cannot abort the load whatever it holds.
    """
    _check_is_zip(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                raise CheckpointError(f"{path}: .npz archive holds no arrays")
            names = _param_members(archive.files, path)
            return {name: _read_member(archive, name, path) for name in names}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt .npz archive ({type(e).__name__}: {e})") from e


def _check_is_zip(path: str) -> None:
    """Refuse a missing file, a pickle or anything else that is not a zip archive before numpy opens it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(PICKLE_MAGIC):
        raise CheckpointError(f"{path}: is a Python pickle, not an .npz archive; refusing to unpickle it "
                              "(only numpy .npz archives of arrays are read)")
    if magic not in (ZIP_MAGIC, EMPTY_ZIP_MAGIC):
        raise CheckpointError(f"{path}: not an .npz archive (no zip header; starts with {magic!r})")


def param_prefix(names: Iterable[str]) -> str | None:
    """The first of `PREFIXES` under which `names` hold a ViT's `embedding/kernel`; None if there is none."""
    names = set(names)
    return next((p for p in PREFIXES if f"{p}embedding/kernel" in names), None)


def _param_members(names: list[str], path: str) -> list[str]:
    """The archive members to read: those under the param prefix, or all of them when there is none (to_canonical
    then refuses the file, listing its keys)."""
    prefix = param_prefix(names)
    if prefix is None:
        return list(names)
    chosen = [name for name in names if name.startswith(prefix)]
    if len(chosen) != len(names):
        logging.info("%s: reading the %d arrays under %r, ignoring %d others (optimizer state / other towers)",
                     path, len(chosen), prefix, len(names) - len(chosen))
    return chosen


def _read_member(archive: Any, name: str, path: str) -> np.ndarray:
    """One archive member as float32; a non-`.npy` member, an object array or a non-numeric dtype is a
    CheckpointError naming the file and the member."""
    try:
        value = archive[name]
    except ValueError as e:  # object arrays (pickles inside the archive) or a broken .npy header
        raise CheckpointError(f"{path}: unreadable array in .npz archive: {name!r} ({e})") from e
    if not isinstance(value, np.ndarray):
        raise CheckpointError(f"{path}: member {name!r} is not a .npy array (an .npz archive holds only .npy "
                              "arrays); remove it from the archive")
    return _to_float32(value, name, path)


def _to_float32(array: np.ndarray, name: str, path: str) -> np.ndarray:
    """A numeric array (bfloat16 included, even saved as raw 2-byte voids) as float32; anything else is refused."""
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # bfloat16 saved without ml_dtypes
        array = array.view(ml_dtypes.bfloat16)
    if array.dtype.kind not in "fiub" and array.dtype != ml_dtypes.bfloat16:
        raise CheckpointError(f"{path}: array {name!r} has dtype {array.dtype}, not a weight's (valid: float, "
                              "bfloat16, int, bool)")
    return np.asarray(array, dtype=np.float32)


def to_canonical(raw: Flat, path: str) -> Flat:
    """Normalise any official / big_vision `.npz` key layout to the canonical (original, unscanned) one."""
    prefix = param_prefix(raw)
    if prefix is None:
        sample = ", ".join(sorted(raw)[:5])
        raise CheckpointError(f"{path}: not a ViT checkpoint: no 'embedding/kernel' under any of the prefixes "
                              f"{[p or '(none)' for p in PREFIXES]}; first keys: {sample}")
    flat = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    if len(flat) != len(raw):
        logging.info("%s: read the %d arrays under %r, ignored %d others (optimizer state / other towers)",
                     path, len(flat), prefix, len(raw) - len(flat))
    if any(k.startswith("MAPHead_0/") for k in flat):
        raise CheckpointError(f"{path}: uses big_vision's MAP-head pooling (MAPHead_0/...); this model pools with "
                              "classifier='token' or 'gap' only")
    flat = {k: _squeeze_group_norm(k, v) for k, v in flat.items()}
    flat = unstack_scanned(flat, source=path)
    flat = {_rename_big_vision_block(k): v for k, v in flat.items()}
    return _normalise_big_vision_posemb(flat)


def _normalise_big_vision_posemb(flat: Flat) -> Flat:
    """big_vision's position embeddings -> `POSEMB_KEY` with a class-token slot (as `fix_old_checkpoints`).

    Pre-2022 files keep them in the encoder (`Transformer/pos_embedding`), later ones at the top level
    (`pos_embedding`). Current big_vision adds them before prepending the class token (g*g tokens: a zero slot is
    put first); older files have the class token's own entry (1 + g*g tokens), which this model uses as is.
    """
    if "Transformer/pos_embedding" in flat and "pos_embedding" not in flat:
        flat["pos_embedding"] = flat.pop("Transformer/pos_embedding")
    if "pos_embedding" in flat:
        flat[POSEMB_KEY] = with_class_token_slot(flat.pop("pos_embedding"), "cls" in flat)
    return flat


def _squeeze_group_norm(name: str, value: np.ndarray) -> np.ndarray:
    """Older hybrid files store GroupNorm scale/bias as (1, 1, 1, C): back to (C,)."""
    parts = name.split("/")
    if len(parts) >= 2 and parts[-2].startswith("gn") and parts[-1] in ("scale", "bias") and value.ndim > 1:
        if all(d == 1 for d in value.shape[:-1]):
            return value.reshape(value.shape[-1])
    return value


def _rename_big_vision_block(name: str) -> str:
    match = re.match(r"(Transformer/encoderblock_\d+/)([^/]+)(/.*)", name)
    if not match or match.group(2) not in _BIG_VISION_RENAMES:
        return name
    return match.group(1) + _BIG_VISION_RENAMES[match.group(2)] + match.group(3)


def write_npz(flat: Flat, path: str) -> None:
    """Write canonical params as an original-layout `.npz` (atomically: temp file, then rename; a failed write
    removes the temp file and leaves `path` as it was)."""
    arrays = {k: np.asarray(v, np.float32) for k, v in flat.items()}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomically(path, write)
