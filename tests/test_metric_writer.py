"""vit_jax.metric_writer: event files TensorFlow and TensorBoard read as clu's TensorFlow writer's, without
importing TensorFlow in the run."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import metric_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALARS = [(1, {"train/loss": 2.302585, "train/learning_rate": 1e-3}),
           (5, {"train/loss": 1.5, "train/images_per_second": 431.25, "eval/steps": 7}),
           (10, {"eval/accuracy": np.float32(0.875), "fewshot/digits_5shot": 0.25})]
HPARAMS = {"batch_size": 64, "optimizer.name": "adam", "model.classifier": "token", "optimizer.b2": 0.999,
           "pp.flip": True, "extra": None}


def _events(logdir: str) -> list:
    """(step, tag, plugin, value) of every summary value, and hparams as a dict, from the one event file in
    `logdir`, read with TensorFlow."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import metadata as hparams_metadata

    (path,) = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    out = []
    for event in tf.compat.v1.train.summary_iterator(path):
        for value in event.summary.value:
            plugin = value.metadata.plugin_data.plugin_name
            if plugin == "hparams":
                info = hparams_metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)
                hparams = {k: v.WhichOneof("kind") + "=" + str(getattr(v, v.WhichOneof("kind")))
                           for k, v in info.hparams.items()}
                out.append((event.step, value.tag, plugin, hparams))
            else:
                out.append((event.step, value.tag, plugin, float(tf.make_ndarray(value.tensor))))
    return sorted(out, key=repr)


def test_event_files_hold_what_clus_tensorflow_writer_writes(tmp_path):
    from clu import metric_writers

    ours = metric_writer.MetricWriter(str(tmp_path / "ours"))
    theirs = metric_writers.SummaryWriter(str(tmp_path / "clu"))
    for writer in (ours, theirs):
        writer.write_hparams(HPARAMS)
        for step, scalars in SCALARS:
            writer.write_scalars(step, scalars)
        writer.close()
    expected = _events(str(tmp_path / "clu"))
    assert len(expected) == 1 + sum(len(s) for _, s in SCALARS)
    assert _events(str(tmp_path / "ours")) == expected


def test_each_write_reaches_the_file_before_close(tmp_path):
    """A SIGKILLed run keeps every line it logged: nothing waits in a buffer for close()."""
    writer = metric_writer.MetricWriter(str(tmp_path))
    writer.write_scalars(3, {"train/loss": 0.5})
    assert [e[:2] + e[3:] for e in _events(str(tmp_path))] == [(3, "train/loss", 0.5)]
    writer.close()


def test_without_a_logdir_it_only_logs(tmp_path, caplog):
    writer = metric_writer.create(str(tmp_path), events=False)
    with caplog.at_level("INFO"):
        writer.write_scalars(7, {"b": 0.123456789, "a": 3})
    writer.close()
    assert "[7] a=3, b=0.123457" in caplog.text
    assert os.listdir(tmp_path) == []


def test_scalars_must_be_numbers(tmp_path):
    writer = metric_writer.MetricWriter(str(tmp_path))
    with pytest.raises(ValueError, match="shape"):
        writer.write_scalars(1, {"train/loss": np.zeros(2)})
    writer.close()


RUN_WITHOUT_TENSORFLOW = """
import atexit, runpy, sys
atexit.register(lambda: print("tensorflow imported:", "tensorflow" in sys.modules))
sys.argv = ["vit_jax.main", *sys.argv[1:]]
runpy.run_module("vit_jax.main", run_name="__main__")
"""


def test_a_training_run_on_a_prepared_dataset_never_imports_tensorflow(tmp_path, digits_dir):
    """TensorFlow's import was 3-6 s of every run's start (clu's writer, a gfile exists check)."""
    flags = ["--config=configs/demo.py", f"--workdir={tmp_path}", f"--config.tfds_data_dir={digits_dir}",
             "--config.total_steps=2", "--config.log_every=1", "--config.eval_every=2",
             "--config.optimizer.warmup_steps=1", "--config.model.num_layers=1"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0"}  # no re-exec
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", RUN_WITHOUT_TENSORFLOW, *flags], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow imported: False" in result.stdout, result.stdout[-2000:]
    steps = [e[0] for e in _events(str(tmp_path)) if e[1] == "train/loss"]
    assert steps == [1, 2]
