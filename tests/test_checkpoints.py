"""Checkpoints: restore onto another mesh, keep-N, layout and damage checks, what a resume or an evaluation takes
from the checkpoint. A real run killed (SIGKILL) or preempted (SIGTERM) and resumed: tests/test_faults_kill.py."""

import glob
import os
import re

import jax
import numpy as np
import pytest

from tests.train_helpers import tiny_config
from vit_jax import checkpoints, sharding, train


def test_restore_onto_a_different_mesh_and_keep_the_newest(tmp_path):
    config = tiny_config(**{"mesh.data": 8})
    mesh = sharding.make_mesh(config)
    state = train.init_state(config, mesh, config.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state["params"], state["opt_state"], {"step": step, "rng": [1, 2]}, {"position": step})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]

    other = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2})
    other_mesh = sharding.make_mesh(other)
    abstract = train.abstract_state(other, other_mesh, other.total_steps)
    restored = ckpt.restore(3, abstract["params"], abstract["opt_state"])
    ckpt.close()
    assert restored["meta"] == {"step": 3, "rng": [1, 2]}
    assert restored["data_state"] == {"position": 3}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), jax.device_get(state["params"]))
    kernel = restored["params"]["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
    assert kernel.sharding.mesh.shape == other_mesh.shape


# ------------------------------------------------------------------------------------------------------------------
def _saved_tiny_run(directory) -> dict:
    config = tiny_config(**{"mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    ckpt = checkpoints.Checkpoints(str(directory), keep=2)
    ckpt.save(2, state["params"], state["opt_state"], {"step": 2, "rng": [1, 2]}, {"position": 2})
    ckpt.close()
    return state


def _restore(directory, **overrides) -> dict:
    config = tiny_config(**{"mesh.data": 1, **overrides})
    abstract = train.abstract_state(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps)
    ckpt = checkpoints.Checkpoints(str(directory), keep=2)
    try:
        return ckpt.restore(2, abstract["params"], abstract["opt_state"])
    finally:
        ckpt.close()


@pytest.mark.parametrize("overrides", [
    {"optimizer.name": "sgd", "optimizer.weight_decay": 0.0},
    {"optimizer.name": "sgd", "optimizer.weight_decay": 1e-4},
    {"optimizer.grad_clip_norm": 0.0},
    {"model.scan": True},
], ids=["sgd", "sgd_decay", "no_clip", "scan"])
def test_the_layout_check_accepts_what_each_optimizer_and_scan_save(tmp_path, overrides):
    """The stored metadata (optax's named tuples saved as dicts) and the abstract state name their keys alike."""
    config = tiny_config(**{"mesh.data": 1, **overrides})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
    ckpt.save(2, state["params"], state["opt_state"], {"step": 2, "rng": [1, 2]}, {"position": 2})
    ckpt.close()
    restored = _restore(tmp_path, **overrides)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["opt_state"]),
                 jax.device_get(state["opt_state"]))


def test_params_alone_restore_under_another_optimizer(tmp_path):
    """What --mode=eval reads: an Adam run's params, with an SGD config; the optimizer state is not read."""
    state = _saved_tiny_run(tmp_path)
    config = tiny_config(**{"mesh.data": 1, "optimizer.name": "sgd"})
    abstract = train.abstract_state(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
    restored = ckpt.restore(2, abstract["params"], None)
    ckpt.close()
    assert restored["opt_state"] is None and restored["meta"]["step"] == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), jax.device_get(state["params"]))


def test_resuming_or_evaluating_takes_the_numerics_the_run_recorded(tmp_path):
    """A run fine-tuned from exact-GELU weights (timm, HF) records its numerics in each checkpoint's meta: a
    resume or --mode=eval computes as it trained, not with the defaults (tanh GELU, eps 1e-6), and without reading
    --config.pretrained again."""
    trained = tiny_config(**{"mesh.data": 1, "model.gelu_approximate": False, "model.layernorm_epsilon": 1e-12})
    mesh = sharding.make_mesh(trained, jax.devices()[:1])
    state = train.init_state(trained, mesh, trained.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
    meta = {"step": 2, "rng": [1, 2], "config": trained.to_json_best_effort()}
    ckpt.save(2, state["params"], state["opt_state"], meta, {"position": 2})
    ckpt.close()
    # Also with the --config.pretrained the run started from, now gone (a preempted spot VM's /tmp): not read.
    for params_only, pretrained in ((True, ""), (False, ""), (False, str(tmp_path / "gone" / "ViT-B_16.npz"))):
        config = tiny_config(**{"mesh.data": 1, "pretrained": pretrained})
        assert (config.model.gelu_approximate, config.model.layernorm_epsilon) == (True, 1e-6)
        ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
        try:
            train.restore_or_init(config, mesh, config.total_steps, ckpt, params_only=params_only)
        finally:
            ckpt.close()
        assert (config.model.gelu_approximate, config.model.layernorm_epsilon) == (False, 1e-12)


def test_restore_reads_a_remote_checkpoints_metadata_at_its_uri(monkeypatch):
    """gs:// paths reach orbax as they are (os.path.abspath would turn them into a local 'gs:/...')."""
    import orbax.checkpoint as ocp

    from vit_jax.interop import orbax_io

    seen = []
    monkeypatch.setattr(ocp.StandardCheckpointer, "metadata", lambda self, path: seen.append(path))
    orbax_io.item_tree_metadata("gs://bucket/run/checkpoints/2/params")
    assert seen == ["gs://bucket/run/checkpoints/2/params"]


def _files(directory) -> dict[str, bytes]:
    return {path: open(path, "rb").read() for path in glob.glob(f"{directory}/**/*", recursive=True)
            if os.path.isfile(path)}


def test_resuming_with_another_model_lists_every_differing_key_and_changes_nothing(tmp_path):
    _saved_tiny_run(tmp_path)
    before = _files(tmp_path)
    with pytest.raises(checkpoints.CheckpointReadError) as err:
        _restore(tmp_path, **{"model.hidden_size": 48, "model.mlp_dim": 96})
    message = str(err.value)
    assert "was written by another model" in message and "hidden_size 32, mlp_dim 64 vs model 48, 96" in message
    # every parameter of the 2-block tiny model differs but the head's bias and the classes: all are named
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel (stored (32, 64), this run (48, 96))" in message
    assert "head/kernel (stored (32, 10), this run (48, 10))" in message
    assert message.count("(stored ") == int(re.search(r"(\d+) of another shape", message).group(1))
    assert f"--config.pretrained={tmp_path}" in message
    assert _files(tmp_path) == before


def test_resuming_with_another_optimizer_is_a_clear_error(tmp_path):
    _saved_tiny_run(tmp_path)
    with pytest.raises(checkpoints.CheckpointReadError, match="another optimizer.*opt_state keys differ"):
        _restore(tmp_path, **{"optimizer.name": "sgd"})
    # Clipping is a step of the optimizer's chain (as big_vision's): switching it off moves the state's keys.
    with pytest.raises(checkpoints.CheckpointReadError, match="whether optimizer.grad_clip_norm"):
        _restore(tmp_path, **{"optimizer.grad_clip_norm": 0.0})


def test_a_save_that_fails_at_once_names_its_own_step(tmp_path, monkeypatch):
    import errno

    config = tiny_config(**{"mesh.data": 1})
    state = train.init_state(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
    ckpt.save(2, state["params"], state["opt_state"], {"step": 2}, {"position": 2})  # in flight when step 4 saves

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path))

    monkeypatch.setattr(ckpt.manager, "save", disk_full)
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"could not write the checkpoint of step 4 .*; the checkpoint of step 2 is intact"):
        ckpt.save(4, state["params"], state["opt_state"], {"step": 4}, {"position": 4})
    monkeypatch.undo()
    ckpt.close()


def test_tensorstores_full_disk_is_a_write_error_saying_so(tmp_path, monkeypatch):
    """TensorStore, orbax's array writer, reports a full disk as a ValueError (not an OSError): it escaped as a
    traceback; now one CheckpointWriteError that leads with the OS's words."""
    config = tiny_config(**{"mesh.data": 1})
    state = train.init_state(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)

    def tensorstore_full(*args, **kwargs):  # its wording, from a real save onto a full tmpfs
        raise ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/2.orbax-checkpoint-tmp/'
                         'opt_state.orbax-checkpoint-tmp/_sharding": Failed to write 51285 bytes to file 6: No space '
                         "left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt.manager, "save", tensorstore_full)
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"could not write the checkpoint of step 2 to .*: No space left on device "
                             r"\(RESOURCE_EXHAUSTED: Error writing local file .*\); no earlier checkpoint"):
        ckpt.save(2, state["params"], state["opt_state"], {"step": 2}, {"position": 2})
    monkeypatch.undo()
    ckpt.close()


def test_a_save_that_fails_in_the_background_names_the_intact_earlier_step(tmp_path, monkeypatch):
    """With keep=1 orbax forgets step 2 (to be deleted) when step 4's save starts: the failure once said "no
    earlier checkpoint" although step 2 is intact on disk."""
    import errno

    from orbax.checkpoint._src.path import async_path

    config = tiny_config(**{"mesh.data": 1})
    state = train.init_state(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=1)
    ckpt.save(2, state["params"], state["opt_state"], {"step": 2}, {"position": 2})
    ckpt.wait()

    async def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(async_path, "rename", disk_full)  # step 4's finalising rename, in the background
    ckpt.save(4, state["params"], state["opt_state"], {"step": 4}, {"position": 4})
    with pytest.raises(checkpoints.CheckpointWriteError,
                       match=r"could not write the checkpoint of step 4 .*; the checkpoint of step 2 is intact"):
        ckpt.wait()
    monkeypatch.undo()
    assert ckpt.latest_step() == 2 and ckpt.all_steps() == [2]
    ckpt.close()


@pytest.mark.parametrize("damage", ["overwrite", "delete", "metadata"])
# orbax's other pending reads fail too and are reported at garbage collection
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    _saved_tiny_run(tmp_path)
    data = glob.glob(f"{tmp_path}/checkpoints/2/params/ocdbt.process_0/d/*")
    assert data
    if damage == "metadata":  # orbax then describes no array at all
        os.remove(f"{tmp_path}/checkpoints/2/params/_METADATA")
        with pytest.raises(checkpoints.CheckpointReadError, match="checkpoints/2: the params metadata is missing"):
            _restore(tmp_path)
        return
    for path in data:
        if damage == "overwrite":
            with open(path, "wb") as f:
                f.write(np.random.default_rng(0).bytes(64))
        else:
            os.remove(path)
    with pytest.raises(checkpoints.CheckpointReadError, match="checkpoints/2 cannot be read .*damaged or incomplete"):
        _restore(tmp_path)


def test_a_key_of_another_prng_implementation_resumes_with_a_new_key(tmp_path, caplog):
    """A TPU run's 4-word rbg key resumed where keys are threefry's 2 words (or back): a key drawn from the seed
    and the step, with a warning, instead of a TypeError at the first step; a fitting key is kept as it was."""
    import logging

    config = tiny_config(**{"mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    for step, rng in ((2, [7, 8]), (3, [1, 2, 3, 4])):
        ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
        ckpt.save(step, state["params"], state["opt_state"], {"step": step, "rng": rng}, {"position": step})
        ckpt.close()
        ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING):
                resumed, _, _ = train.restore_or_init(config, mesh, config.total_steps, ckpt)
        finally:
            ckpt.close()
        key = np.asarray(jax.device_get(resumed["rng"]))
        if len(rng) == 2:
            np.testing.assert_array_equal(key, rng)
            assert "training key" not in caplog.text
        else:
            assert key.shape == (2,) and "training key has shape (4,)" in caplog.text
            jax.random.fold_in(resumed["rng"], 1)  # a usable key


def test_an_evaluation_scores_the_loss_the_run_trained_with(tmp_path, caplog):
    """A sigmoid (multi-label) run evaluated without --config.label_kind=multi: its recorded label kind, with a
    warning (a softmax loss of sigmoid logits means nothing); resuming its training keeps this config's."""
    import logging

    trained = tiny_config(**{"mesh.data": 1, "label_kind": "multi"})
    mesh = sharding.make_mesh(trained, jax.devices()[:1])
    state = train.init_state(trained, mesh, trained.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
    ckpt.save(1, state["params"], state["opt_state"],
              {"step": 1, "rng": [1, 2], "config": trained.to_json_best_effort()}, {"position": 1})
    ckpt.close()
    for params_only, expected in ((True, "multi"), (False, "single")):
        config = tiny_config(**{"mesh.data": 1})
        ckpt = checkpoints.Checkpoints(str(tmp_path), keep=2)
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING):
                train.restore_or_init(config, mesh, config.total_steps, ckpt, params_only=params_only)
        finally:
            ckpt.close()
        assert config.label_kind == expected
        assert ("trained with label_kind='multi'" in caplog.text) == params_only


def test_a_second_training_run_on_a_held_workdir_is_refused_and_a_killed_holder_blocks_nothing(tmp_path):
    """Two runs on one workdir overwrote each other's checkpoints (both reported success): the second is refused,
    naming the first; the lock dies with its process (a SIGKILLed run's rerun starts), and a release removes it."""
    import subprocess
    import sys

    first = checkpoints.WorkdirLock(str(tmp_path))
    first.acquire()
    assert (tmp_path / checkpoints.LOCK_FILE).is_file()
    with pytest.raises(checkpoints.WorkdirInUseError,
                       match=rf"--workdir={re.escape(str(tmp_path))} is in use by another training run \(pid "
                             rf"{os.getpid()} on .* since \d{{4}}-"):
        checkpoints.WorkdirLock(str(tmp_path)).acquire()
    first.release()
    first.release()  # again: nothing
    assert not (tmp_path / checkpoints.LOCK_FILE).exists()

    killed = subprocess.run([sys.executable, "-c", "import os, signal, sys; from vit_jax import checkpoints; "
                             "checkpoints.WorkdirLock(sys.argv[1]).acquire(); os.kill(os.getpid(), signal.SIGKILL)",
                             str(tmp_path)], cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True)
    assert killed.returncode == -9 and (tmp_path / checkpoints.LOCK_FILE).is_file()  # left behind, unlocked
    again = checkpoints.WorkdirLock(str(tmp_path))
    again.acquire()
    again.release()


def test_train_and_evaluate_refuses_a_workdir_another_run_holds(tmp_path):
    from tests.test_train import _digits_run_config

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = checkpoints.WorkdirLock(str(workdir))
    holder.acquire()
    with pytest.raises(checkpoints.WorkdirInUseError, match="is in use by another training run"):
        train.train_and_evaluate(_digits_run_config(tmp_path, total_steps=1), str(workdir))
    assert sorted(os.listdir(workdir)) == [checkpoints.LOCK_FILE]  # nothing of the refused run's
    holder.release()


def test_a_first_ctrl_c_asks_for_a_save_and_puts_the_previous_handler_back():
    """A real SIGINT: the watcher asks for a save and gives Ctrl-C back to the handler it replaced (a second one
    raises KeyboardInterrupt at once); an ignored SIGINT (a background job) stays ignored."""
    import signal
    import time

    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        watcher = checkpoints.PreemptionWatcher()
        assert not watcher.reached(1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert watcher.reached(2) and watcher.interrupted
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        watcher.close()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ignored = checkpoints.PreemptionWatcher()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        ignored.close()
    finally:
        signal.signal(signal.SIGINT, before)
