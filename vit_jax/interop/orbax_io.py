"""Our own orbax training checkpoints as a source (and a target) of params.

The layout (vit_jax/checkpoints.py): a CheckpointManager directory (WORKDIR/checkpoints) with one
subdirectory per step, each with items "params" (plain float32 arrays), "opt_state", "ema" (the Polyak average
of the params, when the run kept one), "meta" (JSON: step, rng, config) and "data". Accepted paths: a workdir
(holding `checkpoints/`), a CheckpointManager directory (its latest step is read) or one step directory, whose
"params" are read; or a step's "ema" item directory (WORKDIR/checkpoints/STEP/ema), whose averaged params are
read instead. Besides those, only "meta" is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from vit_jax.interop.common import CheckpointError, Flat, Numerics, params_to_canonical

AVERAGE_ITEM = "ema"  # a step's Polyak-averaged params (vit_jax.checkpoints)


def is_orbax_dir(path: str) -> bool:
    """True for a workdir (even one whose run has not saved yet), a CheckpointManager directory, a step
    directory of ours or a step's "ema" item."""
    if split_item(path)[1] == AVERAGE_ITEM:
        return True
    return os.path.isdir(path) and (os.path.isdir(os.path.join(path, "checkpoints"))
                                    or step_dir(path, must_exist=False) is not None)


def split_item(path: str, isdir: Callable[[str], bool] = os.path.isdir) -> tuple[str, str]:
    """(step directory, "ema") for a step's "ema" item directory, else (`path`, "params").

    A step directory is numbered and holds a "meta" or "params" item. A path ending in "ema" inside one that has
    no such item is an error saying so.
    """
    parent, name = os.path.split(path.rstrip("/"))
    is_step = os.path.basename(parent).isdigit() and (isdir(os.path.join(parent, "meta"))
                                                        or isdir(os.path.join(parent, "params")))
    if name != AVERAGE_ITEM or not is_step:
        return path, "params"
    if not isdir(path):
        raise CheckpointError(f"{path}: the checkpoint {parent} holds no Polyak average (no 'ema' item: its run "
                              "had optimizer.ema_decay=0, or it was not written by training); give the step "
                              "directory for its params")
    return parent, AVERAGE_ITEM


def step_dir(path: str, must_exist: bool = True, *, isdir: Callable[[str], bool] = os.path.isdir,
             listdir: Callable[[str], list[str]] = os.listdir,
             finalized: Callable[[str], bool] = lambda step: True) -> str | None:
    """The step directory `path` names: itself, its latest step, or its `checkpoints/`'s latest step.

    `isdir` / `listdir` probe the file system (`vit_jax.interop.remote` passes tf.io.gfile's for remote paths);
    a numbered step counts only if `finalized(step_dir)` (remote: orbax's commit file is there).
    """
    if isdir(os.path.join(path, "params")):
        return path
    if isdir(os.path.join(path, "checkpoints")):
        found = step_dir(os.path.join(path, "checkpoints"), False, isdir=isdir, listdir=listdir, finalized=finalized)
        if found is None and must_exist:
            raise CheckpointError(f"{path}: its checkpoints/ holds no finished checkpoint yet (a run stopped before "
                                  "its first save? a remote step counts once orbax's commit_success.txt is in "
                                  "it): train longer, or give another checkpoint")
        return found
    steps = [int(name) for name in listdir(path)
             if name.isdigit() and isdir(os.path.join(path, name, "params")) and finalized(os.path.join(path, name))]
    if steps:
        return os.path.join(path, str(max(steps)))
    if must_exist:
        raise CheckpointError(f"{path}: not an orbax checkpoint: no 'params' item, no numbered step directory "
                              "with one, no 'checkpoints/' subdirectory")
    return None


class _StepMetadataNotHere(logging.Filter):
    """Drops orbax's warning that a step's _CHECKPOINT_METADATA is not in the item directory being read."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Metadata file does not exist")


@contextlib.contextmanager
def _quiet_step_metadata() -> Iterator[None]:
    """Orbax warns, reading one item of a step, that the step's _CHECKPOINT_METADATA is not in the item's
    directory: it is one level up, as in every CheckpointManager step, so the warning says nothing."""
    quiet = _StepMetadataNotHere()
    logger = logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def item_tree_metadata(item_dir: str) -> Any:
    """The stored tree of one orbax item (a step's "params" or "opt_state"): array metadata with shape and dtype,
    read without the arrays."""
    import orbax.checkpoint as ocp

    with _quiet_step_metadata(), ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(_absolute(item_dir))
    item_metadata = getattr(metadata, "item_metadata", metadata)
    return getattr(item_metadata, "tree", item_metadata)


def describe_error(error: BaseException) -> str:
    """'Type: first line' of an orbax / TensorStore error, whose message can run on for pages of spec JSON (and
    whose first line can end in TensorStore's "See full TensorStore details: <bound method ...>")."""
    text = str(error).strip()
    first = text.splitlines()[0].split("See full TensorStore details")[0].rstrip(" .:;") if text else ""
    return f"{type(error).__name__}: {first[:300]}"


def _absolute(path: str) -> str:
    """What orbax wants: an absolute local path, or a URI (gs://...) as it is."""
    return path if "://" in path else os.path.abspath(path)


def read_orbax(path: str) -> tuple[Flat, Numerics | None, str]:
    """Canonical params of the latest (or given) step (or of its Polyak average), the numerics its run was
    configured with, and the step directory (the "ema" item's, for the average)."""
    import orbax.checkpoint as ocp

    root, item = split_item(path)
    step = root if item == AVERAGE_ITEM else step_dir(path)
    params_dir = _absolute(os.path.join(step, item))
    try:
        tree = item_tree_metadata(params_dir)
        if not jax.tree.leaves(tree):  # orbax returns no tree when the item's metadata file is missing or bad
            raise ValueError("no array metadata: the item's _METADATA file is missing or damaged")
        device = jax.local_devices(backend="cpu")[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding), tree)
        with _quiet_step_metadata(), ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_dir, target)
    except Exception as e:  # orbax and TensorStore raise OSError, ValueError or a bare Exception
        raise CheckpointError(f"{params_dir}: unreadable orbax {item} ({describe_error(e)}); its files may be "
                              "damaged or incomplete") from e
    flat = params_to_canonical(jax.tree.map(np.asarray, params))
    return flat, numerics_from_meta(_read_meta(step), step), step if item == "params" else os.path.join(step, item)


def read_numerics(path: str) -> Numerics | None:
    """The numerics recorded with the latest (or given) step of an orbax checkpoint, without reading params."""
    step = _meta_step_dir(path)
    return numerics_from_meta(_read_meta(step), step)


def read_recorded_config(path: str) -> dict:
    """The config the run recorded with the latest (or given) step of an orbax checkpoint ({} if none)."""
    step = _meta_step_dir(path)
    return recorded_config(_read_meta(step), step)


def _meta_step_dir(path: str) -> str:
    """The step directory whose "meta" item describes `path` (a workdir, manager, step or "ema" item)."""
    root, item = split_item(path)
    return root if item == AVERAGE_ITEM else step_dir(path)


def _read_meta(step_dir: str) -> dict | None:
    """The step's "meta" item (step, rng, the run's config), or None when the step has none."""
    import orbax.checkpoint as ocp

    meta_dir = os.path.join(step_dir, "meta")
    if not os.path.isdir(meta_dir):
        return None
    try:
        return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(meta_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_dir}: unreadable meta item ({e})") from e


def recorded_config(meta: dict | None, where: str) -> dict:
    """The config a run recorded in a step's meta item, as a dict ({} when there is none)."""
    config = (meta or {}).get("config") or {}
    if isinstance(config, str):  # vit_jax.train records `config.to_json_best_effort()`
        try:
            config = json.loads(config)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{where}: the recorded config is not JSON ({e})") from e
    return config if isinstance(config, dict) else {}


def numerics_from_meta(meta: dict | None, where: str) -> Numerics | None:
    """model.gelu_approximate / model.layernorm_epsilon of the config a run recorded in a step's meta item."""
    model = recorded_config(meta, where).get("model") or {}
    if "gelu_approximate" not in model or "layernorm_epsilon" not in model:
        return None
    gelu, eps = model["gelu_approximate"], model["layernorm_epsilon"]
    if not isinstance(gelu, bool) or isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise CheckpointError(f"{where}: the recorded config has model.gelu_approximate={gelu!r} and "
                              f"model.layernorm_epsilon={eps!r}; expected a bool and a number")
    return Numerics(gelu, float(eps), f"{where} meta config")


def write_orbax(params: Any, meta: dict[str, Any], path: str) -> str:
    """Write `params` as step 0 of a CheckpointManager at `path` (items "params" and "meta"); returns the step dir."""
    import orbax.checkpoint as ocp

    if os.path.exists(path) and os.listdir(path):
        raise CheckpointError(f"{path}: exists and is not empty; give a new directory for the orbax checkpoint")
    manager = ocp.CheckpointManager(os.path.abspath(path), item_names=("params", "meta"))
    manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    return os.path.join(path, "0")
