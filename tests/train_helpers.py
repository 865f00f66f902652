"""Shared pieces of the training tests: a tiny config, deterministic synthetic batches, a main-in-a-subprocess."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import threading
import time

import jax
import ml_collections
import numpy as np

from configs import common


def run_shared_dir(tmp_path_factory) -> pathlib.Path:
    """The temporary directory every process of this pytest run shares: under xdist the workers' common parent
    (each worker's base temp is its own), else the base temp itself. Fresh for each run."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """Hidden 32, depth 2, 2 heads, MLP 64, patch 4 on 16x16 images, 10 classes, batch 16: compiles in seconds."""
    config = common.get_config("Ti/16")
    model = config.model
    model.variant = "custom"
    model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim, model.patch_size = 32, 2, 2, 64, 4
    model.dropout_rate = 0.0
    config.image_size, config.num_classes = 16, 10
    config.batch_size, config.eval_batch_size = 16, 16
    config.total_steps, config.log_every, config.eval_every, config.checkpoint_every = 10, 1, 1000, 1000
    config.optimizer.warmup_steps = 2
    config.optimizer.lr = 1e-2
    config.mesh.data, config.mesh.fsdp, config.mesh.model = -1, 1, 1
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
    return config


def synthetic_batch(config: ml_collections.ConfigDict, seed: int) -> dict[str, np.ndarray]:
    """A global batch of random images in [-1, 1] with one-hot labels (numpy, same on every process)."""
    rng = np.random.RandomState(seed)
    size = config.image_size
    images = rng.uniform(-1, 1, (config.batch_size, size, size, 3)).astype(np.float32)
    labels = np.eye(config.num_classes, dtype=np.float32)[rng.randint(0, config.num_classes, config.batch_size)]
    return {"image": images, "label": labels}


def to_device(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a global numpy batch -> global arrays laid out by `sharding`."""
    rows = len(next(iter(batch.values())))
    share = rows // jax.process_count()
    start = jax.process_index() * share
    return {key: jax.make_array_from_process_local_data(sharding, value[start:start + share])
            for key, value in batch.items()}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MainRun:
    """`python -m vit_jax.main --workdir=WORKDIR *flags` in a subprocess (CPU, one device), its stdout lines and
    stderr collected as they come, so a test can wait for a step, kill or signal it, and read what it printed."""

    def __init__(self, workdir: str, flags: list[str], env: dict[str, str] | None = None):
        # VIT_JAX_HUGEPAGES=0: no huge-page re-exec of the command (vit_jax.hugepages, tested in test_hugepages.py).
        full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0", **(env or {})}
        full_env.pop("XLA_FLAGS", None)
        self.started = time.time()
        self.process = subprocess.Popen([sys.executable, "-m", "vit_jax.main", f"--workdir={workdir}", *flags],
                                        cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: list[str] = []
        self.stderr = ""
        self.first_step_seconds: float | None = None  # from the start to its first "step N/" line
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if self.first_step_seconds is None and re.match(r"step \d+/", line):
                self.first_step_seconds = time.time() - self.started
            self.lines.append(line.rstrip())

    def _read_stderr(self) -> None:
        self.stderr = self.process.stderr.read()

    def steps(self) -> list[int]:
        """The steps the run has logged ("step N/..." lines), in order."""
        return [int(m.group(1)) for line in list(self.lines) if (m := re.match(r"step (\d+)/", line))]

    def last_step(self) -> int:
        return max(self.steps(), default=0)

    def wait_until(self, condition, timeout: float = 300, poll: float = 0.002) -> bool:
        """Poll `condition` every `poll` seconds; False if the run ended first, an AssertionError after `timeout`."""
        deadline = time.time() + timeout
        while not condition():
            if self.process.poll() is not None:
                return False
            if time.time() > deadline:
                self.process.kill()
                raise AssertionError("timed out:\n" + "\n".join(self.lines))
            time.sleep(poll)
        return True

    def finish(self, timeout: float = 300) -> int:
        """Wait for the exit (killing the run after `timeout`); the return code, with all output read."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        for reader in self._readers:
            reader.join(10)
        return self.process.returncode



def real_like_folder(root, rows, classes: int = 10) -> str:
    """ImageNet ReaL's form from digits images: an image folder (`root`, created) with only a 'validation' split
    of multi-label records, `rows` = [(digits index, class ids)], an empty tuple for an unlabelled image."""
    import json

    from PIL import Image

    from vit_jax.data.builders.digits import load_digits_uint8

    images, _ = load_digits_uint8()
    root.mkdir()
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in range(classes)))
    lines = []
    for index, labels in rows:
        Image.fromarray(images[index]).save(root / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "labels": [str(c) for c in labels]}))
    (root / "validation.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)
