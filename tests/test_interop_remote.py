"""Checkpoints at remote URIs: read through a cached local copy, written through a temporary one.

The remote file system is TensorFlow's in-memory `ram://` (the same tf.io.gfile code path as gs://, offline).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid

import jax
import numpy as np
import pytest
import tensorflow as tf

from tests.test_interop_common import random_params, tiny_config
from tests.train_helpers import tiny_config as tiny_train_config
from vit_jax import checkpoints, sharding, train
from vit_jax.interop import CheckpointError, detect_format, load_pretrained, remote, save_as
from vit_jax.interop.common import flatten, params_to_canonical


@pytest.fixture
def bucket(tmp_path, monkeypatch) -> str:
    """A fresh ram:// directory, and a fresh cache for remote copies."""
    monkeypatch.setenv("VIT_JAX_CACHE", str(tmp_path / "cache"))
    return f"ram://{uuid.uuid4().hex}"


def _assert_same(loaded: dict, expected: dict) -> None:
    loaded, expected = flatten(loaded), params_to_canonical(expected)
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def _cached_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)).split(os.sep, 1)[1] for p in root.rglob("*") if p.is_file())


def test_npz_written_to_and_read_from_a_remote_path_through_the_cache(bucket, tmp_path):
    config = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-5)  # loading resets them to npz's
    params = random_params(config, 7)
    path = f"{bucket}/ckpts/vit.npz"
    assert save_as(params, config, path, "npz") == path
    assert tf.io.gfile.exists(path) and not os.path.exists("ram:")  # nothing written to a local "ram:" directory
    assert detect_format(path) == "npz"

    _assert_same(load_pretrained(path, config), params)
    assert config.gelu_approximate is True and config.layernorm_epsilon == 1e-6
    assert _cached_files(tmp_path) == [".vit_jax_copy.lock", "ckpts/.vit_jax_copy.json", "ckpts/vit.npz"]
    (copy,) = (tmp_path / "cache").rglob("vit.npz")
    copied_at = copy.stat().st_mtime_ns
    load_pretrained(path, tiny_config())
    assert copy.stat().st_mtime_ns == copied_at  # unchanged remote file: the copy is reused

    tf.io.gfile.remove(path)  # replaced by a checkpoint of another size: copied again
    other = random_params(config, 3, seed=5)
    save_as(other, config, path, "npz")
    _assert_same(load_pretrained(path, tiny_config()), other)


def test_hf_directory_round_trips_through_a_remote_path_with_its_numerics(bucket, tmp_path):
    config = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-12)  # HF ViT's defaults
    params = random_params(config, 4)
    path = f"{bucket}/hf"
    assert save_as(params, config, path, "hf") == path
    assert sorted(tf.io.gfile.listdir(path)) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    loaded_config = tiny_config()
    _assert_same(load_pretrained(path, loaded_config), params)
    assert loaded_config.gelu_approximate is False and loaded_config.layernorm_epsilon == 1e-12
    assert _cached_files(tmp_path) == [".vit_jax_copy.lock", "hf/.vit_jax_copy.json", "hf/config.json",
                                       "hf/model.safetensors", "hf/preprocessor_config.json"]
    # Its input normalisation is read from the copy: ImageNet's folds into the patch embedding.
    tf.io.gfile.remove(f"{path}/preprocessor_config.json")  # ram:// appends to an existing file
    with tf.io.gfile.GFile(f"{path}/preprocessor_config.json", "w") as f:
        f.write(json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    folded = load_pretrained(path, tiny_config())
    np.testing.assert_allclose(folded["embedding"]["kernel"][:, :, 1], params["embedding"]["kernel"][:, :, 1] / 0.448,
                               rtol=1e-6)


def test_a_file_loses_the_numerics_of_a_config_json_deleted_beside_it(bucket):
    import json

    config = tiny_config(gelu_approximate=True, layernorm_epsilon=1e-5)
    save_as(random_params(config, 4), config, f"{bucket}/hf", "hf")
    cfg_path = f"{bucket}/hf/config.json"  # made to say other numerics than those recorded in the weights
    cfg = json.loads(tf.io.gfile.GFile(cfg_path).read())
    tf.io.gfile.remove(cfg_path)  # ram:// overwrites in place, keeping a longer old file's tail
    with tf.io.gfile.GFile(cfg_path, "w") as f:
        f.write(json.dumps({**cfg, "hidden_act": "gelu", "layer_norm_eps": 1e-7}))
    weights = f"{bucket}/hf/model.safetensors"
    first = tiny_config(gelu_approximate=True, layernorm_epsilon=1e-5)
    load_pretrained(weights, first)
    assert first.gelu_approximate is False and first.layernorm_epsilon == 1e-7  # from the config.json beside it

    tf.io.gfile.remove(cfg_path)  # the cached copy of it must not still count
    again = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-7)
    load_pretrained(weights, again)
    assert again.gelu_approximate is True and again.layernorm_epsilon == 1e-5  # recorded in the weights' metadata


def test_remote_training_workdir_loads_its_latest_step_without_optimizer_state(bucket, tmp_path):
    config = tiny_train_config(**{"mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    workdir = str(tmp_path / "run")
    ckpt = checkpoints.Checkpoints(workdir, keep=2)
    for step in (1, 2):
        params = jax.tree.map(lambda x, s=step: x + s, state["params"])
        ckpt.save(step, params, state["opt_state"], {"step": step, "config": config.to_json_best_effort()}, None)
    ckpt.close()
    remote.upload(workdir, f"{bucket}/run")

    loaded = load_pretrained(f"{bucket}/run", tiny_train_config().model)
    _assert_same(loaded, jax.device_get(params))  # step 2's
    copied = _cached_files(tmp_path)
    assert any(name.startswith("2/params/") for name in copied)
    assert not any(name.startswith(("2/opt_state", "1/")) for name in copied), copied
    _assert_same(load_pretrained(f"{bucket}/run/checkpoints/2/", tiny_train_config().model), jax.device_get(params))

    # On a bucket orbax writes a step in place and its commit file last: a step without one is still being written.
    tf.io.gfile.remove(f"{bucket}/run/checkpoints/2/commit_success.txt")
    step_1 = jax.tree.map(lambda x: x + 1, state["params"])
    _assert_same(load_pretrained(f"{bucket}/run", tiny_train_config().model), jax.device_get(step_1))


def test_an_interrupted_upload_of_a_runs_only_step_is_not_loaded(bucket, tmp_path, monkeypatch):
    """An upload cut off before the step's commit file (which comes after all of the step: else params without
    meta would load with the wrong numerics) is refused, through the workdir, its checkpoints/ and the step
    itself, even with no finished step beside it."""
    config = tiny_train_config(**{"mesh.data": 1})
    state = train.init_state(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps)
    workdir = str(tmp_path / "run")
    ckpt = checkpoints.Checkpoints(workdir, keep=1)
    ckpt.save(1, state["params"], state["opt_state"], {"step": 1, "config": config.to_json_best_effort()}, None)
    ckpt.close()
    copy = tf.io.gfile.copy

    def cut_off_at_the_commit_file(source: str, dest: str, overwrite: bool = False) -> None:
        if dest.endswith("/checkpoints/1/commit_success.txt"):
            raise tf.errors.UnavailableError(None, None, "connection reset")
        copy(source, dest, overwrite=overwrite)

    with monkeypatch.context() as patched:
        patched.setattr(tf.io.gfile, "copy", cut_off_at_the_commit_file)
        with pytest.raises(CheckpointError, match=f"{bucket}/run: cannot write .*connection reset"):
            remote.upload(workdir, f"{bucket}/run")
    for item in ("params", "meta"):
        assert tf.io.gfile.isdir(f"{bucket}/run/checkpoints/1/{item}")
    assert not tf.io.gfile.exists(f"{bucket}/run/checkpoints/1/commit_success.txt")

    with pytest.raises(CheckpointError, match="run: its checkpoints/ holds no finished checkpoint yet"):
        load_pretrained(f"{bucket}/run", tiny_train_config().model)
    with pytest.raises(CheckpointError, match=r"checkpoints: no finished orbax step: step\(s\) 1 have no commit"):
        load_pretrained(f"{bucket}/run/checkpoints", tiny_train_config().model)
    with pytest.raises(CheckpointError, match=r"checkpoints/1: unfinished orbax step \(no commit_success.txt\)"):
        load_pretrained(f"{bucket}/run/checkpoints/1", tiny_train_config().model)

    tf.io.gfile.rmtree(f"{bucket}/run")  # ram:// appends to a file copied over (a bucket replaces it)
    remote.upload(workdir, f"{bucket}/run")  # copied again, in full
    _assert_same(load_pretrained(f"{bucket}/run", tiny_train_config().model), jax.device_get(state["params"]))


def test_a_remote_steps_polyak_average_is_read_without_its_params(bucket, tmp_path):
    """WORKDIR/checkpoints/STEP/ema names the step's averaged params: only they and the meta are copied; the
    params of a plain path are copied without the average; a step without one says so."""
    config = tiny_train_config(**{"mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = train.init_state(config, mesh, config.total_steps)
    workdir = str(tmp_path / "run")
    ckpt = checkpoints.Checkpoints(workdir, keep=2)
    average = jax.tree.map(lambda x: x - 1, state["params"])
    ckpt.save(1, state["params"], state["opt_state"], {"step": 1, "config": config.to_json_best_effort()}, None,
              ema=average)
    ckpt.save(2, state["params"], state["opt_state"], {"step": 2, "config": config.to_json_best_effort()}, None)
    ckpt.close()
    remote.upload(workdir, f"{bucket}/run")

    _assert_same(load_pretrained(f"{bucket}/run/checkpoints/1/ema", tiny_train_config().model),
                 jax.device_get(average))
    copied = _cached_files(tmp_path)
    assert any(name.startswith("1/ema/") for name in copied) and any(name.startswith("1/meta/") for name in copied)
    assert not any(name.startswith(("1/params", "1/opt_state")) for name in copied), copied
    _assert_same(load_pretrained(f"{bucket}/run/checkpoints/1", tiny_train_config().model),
                 jax.device_get(state["params"]))
    entries = sorted(sorted(p.name for p in (digest / "1").iterdir() if p.is_dir())
                     for digest in (tmp_path / "cache").iterdir())
    assert entries == [["ema", "meta"], ["meta", "params"]]
    with pytest.raises(CheckpointError, match=r"checkpoints/2 holds no Polyak average"):
        load_pretrained(f"{bucket}/run/checkpoints/2/ema", tiny_train_config().model)


def test_missing_corrupt_and_occupied_remote_paths_are_refused_by_name(bucket):
    config = tiny_config()
    with pytest.raises(CheckpointError, match=f"^{bucket}/nope.npz: no such file or directory"):
        load_pretrained(f"{bucket}/nope.npz", config)

    with tf.io.gfile.GFile(f"{bucket}/junk.safetensors", "wb") as f:
        f.write(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=rf"^{bucket}/junk.safetensors \(copied to .*\): .*unrecognised "
                                              r"checkpoint file"):
        load_pretrained(f"{bucket}/junk.safetensors", config)

    tf.io.gfile.makedirs(f"{bucket}/empty")
    with pytest.raises(CheckpointError, match=f"^{bucket}/empty: a directory that is neither an orbax checkpoint"):
        load_pretrained(f"{bucket}/empty", config)

    tf.io.gfile.makedirs(f"{bucket}/orbax")
    with tf.io.gfile.GFile(f"{bucket}/orbax/README", "wb") as f:
        f.write(b"someone else's")
    with pytest.raises(CheckpointError, match=f"{bucket}/orbax: exists and is not empty"):
        save_as(random_params(config, 2), config, f"{bucket}/orbax", "orbax")


def test_orbax_export_to_a_remote_directory_loads_back(bucket, caplog):
    config = tiny_config()
    params = random_params(config, 6)
    caplog.set_level(logging.INFO)
    assert save_as(params, config, f"{bucket}/exported", "orbax") == f"{bucket}/exported/0"
    ours = " ".join(r.getMessage() for r in caplog.records if r.filename == "loading.py")
    assert f"wrote {bucket}/exported/0 (orbax" in ours and "vit_jax_save_" not in ours  # not the temporary copy
    _assert_same(load_pretrained(f"{bucket}/exported", tiny_config()), params)


def test_local_paths_are_not_copied(tmp_path):
    assert not remote.is_remote(str(tmp_path)) and remote.is_remote("gs://bucket/x.npz")
    assert remote.local_copy(str(tmp_path / "x.npz"), cache=str(tmp_path / "c")) == str(tmp_path / "x.npz")
    assert not (tmp_path / "c").exists()


def _fake_steps(root: str, steps: dict[int, bool], makedirs=os.makedirs, write=None) -> None:
    """Step directories `root/<n>/params/`, each with orbax's commit file if `steps[n]` (the layout only)."""
    for step, committed in steps.items():
        makedirs(f"{root}/{step}/params")
        if committed and write:
            write(f"{root}/{step}/commit_success.txt")


def test_pinned_step_names_the_latest_finished_step_local_and_remote(bucket, tmp_path):
    workdir = str(tmp_path / "run")
    _fake_steps(f"{workdir}/checkpoints", {3: True, 5: True})
    latest = f"{workdir}/checkpoints/5"
    assert remote.pinned_step(workdir) == latest
    assert remote.pinned_step(f"{workdir}/checkpoints") == latest
    assert remote.pinned_step(f"{workdir}/checkpoints/3") == f"{workdir}/checkpoints/3"
    npz = tmp_path / "vit.npz"
    npz.write_bytes(b"")
    assert remote.pinned_step(str(npz)) == str(npz)  # not a workdir: as it is
    os.makedirs(tmp_path / "fresh" / "checkpoints")
    with pytest.raises(CheckpointError, match="fresh: its checkpoints/ holds no finished checkpoint yet"):
        remote.pinned_step(str(tmp_path / "fresh"))

    def touch(path: str) -> None:
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(b"")

    _fake_steps(f"{bucket}/run/checkpoints", {3: True, 5: False}, tf.io.gfile.makedirs, touch)
    assert remote.pinned_step(f"{bucket}/run") == f"{bucket}/run/checkpoints/3"  # 5 is still being written
    assert remote.pinned_step(f"{bucket}/vit.npz") == f"{bucket}/vit.npz"


def test_upload_copies_config_json_after_the_weights_and_the_commit_file_last(bucket, tmp_path, monkeypatch):
    """A directory lists its files in any order (tmpfs: newest first): config.json, which marks an HF model
    directory, once went up before model.safetensors, so an interrupted upload left a model that cannot load."""
    local = tmp_path / "export"
    local.mkdir()
    for name in ("config.json", "commit_success.txt", "model.safetensors", "README"):
        (local / name).write_bytes(b"x")
    walk, copy, copied = os.walk, tf.io.gfile.copy, []

    def config_first(top, topdown=True):  # a listing that puts config.json before the weights
        for dirpath, dirs, files in walk(top, topdown=topdown):
            yield dirpath, dirs, sorted(files)

    def record(source: str, dest: str, overwrite: bool = False) -> None:
        copied.append(dest.rsplit("/", 1)[-1])
        copy(source, dest, overwrite=overwrite)

    monkeypatch.setattr(os, "walk", config_first)
    monkeypatch.setattr(tf.io.gfile, "copy", record)
    remote.upload(str(local), f"{bucket}/hf")
    assert copied == ["README", "model.safetensors", "config.json", "commit_success.txt"]


@pytest.mark.parametrize("url, advice", [
    ("https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz",
     "give gs://vit_models/imagenet21k/ViT-B_16.npz (the same Cloud Storage object)"),
    ("HTTP://storage.cloud.google.com/vit_models/augreg/x.npz?authuser=1", "give gs://vit_models/augreg/x.npz "),
    ("http://example.com/vit.pth", "give a local path (download the file first, e.g. with wget or curl)"),
])
def test_http_urls_are_refused_up_front_saying_what_to_give(tmp_path, url, advice):
    """tf.io.gfile has no http(s) file system: its "File system scheme 'https' not implemented" named neither the
    cause nor the gs:// path of the same object."""
    scheme = url.split(":", 1)[0].lower()
    message = rf"^{re.escape(url)}: {scheme}:// URLs are not supported .*; {re.escape(advice)}"
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(url, tiny_config())
    with pytest.raises(CheckpointError, match=message):
        remote.pinned_step(url)  # how a training run's config.pretrained is read first
    with pytest.raises(CheckpointError, match=message):
        save_as(random_params(tiny_config(), 2), tiny_config(), url, "hf")  # nor written to
