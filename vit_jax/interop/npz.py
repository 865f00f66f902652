"""Official `.npz` checkpoints (vision_transformer, AugReg, hybrids, big_vision) <-> canonical flat params.

Reads with `allow_pickle=False` after checking the file really is a zip archive of `.npy` arrays, so a pickle
with an `.npz` name is refused before numpy sees it. The big_vision variants are normalised to the original
layout: `params/`, `params/img/` and `opt/target/` prefixes are stripped; blocks stacked over depth
(`Transformer/encoderblock/...`, from `nn.scan`) are split; big_vision's block names (`MultiHeadDotProductAttention_0`,
`LayerNorm_1`, `MlpBlock_0`) are renamed; its top-level `pos_embedding` (no class-token slot: big_vision adds the
position embeddings before prepending the class token) gets a zero class-token slot; GroupNorm params stored with
leading singleton axes are squeezed.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib

import ml_dtypes
import numpy as np
from absl import logging

from vit_jax.interop.common import POSEMB_KEY, CheckpointError, Flat, unstack_scanned

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"
# Prefixes of the param tree inside the various release files (anything else in such a file is optimizer
# state or another tower, e.g. big_vision's `params/txt/`, and is not part of the image model).
PREFIXES = ("opt/target/", "params/img/", "params/", "")
_BIG_VISION_RENAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                       "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def read_npz(path: str) -> Flat:
    """Every array of an `.npz` archive as float32 numpy, refusing pickles and naming the file on any failure."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(PICKLE_MAGIC):
        raise CheckpointError(f"{path}: is a Python pickle, not an .npz archive; refusing to unpickle it "
                              "(only numpy .npz archives of arrays are read)")
    if magic != ZIP_MAGIC:
        raise CheckpointError(f"{path}: not an .npz archive (no zip header; starts with {magic!r})")
    arrays: Flat = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                raise CheckpointError(f"{path}: .npz archive holds no arrays")
            for name in archive.files:
                arrays[name] = _to_float32(archive[name])
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt .npz archive ({type(e).__name__}: {e})") from e
    except ValueError as e:  # object arrays (pickles inside the archive) or a broken .npy header
        raise CheckpointError(f"{path}: unreadable array in .npz archive ({e})") from e
    return arrays


def _to_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:  # bfloat16 saved without ml_dtypes
        array = array.view(ml_dtypes.bfloat16)
    if array.dtype.kind not in "fiub" and array.dtype != ml_dtypes.bfloat16:
        raise ValueError(f"array of dtype {array.dtype} is not a weight")
    return np.asarray(array, dtype=np.float32)


def to_canonical(raw: Flat, path: str) -> Flat:
    """Normalise any official / big_vision `.npz` key layout to the canonical (original, unscanned) one."""
    prefix = next((p for p in PREFIXES if f"{p}embedding/kernel" in raw), None)
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
    flat = unstack_scanned(flat)
    flat = {_rename_big_vision_block(k): v for k, v in flat.items()}
    if "pos_embedding" in flat:  # big_vision: no class-token slot; the class token is added after the posemb
        posemb = flat.pop("pos_embedding")
        if "cls" in flat:
            posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
        flat[POSEMB_KEY] = posemb
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
    """Write canonical params as an original-layout `.npz` (atomically: temp file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    os.replace(tmp, path)
