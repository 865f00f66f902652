"""Checkpoints at remote URIs (gs://, s3://, any scheme tf.io.gfile opens): read from a local copy, written via one.

The readers (numpy's zip reader, safetensors, torch, orbax) want local files, and a pre-trained checkpoint is read
more than once per run (its numerics, then its weights), so a remote checkpoint is copied once into a cache
(`$VIT_JAX_CACHE`, else `$XDG_CACHE_HOME/vit_jax`, else `~/.cache/vit_jax`) and copied again only when the
remote file's size or modification time changed. Only what loading reads is copied: a file and the
`config.json` beside it; an HF model directory's config, weights and `preprocessor_config.json`; an orbax
checkpoint's latest finalized (or given) step without its optimizer state, data-iterator state and Polyak
average (a step's "ema" item path: the average and the meta, without the params). Processes sharing a cache take
turns on an entry (a lock file), so a run of many processes per host copies each file once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from vit_jax.interop import orbax_io, torch_hub
from vit_jax.interop.common import CheckpointError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HTTP = re.compile(r"^(https?)://", re.IGNORECASE)
# A Cloud Storage object's public or console URL -> its bucket/object path (for gs://); a query string is dropped.
_GCS_HTTP = re.compile(r"^https?://storage\.(?:googleapis|cloud\.google)\.com/([^/?#]+/[^?#]*)", re.IGNORECASE)
_MANIFEST = ".vit_jax_copy.json"  # {relative path: [size, mtime_nsec]} of what a cache entry was copied from
_LOCK = ".vit_jax_copy.lock"
_WEIGHT_ITEMS = ("params", orbax_io.AVERAGE_ITEM)  # orbax step items holding weights: loading reads one of them
_SKIPPED_ITEMS = ("opt_state", "data")  # orbax step items that loading never reads
_COMMIT_FILE = "commit_success.txt"  # orbax (>= 0.12.8) writes it into every step directory as it commits it


def is_remote(path: str) -> bool:
    """True for a URI with a scheme (gs://bucket/x); local paths are read in place. Every remote path is classified
    here, so an http(s):// URL, which tf.io.gfile cannot open ("File system scheme 'https' not implemented"), is
    refused here, once, saying what to give instead (`_refuse_http`)."""
    path = os.fspath(path)
    _refuse_http(path)
    return bool(_URI.match(path))


def _refuse_http(path: str) -> None:
    """A CheckpointError for an http(s):// URL: a Cloud Storage object's URL (`https://storage.googleapis.com/
    BUCKET/PATH`, as the vit_models listings give) is gs://BUCKET/PATH; another file is downloaded first."""
    found = _HTTP.match(path)
    if not found:
        return
    gcs = _GCS_HTTP.match(path)
    advice = (f"give gs://{gcs.group(1)} (the same Cloud Storage object)" if gcs
              else "give a local path (download the file first, e.g. with wget or curl)")
    raise CheckpointError(f"{path}: {found.group(1).lower()}:// URLs are not supported (the readable schemes are those "
                          f"tf.io.gfile opens: gs://, s3://, ...; or a local path); {advice}")


def cache_dir() -> str:
    """Where remote checkpoints are copied."""
    if os.environ.get("VIT_JAX_CACHE"):
        return os.environ["VIT_JAX_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vit_jax")


def _gfile() -> Any:
    import tensorflow as tf  # only for remote paths: the interop readers need no tensorflow otherwise

    return tf.io.gfile


@contextlib.contextmanager
def _errors(path: str, doing: str) -> Iterator[None]:
    """tf.io.gfile errors (missing bucket, no permission, network) as CheckpointErrors naming `path`."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as e:
        raise CheckpointError(f"{path}: cannot {doing} ({type(e).__name__}: {e.message})") from e


def pinned_step(path: str) -> str:
    """The step directory an orbax workdir or `checkpoints/` directory at `path` names now (its latest finished
    step), local or remote; `path` itself for anything else (a step directory, a file, an HF model directory).

    Reading through the returned path more than once (the numerics, then the weights), or from several processes,
    reads one step, even while the run that owns the workdir saves a newer one.
    """
    path = os.fspath(path)
    if not is_remote(path):
        named_item = orbax_io.split_item(path)[1] != "params"  # a step's "ema" item: pinned already
        return orbax_io.step_dir(path) if orbax_io.is_orbax_dir(path) and not named_item else path
    gfile = _gfile()
    with _errors(path, "read"):
        root = path.rstrip("/")
        if not gfile.isdir(root):
            return path
        step = orbax_io.step_dir(root, must_exist=gfile.isdir(posixpath.join(root, "checkpoints")),
                                 isdir=gfile.isdir, listdir=lambda p: _listdir(gfile, p), finalized=_finalized(gfile))
        return step or path


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
    cache = cache or cache_dir()
    with _errors(path, "read"):
        step, item = orbax_io.split_item(path, isdir=gfile.isdir)  # first: a missing average says why
        if not gfile.exists(path):
            raise CheckpointError(f"{path}: no such file or directory")
        if item != "params":  # a step's Polyak average: its item and the step's meta
            _require_finalized(gfile, step)
            copied = _sync(gfile, step, _orbax_files(gfile, step, item), path, cache)
            return os.path.join(copied, item)
        if gfile.isdir(path):
            # A workdir (with checkpoints/) must hold a finished step; another directory may be an HF model.
            step = orbax_io.step_dir(path, must_exist=gfile.isdir(posixpath.join(path, "checkpoints")),
                                     isdir=gfile.isdir, listdir=lambda p: _listdir(gfile, p),
                                     finalized=_finalized(gfile))
            if step:
                _require_finalized(gfile, step)  # a step named directly: step_dir took it as it is
                return _sync(gfile, step, _orbax_files(gfile, step), step, cache)
            _refuse_unfinished_steps(gfile, path)
            names = [posixpath.basename(f) for f in torch_hub.hf_dir_files(path, isfile=gfile.exists)]
            if gfile.exists(posixpath.join(path, torch_hub.PREPROCESSOR_JSON)):  # its input normalisation
                names.append(torch_hub.PREPROCESSOR_JSON)
            return _sync(gfile, path, names, path, cache)
        root, name = posixpath.split(path)
        names = [name] + (["config.json"] if name != "config.json" and gfile.exists(f"{root}/config.json") else [])
        return os.path.join(_sync(gfile, root, names, path, cache), name)


def upload(local: str, path: str) -> None:
    """Copy a local file or directory tree to the remote `path`, a directory's subdirectories before its own files
    and, among them, `config.json` after the others and orbax's commit file last (`_upload_order`)."""
    gfile = _gfile()
    with _errors(path, "write"):
        if not os.path.isdir(local):
            gfile.makedirs(posixpath.dirname(path))
            gfile.copy(local, path, overwrite=True)
            return
        for dirpath, _, files in os.walk(local, topdown=False):
            rel = os.path.relpath(dirpath, local)
            dest = path if rel == "." else posixpath.join(path, *rel.split(os.sep))
            gfile.makedirs(dest)
            for name in sorted(files, key=_upload_order):
                gfile.copy(os.path.join(dirpath, name), posixpath.join(dest, name), overwrite=True)


def _upload_order(name: str) -> tuple[bool, bool]:
    """Sort key of a directory's files for `upload`: the files that mark a directory as loadable arrive after what
    they vouch for, so an interrupted upload leaves nothing that looks complete. orbax's commit file last (a step
    without it is skipped: `_finalized`); `config.json` after the weights (an HF model directory is its
    config.json and weights: `torch_hub.hf_dir_files`), as the local export writes them."""
    return name == _COMMIT_FILE, name == "config.json"


def is_empty_or_missing(path: str) -> bool:
    """True when nothing exists at the remote `path`, or it is an empty directory."""
    gfile = _gfile()
    with _errors(path, "read"):
        return not gfile.exists(path) or (gfile.isdir(path) and not gfile.listdir(path))


def _listdir(gfile: Any, path: str) -> list[str]:
    return [name.rstrip("/") for name in gfile.listdir(path)]


def _finalized(gfile: Any) -> Callable[[str], bool]:
    """A remote step counts only with orbax's commit file in it. orbax (>= 0.12.8, setup.py's minimum) writes one
    into every step: on a bucket last, as the step is written in place; locally into the temporary directory it
    then renames, so `upload` (and any copy of a local run) brings it along, last. A step without it is still
    being written, or was copied in part (params without meta would load with the wrong numerics)."""
    return lambda step: gfile.exists(f"{step}/{_COMMIT_FILE}")


def _require_finalized(gfile: Any, step: str) -> None:
    """Refuse the remote step directory `step` unless it holds orbax's commit file (`_finalized`)."""
    if not _finalized(gfile)(step):
        raise CheckpointError(f"{step}: unfinished orbax step (no {_COMMIT_FILE}): still being written, or an "
                              "interrupted copy; give a finished step, or copy the checkpoint again")


def _refuse_unfinished_steps(gfile: Any, path: str) -> None:
    """Name the steps of the remote `path` that hold params but no commit file (when none is finished): the
    directory is an orbax checkpoint, not an HF model without a config.json."""
    unfinished = sorted(int(name) for name in _listdir(gfile, path)
                        if name.isdigit() and gfile.isdir(f"{path}/{name}/params"))
    if unfinished:
        raise CheckpointError(f"{path}: no finished orbax step: step(s) {', '.join(map(str, unfinished))} have no "
                              f"{_COMMIT_FILE} (still being written, or an interrupted copy); wait for the run, "
                              "or copy the checkpoint again")


def _orbax_files(gfile: Any, step: str, item: str = "params") -> list[str]:
    """The step directory's files, relative to it, without the items loading never reads (of the weight items,
    only `item` is kept)."""
    skipped = _SKIPPED_ITEMS + tuple(name for name in _WEIGHT_ITEMS if name != item)
    names = []
    for dirpath, _, files in gfile.walk(step):
        rel = posixpath.relpath(dirpath.rstrip("/"), step)
        if rel.split("/")[0] in skipped:
            continue
        names += [name if rel == "." else f"{rel}/{name}" for name in files]
    return names


def _sync(gfile: Any, root: str, names: list[str], key: str, cache: str) -> str:
    """Make `key`'s cache entry hold exactly `root`/name for each name, copying what changed; its path."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    entry = os.path.join(cache, digest, posixpath.basename(root) or "root")
    try:
        os.makedirs(entry, exist_ok=True)
        with open(os.path.join(cache, digest, _LOCK), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process copying the same checkpoint: wait, then reuse
            _sync_locked(gfile, root, names, entry)
    except OSError as e:
        raise CheckpointError(f"{key}: cannot copy it into the cache {cache} ({e}); set VIT_JAX_CACHE to a "
                              "writable directory with room for the checkpoint") from e
    return entry


def _sync_locked(gfile: Any, root: str, names: list[str], entry: str) -> None:
    manifest_path = os.path.join(entry, _MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = {}
    wanted = set(names)
    for dirpath, _, files in os.walk(entry):  # files the remote no longer has (a deleted config.json) go
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), entry).replace(os.sep, "/")
            if rel != _MANIFEST and rel not in wanted:
                os.remove(os.path.join(dirpath, name))
                manifest.pop(rel, None)
    for name in names:
        with _errors(f"{root}/{name}", "read"):
            stat = gfile.stat(f"{root}/{name}")
            source = [stat.length, stat.mtime_nsec]
            dest = os.path.join(entry, *name.split("/"))
            if manifest.get(name) == source and os.path.isfile(dest) and os.path.getsize(dest) == stat.length:
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".copy-")
            try:
                with gfile.GFile(f"{root}/{name}", "rb") as src, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, length=16 << 20)
                if os.path.getsize(tmp) != stat.length:
                    raise CheckpointError(f"{root}/{name}: changed while it was copied ({stat.length} bytes listed, "
                                          f"{os.path.getsize(tmp)} read); try again")
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        manifest[name] = source
    fd, tmp = tempfile.mkstemp(dir=entry, prefix=".manifest-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    os.replace(tmp, manifest_path)
