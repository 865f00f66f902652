"""`python -m vit_jax.convert` on a tiny model: configs/vit_b16.py with its `model` fields overridden."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_interop_common import logits_of, random_images, random_params, tiny_config
from vit_jax.interop import load_pretrained, save_as
from vit_jax.interop.common import POSEMB_KEY, flatten, params_to_canonical

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny_config() as overrides of the ViT-B/16 config.
TINY = ["--config=configs/vit_b16.py", "--config.model.variant=custom", "--config.model.hidden_size=64",
        "--config.model.num_layers=2", "--config.model.num_heads=4", "--config.model.mlp_dim=128",
        "--config.model.patch_size=8"]


def _convert(*args: str, **env_overrides: str) -> subprocess.CompletedProcess:
    # VIT_JAX_HUGEPAGES=0: no huge-page re-exec of the command (vit_jax.hugepages, tested in test_hugepages.py).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0", **env_overrides}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "vit_jax.convert", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An official-layout .npz of the tiny model, 4 classes at 32px, and its params."""
    config = tiny_config()
    params = random_params(config, 4)
    path = str(tmp_path_factory.mktemp("src") / "vit.npz")
    save_as(params, config, path, "npz")
    return path, params


def test_npz_to_orbax_with_a_new_head_and_resolution(tmp_path, source):
    src, params = source
    out = tmp_path / "orbax"
    result = _convert(f"--src={src}", *TINY, f"--out={out}", "--to=orbax", "--num_classes=3", "--image_size=48")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out / '0'} (orbax)" in result.stdout
    assert "new zero-initialised head with 3 classes" in result.stderr
    assert "resized position embeddings from a 4x4 to a 6x6 patch grid" in result.stderr
    loaded = flatten(load_pretrained(str(out), tiny_config()))
    assert loaded["head/kernel"].shape == (64, 3) and not loaded["head/kernel"].any()
    assert loaded[POSEMB_KEY].shape == (1, 37, 64)
    original = params_to_canonical(params)
    np.testing.assert_array_equal(loaded["cls"], original["cls"])
    np.testing.assert_array_equal(loaded[POSEMB_KEY][:, 0], original[POSEMB_KEY][:, 0])


def test_npz_to_hf_keeps_the_logits(tmp_path, source):
    src, params = source
    out = tmp_path / "hf"
    result = _convert(f"--src={src}", *TINY, f"--out={out}", "--to=hf")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = tiny_config(gelu_approximate=False, layernorm_epsilon=1e-12)
    loaded = load_pretrained(str(out), config)
    # The npz's numerics (tanh GELU, eps 1e-6) travel in config.json and come back, whatever the config said.
    assert config.gelu_approximate is True and config.layernorm_epsilon == 1e-6
    images = random_images()
    np.testing.assert_array_equal(logits_of(config, loaded, images), logits_of(tiny_config(), params, images))
    assert "problem_type" not in json.loads((out / "config.json").read_text())  # a softmax model: HF's default


def test_npz_to_hf_of_a_sigmoid_model_says_so_and_a_bad_label_kind_is_refused(tmp_path, source):
    """HF applies a softmax unless config.json says multi_label_classification: convert never passed the label kind."""
    src, _ = source
    out = tmp_path / "hf"
    result = _convert(f"--src={src}", *TINY, f"--out={out}", "--to=hf", "--config.label_kind=multi")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["problem_type"] == "multi_label_classification"
    bad = _convert(f"--src={src}", *TINY, f"--out={tmp_path / 'bad'}", "--to=hf", "--config.label_kind=sigmoid")
    assert bad.returncode == 2 and "config.label_kind='sigmoid' is invalid" in bad.stderr, bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()


def test_an_image_size_that_is_no_multiple_of_the_patch_size_is_refused(tmp_path):
    """--image_size=100 with 16px patches once became a 6x6 grid, silently exported as a 96px model."""
    config = tiny_config(patch_size=16)
    src = str(tmp_path / "vit_p16.npz")
    save_as(random_params(config, 4), config, src, "npz")
    out = tmp_path / "hf"
    result = _convert(f"--src={src}", *TINY, "--config.model.patch_size=16", f"--out={out}", "--to=hf",
                      "--image_size=100")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    # The flag, not config.image_size (another value, unused here).
    assert errors[0] == ("error: --image_size=100 is invalid: must be divisible by model.patch_size=16 (the nearest "
                         "are 96 and 112)")
    assert not out.exists()

@pytest.mark.parametrize("override, message", [
    ("--config.model.num_heads=5", "config.model.num_heads=5 is invalid: must divide model.hidden_size=64"),
    ("--config.model.classifier=foo", "config.model.classifier='foo' is invalid"),
])
def test_a_model_config_that_cannot_work_is_one_error_line(tmp_path, source, override, message):
    result = _convert(f"--src={source[0]}", *TINY, override, f"--out={tmp_path / 'x.npz'}", "--to=npz")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in errors[0]
    assert not (tmp_path / "x.npz").exists()


def test_bad_source_is_one_error_line_naming_it_and_exit_2(tmp_path):
    bad = tmp_path / "notes.npz"
    bad.write_text("not weights")
    result = _convert(f"--src={bad}", *TINY, f"--out={tmp_path / 'x.npz'}", "--to=npz")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "not an .npz archive" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.parametrize("out, to, message", [
    ("taken.npz", "npz", "exists; give a new file name"),
    ("weights.safetensors", "npz", "a npz checkpoint is one .npz file"),
    ("weights.npz", "timm", "a timm checkpoint is one .safetensors file"),
    ("no_dir/sub/weights.npz", "npz", "does not exist; create it first"),
    ("folder.npz", "npz", "is a directory"),
    ("taken.npz", "hf", "is a file; a hf checkpoint is a directory"),
    ("full", "hf", "exists and is not empty"),
    ("full", "orbax", "exists and is not empty"),
])
def test_a_destination_that_holds_something_or_cannot_be_written_is_refused(tmp_path, out, to, message):
    from vit_jax.interop import CheckpointError, check_destination

    (tmp_path / "taken.npz").write_bytes(b"earlier work")
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("earlier work")
    with pytest.raises(CheckpointError, match=message):
        check_destination(str(tmp_path / out), to)


@pytest.mark.parametrize("out, to", [("new.npz", "npz"), ("new.safetensors", "timm"), ("new_dir", "hf"),
                                     ("empty", "orbax")])
def test_a_new_destination_is_accepted(tmp_path, out, to):
    from vit_jax.interop import check_destination

    (tmp_path / "empty").mkdir()
    check_destination(str(tmp_path / out), to)
    # Only checked: nothing is created (not the file, not a directory for it, nothing in the empty one).
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["empty"]


def test_convert_never_overwrites_an_existing_file_and_expands_a_tilde(tmp_path, source):
    out = tmp_path / "photo.npz"
    out.write_bytes(b"not to be lost")
    # --out=~/photo.npz: the shell leaves the ~ of --flag=~/... to the program
    result = _convert(f"--src={source[0]}", *TINY, "--out=~/photo.npz", "--to=npz", HOME=str(tmp_path))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert f"{out}: exists; give a new file name" in errors[0]
    assert out.read_bytes() == b"not to be lost"


def test_a_checkpoint_without_transformer_blocks_says_it_is_no_vit(tmp_path):
    from safetensors.numpy import save_file

    from vit_jax.interop import CheckpointError

    path = tmp_path / "fragment.safetensors"  # timm key names, but only two tensors and no transformer block
    save_file({"cls_token": np.zeros((1, 1, 64), np.float32), "pos_embed": np.zeros((1, 17, 64), np.float32)},
              str(path))
    with pytest.raises(CheckpointError, match=r"not a ViT checkpoint: none of its 2 key\(s\) is a transformer bl"):
        load_pretrained(str(path), tiny_config())


@pytest.fixture(scope="module")
def source_with_pre_logits(tmp_path_factory):
    """An official-layout .npz of the tiny model with a 32-unit pre_logits layer, 4 classes at 32px."""
    config = tiny_config(representation_size=32)
    path = str(tmp_path_factory.mktemp("src_pre_logits") / "vit_pre_logits.npz")
    save_as(random_params(config, 4), config, path, "npz")
    return path


def test_dropping_the_pre_logits_under_the_checkpoints_own_head_is_one_error_line(tmp_path, source_with_pre_logits):
    """representation_size=0 (the configs' default) once dropped pre_logits under the checkpoint's own head and
    wrote a new zero head, exit 0: a classifier scoring chance."""
    out = tmp_path / "x.npz"
    result = _convert(f"--src={source_with_pre_logits}", *TINY, f"--out={out}", "--to=npz")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "its input was the dropped pre_logits" in errors[0]
    assert "set model.representation_size=32 to keep them" in errors[0]
    assert not out.exists()


def test_a_new_head_asked_for_may_drop_the_pre_logits(tmp_path, source_with_pre_logits):
    out = tmp_path / "x.npz"
    result = _convert(f"--src={source_with_pre_logits}", *TINY, f"--out={out}", "--to=npz", "--num_classes=3")
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = flatten(load_pretrained(str(out), tiny_config()))
    assert "pre_logits/kernel" not in loaded and loaded["head/kernel"].shape == (64, 3)
