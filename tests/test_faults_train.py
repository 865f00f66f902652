"""Fault suite, in-process runs of `train.train_and_evaluate` on digits with a tiny model: an unwritable workdir,
a disk that fills up during a checkpoint write, and a loss driven to NaN by a huge learning rate.

What is simulated: "disk full" is orbax's JSON writer raising OSError(ENOSPC) for one step's "data" item, after
that step's params and optimizer state were already written by tensorstore (a write cut short half-way). An
unwritable workdir is a path under a regular file (fails for every user, root included) and, when not running as
root, a directory without write permission (root ignores permission bits).
"""

from __future__ import annotations

import errno
import os
import re
import stat

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.train_helpers import tiny_config
from vit_jax import checkpoints, sharding, train
from vit_jax.errors import UserError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    from vit_jax import data

    directory = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", directory)
    return directory


def digits_config(data_dir: str, **overrides):
    config = tiny_config(**{"dataset": "digits", "tfds_data_dir": data_dir, "train_split": "train",
                            "eval_split": "test", "model.num_layers": 1, "eval_every": 100000,
                            "data_workers": 0, **overrides})
    return config


def restore_latest(config, workdir: str) -> tuple[int, dict]:
    """The newest complete checkpoint of `workdir`, read back onto this run's mesh: (step, restored)."""
    mesh = sharding.make_mesh(config)
    ckpt = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        step = ckpt.latest_step()
        abstract = train.abstract_state(config, mesh, config.total_steps)
        return step, ckpt.restore(step, abstract["params"], abstract["opt_state"])
    finally:
        ckpt.close()


def all_finite(tree) -> bool:
    import jax

    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(jax.device_get(tree)))


def test_workdir_under_a_file_fails_before_training(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = digits_config(data_dir)
    with pytest.raises(UserError, match="not a directory|not writable") as error:
        train.train_and_evaluate(config, str(blocker / "workdir"))
    assert str(blocker) in str(error.value)
    assert blocker.read_text() == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_workdir_fails_before_training(tmp_path, data_dir):
    workdir = tmp_path / "read_only"
    workdir.mkdir()
    workdir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(UserError, match="not writable"):
            train.train_and_evaluate(digits_config(data_dir), str(workdir))
        assert os.listdir(workdir) == []
    finally:
        workdir.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("full_at", [4, 6])  # a middle step's write, and the last one's (final metrics follow it)
def test_disk_full_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, data_dir, monkeypatch, full_at):
    workdir = str(tmp_path / "run")
    config = digits_config(data_dir, total_steps=6, checkpoint_every=2, keep_checkpoints=1)
    original = ocp.handlers.JsonCheckpointHandler._save_fn
    failed = []

    async def disk_full(self, x, directory):
        if os.path.basename(os.path.dirname(str(directory))).startswith(f"{full_at}.") and "processes" in x:
            failed.append(str(directory))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(checkpoints.CheckpointWriteError, match=f"step {full_at}") as error:
        train.train_and_evaluate(config, workdir)
    assert failed, "the simulated disk-full never triggered"
    message = str(error.value)
    assert "No space left on device" in message and "\n" not in message
    monkeypatch.undo()

    # The previous checkpoint is whole (keep_checkpoints=1 must not have let the failed save delete it), and no
    # final_metrics.json names a step that is not on disk.
    step, restored = restore_latest(config, workdir)
    assert step == full_at - 2 and restored["meta"]["step"] == full_at - 2
    assert all_finite(restored["params"])
    assert sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == [str(full_at - 2)]
    assert not os.path.exists(os.path.join(workdir, train.FINAL_METRICS))


def test_nan_loss_stops_naming_the_step_and_the_last_checkpoint_restores(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    config = digits_config(data_dir, total_steps=30, checkpoint_every=1, keep_checkpoints=2, log_every=1,
                           **{"optimizer.lr": 1e9, "optimizer.warmup_steps": 1, "optimizer.grad_clip_norm": 0.0})
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as error:
        train.train_and_evaluate(config, workdir)
    bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    assert bad_step >= 1
    step, restored = restore_latest(config, workdir)
    # The newest checkpoint is from before the bad step and holds finite numbers only (restorable and usable).
    assert step == bad_step - 1  # checkpoint_every=1: the step just before
    assert restored["meta"]["step"] == step
    assert all_finite(restored["params"]) and all_finite(restored["opt_state"])
