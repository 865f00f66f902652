"""Training checkpoints: an orbax CheckpointManager at WORKDIR/checkpoints, one subdirectory per step.

Items of a step: "params" (the model's param tree, plain float32 arrays), "opt_state" (the optax state),
"ema" (the Polyak average of the params, same tree; only with `optimizer.ema_decay` > 0), "meta" (JSON: step,
rng, config) and "data" (JSON: {"processes": [train iterator state of process 0, 1, ...]}).
Saves are asynchronous and atomic (a step directory appears only when complete); the newest `keep` are kept.
Restoring takes abstract arrays carrying the shardings wanted now, so a checkpoint written on one mesh is read
onto any other. A SIGTERM (preemption notice) is turned into a save at the next step boundary: by our own
handler in a single process, by JAX's preemption sync manager (all processes agree on the step) in several.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from vit_jax.errors import UserError, storage_failure
from vit_jax.interop.common import architecture_difference, key_differences
from vit_jax.interop.orbax_io import describe_error, item_tree_metadata
from vit_jax.optim import param_path

ITEMS = ("params", "opt_state", "ema", "meta", "data")


class CheckpointWriteError(UserError):
    """The workdir cannot be written (no permission, read-only, not a directory, disk full).

    Raised before training when the workdir is unwritable, and when a checkpoint save fails; a failed save never
    touches the checkpoints already complete (the step's files stay in a temporary directory, ignored on restore).
    """


class CheckpointReadError(UserError):
    """A training checkpoint that cannot be resumed: another model or optimizer's, or damaged files."""


class WorkdirInUseError(UserError):
    """Another training run holds the workdir (`WorkdirLock`)."""


LOCK_FILE = ".vit_jax.lock"


class WorkdirLock:
    """WORKDIR/.vit_jax.lock, held by a training run's process 0 from before its checkpoint manager starts (which
    removes unfinished steps: a second run's start destroyed the first's save in progress) until it ends.

    Two runs on one workdir overwrote each other's checkpoints and final_metrics.json, both reporting success. The
    lock is an flock: the kernel drops it when its process dies, so a rerun after a kill or preemption is never
    blocked. Evaluators do not take it. Cloud paths (gs://) cannot be locked, nor some network mounts (a warning).
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise WorkdirInUseError naming the run that holds it."""
        if "://" in self.workdir:
            return
        import fcntl
        import socket
        import time

        path = os.path.join(self.workdir, LOCK_FILE)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 512).decode(errors="replace").strip() or "a process that has not said which"
                os.close(fd)
                raise WorkdirInUseError(
                    f"--workdir={self.workdir} is in use by another training run ({holder}; {path}): two runs would "
                    "overwrite each other's checkpoints. Wait for it to end or stop it, or choose another --workdir"
                ) from None
            except OSError as e:  # a file system without locks
                os.close(fd)
                logging.warning("%s cannot be locked (%s): a second run on this workdir would not be noticed", path,
                                e.strerror or e)
                return
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break  # else the run that held it ended and removed it between open and flock: lock the new one
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (again: nothing)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.workdir, LOCK_FILE))
        os.close(self._fd)
        self._fd = None


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'mu/Transformer/encoder_norm/bias' -> shape, for an abstract state and for orbax's stored metadata alike."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {param_path(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _save_args(item: str, tree: Any) -> ocp.args.CheckpointArgs:
    # An item keeps the handler it first had in a manager: "ema", read in part (PyTreeRestore), is saved by
    # PyTreeSave. The files are those of StandardSave, so any reader reads it.
    return ocp.args.PyTreeSave(tree) if item == "ema" else ocp.args.StandardSave(tree)


def _without_none(tree: Any) -> Any:
    """A nested dict without its None leaves, nor the dicts left empty (what orbax's partial restore reads)."""
    if not isinstance(tree, dict):
        return tree
    kept = {key: _without_none(value) for key, value in tree.items() if value is not None}
    return {key: value for key, value in kept.items() if not (isinstance(value, dict) and not value)}


def _with_none(like: Any, tree: Any) -> Any:
    """`tree` (read by `_without_none(like)`) with `like`'s None leaves back in place."""
    if not isinstance(like, dict):
        return tree
    return {key: None if value is None else _with_none(value, tree.get(key, {})) for key, value in like.items()}


def layout_difference(stored: dict[str, tuple], wanted: dict[str, tuple], limit: int | None = None) -> str:
    """The keys missing, unexpected and of another shape in `stored` against `wanted`; '' when they agree."""
    missing, unexpected, wrong = key_differences(stored, wanted)

    def listed(keys: list[str], describe) -> str:
        shown = keys if limit is None else keys[:limit]
        more = f", ... ({len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
        return ", ".join(describe(k) for k in shown) + more

    parts = []
    if wrong:
        parts.append(f"{len(wrong)} of another shape: " + listed(wrong, lambda k: f"{k} (stored {stored[k]}, "
                                                                               f"this run {wanted[k]})"))
    if missing:
        parts.append(f"{len(missing)} missing: " + listed(missing, lambda k: f"{k} {wanted[k]}"))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: " + listed(unexpected, lambda k: f"{k} {stored[k]}"))
    return "; ".join(parts)


def check_writable(workdir: str) -> None:
    """Raise `CheckpointWriteError` unless `workdir` exists or can be created, and files can be written in it.

    Leaves nothing behind: a missing workdir is judged by the nearest existing parent (cloud paths by the first save).
    """
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointWriteError(f"--workdir={workdir} cannot be created: {existing} is a file, not a directory")
    if existing != path:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise CheckpointWriteError(f"--workdir={workdir} cannot be created: {existing} is not writable")
        return
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise CheckpointWriteError(f"--workdir={workdir} is not writable ({e.strerror or e}); choose another "
                                   "directory or fix its permissions / free space") from None


def checkpoint_dir(workdir: str) -> str:
    """Where a run's checkpoints live."""
    return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints")


def gather_json(value: Any) -> list[Any]:
    """Every process's (small) JSON value, in process order, on every process: JSON bytes padded and
    all-gathered. Every process must call it; `value` must be JSON (a failing `json.dumps` here would leave the
    others waiting)."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([encoded.size], np.int32)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded).reshape(len(lengths), -1)
    return [json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths)]


class Checkpoints:
    """Save and restore training state in WORKDIR/checkpoints (async, keep-N, any mesh on restore)."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True, remove_partial: bool = False):
        """`remove_partial`: delete step directories whose write was cut short (a kill mid-save) on opening; only
        for the run that owns the workdir (a concurrent reader must not delete a save in flight)."""
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=remove_partial)
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._pending_step: int | None = None  # the step of the save in flight
        self._closed = False

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, params: Any, opt_state: Any, meta: dict, data_state: dict | None,
             ema: Any | None = None) -> None:
        """Start an async save of `step` (every process must call this; each gives its own `data_state`);
        `ema`, the Polyak-averaged params, is saved as the "ema" item when given.

        A failed earlier save (disk full, permissions) raises `CheckpointWriteError` here or in `wait`/`close`.
        """
        data = {"processes": gather_json(data_state)}  # each process's iterator state
        arrays = {"params": params, "opt_state": opt_state, **({} if ema is None else {"ema": ema})}
        # The save in flight first (orbax waits for it anyway): its failure is reported as its own step's, and
        # a failure of this call as this step's.
        self.wait()
        with self._reporting_failures(step):
            self.manager.save(step, args=ocp.args.Composite(
                **{item: _save_args(item, tree) for item, tree in arrays.items()},
                meta=ocp.args.JsonSave(meta), data=ocp.args.JsonSave(data)), force=True)
        self._pending_step = step

    @contextlib.contextmanager
    def _reporting_failures(self, step: int | None = None):
        """Turn an orbax write failure into one `CheckpointWriteError` naming the step and the cause."""
        try:
            yield
        except Exception as e:  # orbax wraps the writer's error (in a thread) in its own types
            failed = self._pending_step if self._pending_step is not None else step
            self._pending_step = None
            cause = storage_failure(e)
            if cause is None:
                raise
            raise CheckpointWriteError(f"could not write the checkpoint of step {failed} to {self.directory}: "
                                       f"{cause}; {self._what_is_intact()}. Free space or fix permissions, then "
                                       "rerun the same command to resume") from e

    def _what_is_intact(self) -> str:
        """After a failed save, which complete checkpoint is left on disk, as a clause of the error.

        Read from disk, not from orbax's list of steps: a keep-N save drops the step it is to delete from that list
        when it starts, so after its failure the list misses a step still intact (keep=1: "no earlier checkpoint").
        The reload also lets a later save delete that step as due.
        """
        try:
            self.manager.reload()
        except Exception as e:  # the directory cannot be listed (permissions, a remote store out of reach)
            return f"the complete checkpoints in it cannot be listed ({describe_error(e)})"
        latest = self.manager.latest_step()
        return f"the checkpoint of step {latest} is intact" if latest is not None else "no earlier checkpoint"

    def _earlier_intact(self, step: int, where: str) -> str:
        """After `step` failed to read, what the run can go on from, as the error's advice (keep-N keeps earlier
        steps for this)."""
        try:
            earlier = [s for s in self.all_steps() if s < step]
        except Exception:  # the directory cannot be listed: nothing to advise from
            earlier = []
        if earlier:
            return (f"If they are damaged, move {where} out of {self.directory} and rerun to go on from step "
                    f"{earlier[-1]}, the latest complete checkpoint before it")
        return (f"No complete checkpoint before step {step} is in {self.directory}: if they are damaged, start "
                "afresh in another --workdir")

    def newer_if_removed(self, step: int) -> int | None:
        """After reading `step` failed: the latest step now, if `step` is gone from disk and a newer one is there (a
        training run writing this workdir saved it and its keep-N deleted `step` while it was read); else None."""
        from etils import epath  # a gs:// workdir too

        self.manager.reload()
        latest = self.manager.latest_step()
        gone = not (epath.Path(self.directory) / str(step)).exists()
        return latest if gone and latest is not None and latest > step else None

    def has_ema(self, step: int) -> bool:
        """Whether the checkpoint of `step` holds Polyak-averaged params (an "ema" item)."""
        from etils import epath  # a gs:// workdir too

        return (epath.Path(self.directory) / str(step) / "ema").is_dir()

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any | None,
                abstract_ema: Any | None = None) -> dict[str, Any]:
        """Read `step` onto the shardings of the abstract trees (jax.ShapeDtypeStruct with `sharding`).

        Returns {"params", "opt_state", "ema", "meta", "data_state"}; data_state is this process's iterator state
        (None when the checkpoint was written by a different number of processes). With `abstract_opt_state`
        None the optimizer state is not read (opt_state None): evaluating needs only the params. `abstract_ema`
        reads the Polyak-averaged params too, which the step must hold (`has_ema`: with several processes, one
        decides for all): the leaves it holds, onto their shardings; its None leaves (frozen parameters, whose
        average is the parameter) are neither read nor returned, though the average is stored whole.
        """
        where = os.path.join(self.directory, str(step))
        workdir = os.path.dirname(self.directory)
        advice = ("The checkpoint is left as it is: resume or evaluate it with the config it was written with, or "
                  f"start in another --workdir, afresh or fine-tuning from it with --config.pretrained={workdir}")
        read_ema = abstract_ema is not None
        items = {"params": abstract_params, "opt_state": abstract_opt_state,
                 "ema": abstract_params if read_ema else None}  # checked whole, as it is stored
        items = {item: abstract for item, abstract in items.items() if abstract is not None}
        for item, abstract in items.items():
            try:
                tree = item_tree_metadata(os.path.join(where, item))
            except Exception as e:  # orbax mostly returns no tree instead (below)
                raise CheckpointReadError(f"{where}: the {item} metadata cannot be read ({describe_error(e)}). "
                                          f"{advice}") from e
            stored, wanted = _leaf_shapes(tree), _leaf_shapes(abstract)
            if wanted and not stored:
                raise CheckpointReadError(f"{where}: the {item} metadata is missing or damaged (no array is "
                                          f"described in {os.path.join(where, item)}). {advice}")
            # Every parameter key is listed; an optimizer's state differs wholesale (another optimizer.name).
            difference = layout_difference(stored, wanted, limit=None if item == "params" else 6)
            if difference:
                cause = architecture_difference(stored, wanted) if item == "params" else ""
                what = ("optimizer (optimizer.name, optimizer.freeze, and whether optimizer.grad_clip_norm and, for "
                        "sgd, optimizer.weight_decay are above 0)" if item == "opt_state" else "model")
                raise CheckpointReadError(f"{where} was written by another {what} than this run's config"
                                          + (f" ({cause})" if cause else "") + f": its {item} keys differ "
                                          f"({difference}). {advice}")
        try:
            reads = {item: ocp.args.StandardRestore(abstract) for item, abstract in items.items() if item != "ema"}
            if read_ema:
                trained = _without_none(abstract_ema)
                reads["ema"] = ocp.args.PyTreeRestore(
                    trained, restore_args=ocp.checkpoint_utils.construct_restore_args(trained), partial_restore=True)
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **reads, meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        except Exception as e:  # orbax and TensorStore raise ValueError, OSError or a bare Exception
            raise CheckpointReadError(f"{where} cannot be read ({describe_error(e)}); its files may be damaged or "
                                      f"incomplete, or out of reach (then rerun once they are in reach). "
                                      f"{self._earlier_intact(step, where)}") from e
        states = (restored["data"] or {}).get("processes") or []
        data_state = states[jax.process_index()] if len(states) == jax.process_count() else None
        ema = _with_none(abstract_ema, restored["ema"]) if read_ema else None
        return {"params": restored["params"], "opt_state": restored.get("opt_state"), "ema": ema,
                "meta": restored["meta"], "data_state": data_state}

    def wait(self) -> None:
        """Block until pending async saves are on disk (`CheckpointWriteError` if one failed)."""
        with self._reporting_failures():
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        self._pending_step = None

    def close(self) -> None:
        """Finish pending saves and release the manager's threads (`CheckpointWriteError` if a save failed).

        Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait()
            # remove_partial's clean-up of unfinished steps runs in a thread that close() does not join: a failed
            # start removes the directories it created right after, and the thread then failed on them.
            getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        finally:
            self.manager.close()


class PreemptionWatcher:
    """Tells the loop when to save and stop because the job is being preempted (SIGTERM) or interrupted (Ctrl-C).

    With one process, a SIGTERM handler sets a flag checked at the next step. With several, JAX's preemption
    sync manager (started by jax.distributed.initialize) catches the signal and picks one step on which every
    process saves; `reached(step)` must then be called on every step by every process.
    With one process, the first Ctrl-C (SIGINT) does the same, `interrupted` set (it lost every step since the last
    checkpoint); the handler it replaced is put back at once, so a second Ctrl-C stops at once, without a save. A
    SIGINT that was ignored (a background job) stays ignored.
    """

    def __init__(self) -> None:
        self.signalled = False
        self.interrupted = False
        self._asked = False
        self._previous = None
        self._previous_int = None
        # Signal handlers can only be set from the main thread (a loop run from a notebook thread goes without).
        # A handler set outside Python (getsignal: None) could not be put back: that signal is left alone.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is not None:
                self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            if signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
                self._previous_int = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: saving a checkpoint at the next step, then stopping")
        self.signalled = True

    def _on_sigint(self, signum: int, frame: Any) -> None:
        logging.warning("interrupted (Ctrl-C): saving a checkpoint at the next step, then stopping; Ctrl-C again "
                        "stops at once, without one")
        self.signalled = self.interrupted = True
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_int is not None:
            signal.signal(signal.SIGINT, self._previous_int)
            self._previous_int = None

    def reached(self, step: int) -> bool:
        """True at the step on which to save and stop."""
        if jax.process_count() == 1:
            return self.signalled
        first, self._asked = not self._asked, True
        try:
            # The sync manager picks the step after the highest any process has asked about: a notice before the
            # loop's first question (during restore or compilation) picks step 1, which a resumed loop never asks
            # about, so its first question asks about step 1 too (first: the last step asked is what counts).
            early = first and step != 1 and multihost_utils.reached_preemption_sync_point(1)
            return multihost_utils.reached_preemption_sync_point(step) or early
        except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service=False)
            return False

    def close(self) -> None:
        """Put the previous SIGTERM and SIGINT handlers back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        self._restore_sigint()
