"""Our own orbax training checkpoints as pre-trained weights: surgery on load, the masked-patch model, `main`.

The checkpoints are written exactly as `vit_jax.train` writes them (`vit_jax.checkpoints.Checkpoints` after a
few real train steps), then loaded at another resolution and class count.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.ndimage

from tests.train_helpers import tiny_config
from vit_jax import checkpoints, sharding, train
from vit_jax.interop import CheckpointError, load_pretrained, save_as
from vit_jax.interop.common import POSEMB_KEY, flatten, params_to_canonical

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny_config's model: hidden 32, 2 blocks, 2 heads, MLP 64, patch 4; 16px images (4x4 grid), 10 classes.
TINY_MODEL_FLAGS = ["--config.model.hidden_size=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
                    "--config.model.mlp_dim=64", "--config.model.patch_size=4"]


def _write_training_checkpoint(workdir: str, steps: int = 2, **overrides) -> tuple[dict, dict]:
    """The train state of `tiny_config(**overrides)` saved as vit_jax.train saves it at step `steps`.

    Returns (host params, config). The state is a fresh init (training steps would change the values, not the
    layout, and cost a compile).
    """
    config = tiny_config(**{"mesh.data": 1, **overrides})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    ckpt = checkpoints.Checkpoints(workdir, keep=2)
    ckpt.save(steps, state["params"], state["opt_state"],
              {"step": steps, "rng": np.asarray(jax.device_get(state["rng"])).tolist(), "train_loss": 1.0,
               "config": config.to_json_best_effort()}, None)
    ckpt.close()
    return jax.device_get(state["params"]), config


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("classifier_run"))
    params, config = _write_training_checkpoint(workdir, **{"model.gelu_approximate": False,
                                                            "model.layernorm_epsilon": 1e-5})
    return workdir, params, config


@pytest.fixture(scope="module")
def masked_patch_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("masked_patch_run"))
    params, config = _write_training_checkpoint(workdir, objective="masked_patch_prediction")
    return workdir, params, config


def _messages(caplog) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("where", ["workdir", "checkpoints", "step"])
def test_training_checkpoint_loads_at_new_resolution_and_class_count(classifier_run, caplog, where):
    workdir, trained, _ = classifier_run
    path = {"workdir": workdir, "checkpoints": os.path.join(workdir, "checkpoints"),
            "step": os.path.join(workdir, "checkpoints", "2")}[where]
    model = tiny_config().model  # the default numerics: tanh GELU, eps 1e-6
    caplog.set_level(logging.INFO)
    loaded = flatten(load_pretrained(path, model, num_classes=5, image_size=24))
    old = params_to_canonical(trained)

    assert loaded["head/kernel"].shape == (32, 5) and not loaded["head/kernel"].any()
    assert not loaded["head/bias"].any()
    for key in old:
        if key not in (POSEMB_KEY, "head/kernel", "head/bias"):
            np.testing.assert_array_equal(loaded[key], old[key], err_msg=key)
    # 4x4 -> 6x6 grid: the class token bit for bit, the grid as scipy's order-1 zoom (the original method).
    posemb = loaded[POSEMB_KEY]
    assert posemb.shape == (1, 37, 32)
    np.testing.assert_array_equal(posemb[:, 0], old[POSEMB_KEY][:, 0])
    grid = old[POSEMB_KEY][0, 1:].reshape(4, 4, 32).astype(np.float64)
    reference = scipy.ndimage.zoom(grid, (6 / 4, 6 / 4, 1), order=1).reshape(36, 32)
    np.testing.assert_allclose(posemb[0, 1:], reference, atol=1e-6)
    # The run's numerics (recorded in the checkpoint's meta) are set on the model config.
    assert model.gelu_approximate is False and model.layernorm_epsilon == 1e-5
    log = _messages(caplog)
    assert "new zero-initialised head with 5 classes (the checkpoint's head has 10 classes)" in log
    assert "resized position embeddings from a 4x4 to a 6x6 patch grid" in log
    assert "model.gelu_approximate=False" in log


def test_a_checkpoint_without_a_head_needs_a_class_count_and_each_command_says_what_it_does(masked_patch_run):
    """load_pretrained cannot guess a class count; predict refuses (it would predict nothing); visualize, whose
    figures never read the head, takes a 1-class zero head and the encoder as trained."""
    from vit_jax import predict, visualize
    from vit_jax.errors import UserError
    from vit_jax.interop import MissingHeadError

    workdir, trained, config = masked_patch_run
    with pytest.raises(MissingHeadError, match=rf"^{workdir}/checkpoints/2: has no classification head"):
        load_pretrained(workdir, tiny_config().model)
    with pytest.raises(UserError, match=rf"^--checkpoint={workdir}: has no classification head .* predict needs a "
                                        "fine-tuned classifier"):
        predict.load_params(workdir, tiny_config())
    loaded = flatten(visualize.load_params(workdir, tiny_config().model))
    assert loaded["head/kernel"].shape == (32, 1) and not loaded["head/kernel"].any()
    old = params_to_canonical(trained)
    for key in old:
        if not key.startswith(("masked_patch_head", "mask_embedding")):
            np.testing.assert_array_equal(loaded[key], old[key], err_msg=key)


def test_masked_patch_checkpoint_loads_into_a_classifier(masked_patch_run, caplog):
    workdir, trained, _ = masked_patch_run
    assert "masked_patch_head" in trained and "head" not in trained
    caplog.set_level(logging.INFO)
    model = tiny_config(**{"model.representation_size": 16}).model
    loaded = flatten(load_pretrained(workdir, model, num_classes=3, image_size=16))
    old = params_to_canonical(trained)
    assert not any(k.startswith(("mask_embedding", "masked_patch_head")) for k in loaded)
    assert loaded["head/kernel"].shape == (16, 3) and not loaded["head/kernel"].any()
    kernel = loaded["pre_logits/kernel"]  # new: LeCun normal, std 1/sqrt(fan_in = 32), 512 draws (3 sigma: 10%)
    assert kernel.shape == (32, 16) and abs(kernel.std() / (1 / np.sqrt(32)) - 1) < 0.1 and abs(kernel.mean()) < 0.03
    for key in old:
        if not key.startswith(("mask_embedding", "masked_patch_head")):
            np.testing.assert_array_equal(loaded[key], old[key], err_msg=key)
    log = _messages(caplog)
    assert "dropped the masked-patch-prediction head (mask_embedding, masked_patch_head/kernel, " \
           "masked_patch_head/bias; 512 colour classes): the model is a classifier" in log
    assert "new pre_logits (16 units" in log and "new zero-initialised head with 3 classes" in log


def test_classifier_checkpoint_loads_into_the_masked_patch_model(classifier_run, caplog):
    workdir, trained, _ = classifier_run
    caplog.set_level(logging.INFO)
    config = tiny_config(objective="masked_patch_prediction")
    loaded = flatten(load_pretrained(workdir, config.model, num_classes=10, image_size=16,
                                     masked_patch_classes=512))
    assert "head/kernel" not in loaded and loaded["masked_patch_head/kernel"].shape == (32, 512)
    old = params_to_canonical(trained)
    kept = [key for key in old if not key.startswith("head/")]
    assert set(loaded) == set(kept) | {"mask_embedding", "masked_patch_head/kernel", "masked_patch_head/bias"}
    for key in kept:  # the encoder as the checkpoint holds it: kernels are random, not the model's init
        np.testing.assert_array_equal(loaded[key], old[key], err_msg=key)
    # New task parameters as the model initialises them: mask embedding N(0, 0.02) (32 draws: sample std within
    # +-50%, > 3 sigma), zero prediction head.
    mask = loaded["mask_embedding"]
    assert mask.shape == (1, 1, 32) and np.all(mask != 0) and 0.01 < mask.std() < 0.03 and abs(mask.mean()) < 0.015
    assert not loaded["masked_patch_head/kernel"].any() and not loaded["masked_patch_head/bias"].any()
    assert "dropped the 10-class head" in _messages(caplog)


def test_restore_or_init_sets_the_numerics_before_the_train_step_is_built(classifier_run, tmp_path):
    source, trained, _ = classifier_run
    config = tiny_config(**{"mesh.data": 1, "pretrained": source, "num_classes": 4, "image_size": 24})
    assert config.model.gelu_approximate is True
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=1)
    try:
        state, data_state, meta = train.restore_or_init(config, mesh, config.total_steps, ckpt)
    finally:
        ckpt.close()
    assert data_state is None and meta == {}
    assert config.model.gelu_approximate is False and config.model.layernorm_epsilon == 1e-5
    assert train.make_model(config).gelu_approximate is False  # what make_train_step / make_eval_step build
    params = flatten(jax.device_get(state["params"]))
    np.testing.assert_array_equal(params["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"],
                                  trained["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_0"]["kernel"])
    assert params["head/kernel"].shape == (32, 4) and not params["head/kernel"].any()


def test_a_checkpoint_without_recorded_numerics_resumes_with_the_sources(classifier_run, tmp_path):
    """A checkpoint whose meta holds no config (written before runs recorded one): the numerics of
    config.pretrained, as when the run began."""
    source, _, _ = classifier_run
    config = tiny_config(**{"mesh.data": 1, "pretrained": source, "num_classes": 4, "image_size": 24})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=1)
    ckpt.save(1, state["params"], state["opt_state"], {"step": 1, "rng": [1, 2]}, {"position": 1})
    ckpt.close()
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep=1)
    try:
        _, _, meta = train.restore_or_init(config, mesh, config.total_steps, ckpt)
    finally:
        ckpt.close()
    assert meta["step"] == 1
    assert config.model.gelu_approximate is False and config.model.layernorm_epsilon == 1e-5


def test_apply_source_numerics_reads_the_runs_recorded_config(classifier_run):
    from vit_jax.interop import apply_source_numerics

    model = tiny_config().model
    numerics = apply_source_numerics(classifier_run[0], model)
    assert (numerics.gelu_approximate, numerics.layernorm_epsilon) == (False, 1e-5)
    assert model.gelu_approximate is False and model.layernorm_epsilon == 1e-5


def test_merge_refuses_params_that_do_not_fit():
    fresh = {"head": {"kernel": np.zeros((4, 2)), "bias": np.zeros(2)}}
    with pytest.raises(CheckpointError, match=r"head/kernel \(checkpoint \(4, 3\), model \(4, 2\)\)"):
        train._merge_pretrained({"head": {"kernel": np.zeros((4, 3)), "bias": np.zeros(2)}}, fresh)


def test_save_as_orbax_round_trip(tmp_path):
    config = tiny_config()
    params = jax.device_get(train.init_state(config, sharding.make_mesh(config, jax.devices()[:1]),
                                             config.total_steps)["params"])
    written = save_as(params, config.model, str(tmp_path / "ckpt"), "orbax")
    assert os.path.isdir(os.path.join(written, "params"))
    loaded = flatten(load_pretrained(str(tmp_path / "ckpt"), tiny_config().model))
    for key, value in params_to_canonical(params).items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        save_as(params, config.model, str(tmp_path / "ckpt"), "orbax")
    # The label kind is recorded as the run config's, for predict and --mode=eval to adopt (a sigmoid model's
    # logits were read through a softmax after a conversion to orbax).
    from vit_jax.interop import recorded_run_config

    assert recorded_run_config(str(tmp_path / "ckpt"))["label_kind"] == "single"
    save_as(params, config.model, str(tmp_path / "multi"), "orbax", label_kind="multi")
    assert recorded_run_config(str(tmp_path / "multi"))["label_kind"] == "multi"


def test_a_relative_checkpoint_path_loads(tmp_path, monkeypatch):
    """`--config.pretrained=workdir/run` (what `make demo-finetune` passes): orbax itself wants absolute paths."""
    config = tiny_config()
    params = jax.device_get(train.init_state(config, sharding.make_mesh(config, jax.devices()[:1]),
                                             config.total_steps)["params"])
    save_as(params, config.model, str(tmp_path / "run"), "orbax")
    monkeypatch.chdir(tmp_path)
    loaded = flatten(load_pretrained("run", tiny_config().model))
    np.testing.assert_array_equal(loaded["embedding/kernel"], params_to_canonical(params)["embedding/kernel"])


def test_main_fine_tunes_from_a_masked_patch_checkpoint(masked_patch_run, tmp_path):
    """`python -m vit_jax.main --config.pretrained=WORKDIR` end to end: digits at 24px from a 16px MPP run."""
    source, _, _ = masked_patch_run
    workdir = tmp_path / "finetune"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0"}  # no re-exec
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.main", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.tfds_data_dir={tmp_path / 'tfds'}", f"--config.pretrained={source}", *TINY_MODEL_FLAGS,
         "--config.image_size=24", "--config.total_steps=3", "--config.log_every=1", "--config.eval_every=3",
         "--config.batch_size=16", "--config.eval_batch_size=256", "--config.optimizer.warmup_steps=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped the masked-patch-prediction head" in result.stderr
    assert "resized position embeddings from a 4x4 to a 6x6 patch grid" in result.stderr
    assert "new zero-initialised head with 10 classes" in result.stderr
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["step"] == 3
    # The new zero head gives every class the same logit: the first step's loss is ln 10 = 2.3026, whatever the
    # labels (the encoder's weights are the checkpoint's, the head the only new part).
    assert re.search(r"step 1/3 \| loss 2\.302[56] ", result.stdout + result.stderr), result.stdout[-2000:]
