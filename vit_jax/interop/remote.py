"""Checkpoints at remote URIs (gs://, s3://, any scheme tf.io.gfile opens): read from a local copy, written via one.

The readers (numpy's zip reader, safetensors, torch, orbax) want local files, and a pre-trained checkpoint is read
more than once per run (its numerics, then its weights), so a remote checkpoint is copied once into a cache
(`$VIT_JAX_CACHE`, else `$XDG_CACHE_HOME/vit_jax`, else `~/.cache/vit_jax`) and copied again only when the
remote file's size or modification time changed. Only what loading reads is copied: a file and the
`config.json` beside it; an HF model directory's config and weights; an orbax checkpoint's latest (or given)
step without its optimizer state and data-iterator state.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
from typing import Any

from vit_jax.interop import orbax_io, torch_hub
from vit_jax.interop.common import CheckpointError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_MANIFEST = ".vit_jax_copy.json"  # {relative path: [size, mtime_nsec]} of what a cache entry was copied from
_SKIPPED_ITEMS = ("opt_state", "data")  # orbax step items that loading never reads


def is_remote(path: str) -> bool:
    """True for a URI with a scheme (gs://bucket/x); local paths are read in place."""
    return bool(_URI.match(os.fspath(path)))


def cache_dir() -> str:
    """Where remote checkpoints are copied."""
    if os.environ.get("VIT_JAX_CACHE"):
        return os.environ["VIT_JAX_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vit_jax")


def _gfile() -> Any:
    import tensorflow as tf  # only for remote paths: the interop readers need no tensorflow otherwise

    return tf.io.gfile


def _tf_errors() -> tuple[type[BaseException], ...]:
    import tensorflow as tf

    return (tf.errors.OpError,)


def local_copy(path: str, cache: str | None = None) -> str:
    """`path` when it is local; else a local copy of the checkpoint it names, kept in `cache` (default `cache_dir()`).

    For a file, the returned path is the copied file (a `config.json` beside it is copied beside it); for a
    directory, the copied directory (an orbax checkpoint: its step directory).
    """
    path = os.fspath(path)
    if not is_remote(path):
        return path
    gfile = _gfile()
    path = path.rstrip("/")
    try:
        if not gfile.exists(path):
            raise CheckpointError(f"{path}: no such file or directory")
        if gfile.isdir(path):
            step = orbax_io.step_dir(path, must_exist=False, isdir=gfile.isdir, listdir=lambda p: _listdir(gfile, p))
            root = step or path
            names = _orbax_files(gfile, step) if step else _hf_files(gfile, path)
            target = _sync(gfile, root, names, cache)
        else:
            root, name = posixpath.split(path)
            names = [name] + (["config.json"] if name != "config.json" and gfile.exists(f"{root}/config.json") else [])
            target = os.path.join(_sync(gfile, root, names, cache), name)
    except _tf_errors() as e:
        raise CheckpointError(f"{path}: cannot read ({type(e).__name__}: {e.message})") from e
    return target


def upload(local: str, path: str) -> None:
    """Copy a local file or directory tree to the remote `path` (a directory's files keep their relative paths)."""
    gfile = _gfile()
    try:
        if not os.path.isdir(local):
            gfile.makedirs(posixpath.dirname(path))
            gfile.copy(local, path, overwrite=True)
            return
        for dirpath, _, files in os.walk(local):
            rel = os.path.relpath(dirpath, local)
            dest = path if rel == "." else posixpath.join(path, *rel.split(os.sep))
            gfile.makedirs(dest)
            for name in files:
                gfile.copy(os.path.join(dirpath, name), posixpath.join(dest, name), overwrite=True)
    except _tf_errors() as e:
        raise CheckpointError(f"{path}: cannot write ({type(e).__name__}: {e.message})") from e


def is_empty_or_missing(path: str) -> bool:
    """True when nothing exists at the remote `path`, or it is an empty directory."""
    gfile = _gfile()
    return not gfile.exists(path) or (gfile.isdir(path) and not gfile.listdir(path))


def _listdir(gfile: Any, path: str) -> list[str]:
    return [name.rstrip("/") for name in gfile.listdir(path)]


def _orbax_files(gfile: Any, step: str) -> list[str]:
    """The step directory's files, relative to it, without the items loading never reads."""
    names = []
    for dirpath, _, files in gfile.walk(step):
        rel = posixpath.relpath(dirpath.rstrip("/"), step)
        if rel.split("/")[0] in _SKIPPED_ITEMS:
            continue
        names += [name if rel == "." else f"{rel}/{name}" for name in files]
    return names


def _hf_files(gfile: Any, path: str) -> list[str]:
    """config.json and the first weights file of an HF model directory (whatever of them exists)."""
    names = [name for name in ("config.json", *torch_hub.HF_WEIGHT_NAMES) if gfile.exists(f"{path}/{name}")]
    weights = [name for name in names if name != "config.json"]
    return [name for name in names if name == "config.json"] + weights[:1]


def _sync(gfile: Any, root: str, names: list[str], cache: str | None) -> str:
    """Copy `root`/name for each name into this root's cache entry unless an unchanged copy is there; its path."""
    key = hashlib.sha256(root.encode()).hexdigest()[:16]
    entry = os.path.join(cache or cache_dir(), key, posixpath.basename(root) or "root")
    manifest_path = os.path.join(entry, _MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    for name in names:
        stat = gfile.stat(f"{root}/{name}")
        source = [stat.length, stat.mtime_nsec]
        dest = os.path.join(entry, *name.split("/"))
        if manifest.get(name) == source and os.path.isfile(dest) and os.path.getsize(dest) == stat.length:
            continue
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp-{os.getpid()}"
        with gfile.GFile(f"{root}/{name}", "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
        os.replace(tmp, dest)
        manifest[name] = source
    tmp = f"{manifest_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    os.replace(tmp, manifest_path)
    return entry
