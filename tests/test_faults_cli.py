"""Fault suite, bad input through `python -m vit_jax.main`: each is one `error: ...` line on stderr, exit code 2,
no traceback, and nothing written to the workdir (it is not created, or stays empty)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests.train_helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo config shrunk to a model that builds in a second (width 32).
TINY = ["--config=configs/demo.py", "--config.model.hidden_size=32", "--config.model.num_layers=1",
        "--config.model.num_heads=2", "--config.model.mlp_dim=64", "--config.batch_size=16",
        "--config.eval_batch_size=16", "--config.total_steps=5", "--config.log_every=1",
        "--config.optimizer.warmup_steps=1"]


def run_main(workdir, *args, devices: int = 1, timeout: float = 180) -> subprocess.CompletedProcess:
    # VIT_JAX_HUGEPAGES=0: no huge-page re-exec of each command (vit_jax.hugepages, tested in test_hugepages.py):
    # 0.6-1.5 s each.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0"}
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}", *TINY, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_bad_input(result: subprocess.CompletedProcess, workdir, *fragments: str) -> str:
    """One `error:` line naming `fragments`, exit code 2, no traceback, and an untouched workdir."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    written = [os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files] if os.path.exists(workdir) \
        else []
    assert written == [], written
    assert not os.path.exists(os.path.join(workdir, "checkpoints")), os.listdir(workdir)
    print(errors[0])  # shown with -s: the message a user sees
    return errors[0]


@pytest.fixture(scope="module")
def wide_npz(tmp_path_factory) -> str:
    """An official-layout .npz of a width-48 model (the runs below build width 32)."""
    from vit_jax import interop
    from vit_jax.models.vit import build_model

    config = tiny_config(**{"model.hidden_size": 48, "model.mlp_dim": 96})
    model = build_model(config.model, config.num_classes)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
                                                         train=False))["params"])
    rng = np.random.default_rng(0)  # the values do not matter: the run refuses the shapes
    params = jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(np.float32), shapes)
    path = str(tmp_path_factory.mktemp("ckpt") / "wide.npz")
    interop.save_as(params, config.model, path, "npz")
    return path


def test_unknown_config_field(tmp_path):
    result = run_main(tmp_path / "w", "--config.model.no_such_field=1")
    assert_bad_input(result, tmp_path / "w", "unknown config field 'no_such_field' in --config.model.no_such_field=1")


def test_wrong_type_on_the_command_line(tmp_path):
    result = run_main(tmp_path / "w", "--config.batch_size=sixteen")
    assert_bad_input(result, tmp_path / "w", "batch_size", "sixteen")


def test_batch_size_the_mesh_cannot_divide(tmp_path):
    result = run_main(tmp_path / "w", "--config.batch_size=6", devices=4)
    assert_bad_input(result, tmp_path / "w", "config.batch_size=6", "4 data x fsdp devices")


def test_empty_train_split(tmp_path, digits_dir):
    result = run_main(tmp_path / "w", f"--config.tfds_data_dir={digits_dir}", "--config.train_split=train[:0]")
    assert_bad_input(result, tmp_path / "w", "train[:0]", "no examples")


def test_pretrained_checkpoint_of_another_width(tmp_path, digits_dir, wide_npz):
    result = run_main(tmp_path / "w", f"--config.tfds_data_dir={digits_dir}", f"--config.pretrained={wide_npz}")
    # The reason: the widths (and depths) side by side, and a mismatched key with both shapes.
    assert_bad_input(result, tmp_path / "w", f"{wide_npz} (npz) does not fit the model",
                     "checkpoint num_layers 2, hidden_size 48, mlp_dim 96 vs model 1, 32, 64",
                     "wrong shape for 23 key(s)", "embedding/kernel (checkpoint (4, 4, 3, 48), model (4, 4, 3, 32))",
                     # the head's input is of the other width too: listed, not replaced by a new head in silence
                     "head/kernel (checkpoint (48, 10), model (32, 10))")


def test_truncated_npz(tmp_path, digits_dir, wide_npz):
    truncated = tmp_path / "truncated.npz"
    content = open(wide_npz, "rb").read()
    truncated.write_bytes(content[: len(content) // 2])
    result = run_main(tmp_path / "w", f"--config.tfds_data_dir={digits_dir}", f"--config.pretrained={truncated}")
    assert_bad_input(result, tmp_path / "w", f"{truncated}: truncated or corrupt .npz archive (BadZipFile: ")


def test_pickle_disguised_as_npz(tmp_path, digits_dir):
    disguised = tmp_path / "weights.npz"
    marker = tmp_path / "unpickled"
    # Unpickling this would create `marker` (os.system would run): it must never be unpickled.
    disguised.write_bytes(pickle.dumps(_Exploit(str(marker))))
    result = run_main(tmp_path / "w", f"--config.tfds_data_dir={digits_dir}", f"--config.pretrained={disguised}")
    assert_bad_input(result, tmp_path / "w", str(disguised), "pickle")
    assert not marker.exists()


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_image_files_that_are_not_images(tmp_path):
    """An image_folder dataset whose train images are all text files named .jpg: an error, not a hang."""
    from vit_jax import data

    source = tmp_path / "source"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (source / split / name).mkdir(parents=True)
            (source / split / name / "1.jpg").write_text("this is not an image")
    data_dir = str(tmp_path / "tfds")
    data.prepare("image_folder", data_dir, str(source))
    result = run_main(tmp_path / "w", "--config.dataset=image_folder", f"--config.tfds_data_dir={data_dir}",
                      f"--config.tfds_manual_dir={source}", "--config.num_classes=2", "--config.train_split=train",
                      "--config.eval_split=test", timeout=240)
    assert_bad_input(result, tmp_path / "w", "config.train_split='train'", "can be decoded", "not an image")


def test_eval_mode_without_a_checkpoint(tmp_path, digits_dir):
    result = run_main(tmp_path / "w", f"--config.tfds_data_dir={digits_dir}", "--mode=eval")
    assert_bad_input(result, tmp_path / "w", "--mode=eval found no checkpoint")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_workdir_that_is_a_file(tmp_path, mode):
    (tmp_path / "w").write_text("notes")
    result = run_main(tmp_path / "w", f"--mode={mode}")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"--workdir={tmp_path / 'w'} is a file, not a directory" in result.stderr
    assert (tmp_path / "w").read_text() == "notes"


def test_a_tilde_in_paths_is_the_home_directory():
    from vit_jax import cli

    assert cli.local_path("~/runs/b16") == os.path.join(os.path.expanduser("~"), "runs", "b16")
    assert cli.local_path("gs://bucket/~x") == "gs://bucket/~x"
    assert cli.local_path("") == ""


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]  # nothing printed after it
    return errors[0]


def test_resuming_a_workdir_with_another_model_or_damaged_files(tmp_path, digits_dir):
    """Each is one error line (nothing after it, no traceback), and the checkpoint stays as it was."""
    workdir = tmp_path / "w"
    first = run_main(workdir, f"--config.tfds_data_dir={digits_dir}", "--config.total_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = workdir / "checkpoints" / "2"

    def files() -> dict:
        return {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}

    before = files()
    wider = run_main(workdir, f"--config.tfds_data_dir={digits_dir}", "--config.total_steps=4",
                     "--config.model.hidden_size=48", "--config.model.mlp_dim=96")
    error = _one_error_line(wider)
    assert f"{checkpoint} was written by another model than this run's config (checkpoint hidden_size 32, " \
           "mlp_dim 64 vs model 48, 96)" in error and "--config.pretrained=" in error
    assert files() == before

    # Evaluating reads the params alone: another optimizer in the config does not matter.
    evaluated = run_main(workdir, f"--config.tfds_data_dir={digits_dir}", "--config.total_steps=2", "--mode=eval",
                         "--config.optimizer.name=sgd")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval of step 2 on test: " in evaluated.stdout + evaluated.stderr
    assert files() == before

    # A longer run resumes, and says that the learning rate now follows the longer schedule.
    longer = run_main(workdir, f"--config.tfds_data_dir={digits_dir}", "--config.total_steps=4")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resuming a run scheduled over 2 steps with one of 4 steps: from step 2 the learning rate" in longer.stderr
    checkpoint = workdir / "checkpoints" / "4"

    for data_file in (checkpoint / "params").glob("ocdbt.process_0/d/*"):
        data_file.write_bytes(b"\0" * 64)
    damaged = run_main(workdir, f"--config.tfds_data_dir={digits_dir}", "--config.total_steps=6")
    error = _one_error_line(damaged)
    assert f"{checkpoint} cannot be read (" in error and "may be damaged or incomplete" in error
    # It names the earlier step to go on from (not a config change), without TensorStore's spec or a method repr.
    assert f"move {checkpoint} out of {workdir / 'checkpoints'} and rerun to go on from step 2" in error
    assert "TensorStore details" not in error and "bound method" not in error and "--config.pretrained" not in error


def test_a_coordinator_address_without_a_port(tmp_path):
    result = run_main(tmp_path / "w", "--coordinator_address=localhost", "--num_processes=1", "--process_id=0")
    assert_bad_input(result, tmp_path / "w", "--coordinator_address=localhost is invalid: expected HOST:PORT")


def _run_command(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.parametrize("module", ["vit_jax.predict", "vit_jax.visualize"])
@pytest.mark.parametrize("checkpoint, message", [
    ("", "--checkpoint is empty: expected a training workdir"),
    ("  ", "--checkpoint is blank (only whitespace): expected a training workdir"),
    ("missing.npz", "--checkpoint={tmp}/missing.npz: no such file or directory"),  # once, not `PATH: PATH: ...`
])
def test_a_checkpoint_that_is_empty_or_missing_names_the_flag(tmp_path, module, checkpoint, message):
    """`--checkpoint=` was `error: : no such file or directory`, and a missing checkpoint's error named no flag
    (it read like an error about an image)."""
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "image.png")
    path = str(tmp_path / checkpoint) if checkpoint.strip() else checkpoint
    out = [f"--out={tmp_path / 'figures'}"] if module == "vit_jax.visualize" else []
    result = _run_command(module, f"--config={ROOT}/configs/demo.py", f"--checkpoint={path}", *out,
                          str(tmp_path / "image.png"), cwd=tmp_path)
    error = _one_error_line(result)
    assert error.startswith("error: " + message.format(tmp=tmp_path)), error
    assert not (tmp_path / "figures").exists()


def test_a_bad_source_format_is_refused_naming_its_flag():
    """Not `--checkpoint=PATH: source_format must be one of ...`: the readers' error would be blamed on the path."""
    from vit_jax import predict
    from vit_jax.errors import UserError

    with pytest.raises(UserError, match=r"^--source_format=safetensor is invalid: expected one of npz, timm, hf, "):
        predict.check_source_format("safetensor")
    for valid in (None, "auto", "npz", "orbax"):
        predict.check_source_format(valid)
