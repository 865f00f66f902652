"""vit_jax.main's multi-process start-up: what it refuses before training alone by mistake."""

import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys

import pytest

from vit_jax import main
from vit_jax.config_check import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_an_mpi_launch_jax_did_not_join_is_refused_naming_the_flags():
    with pytest.raises(ConfigError, match=r"OMPI_COMM_WORLD_SIZE=4: the launcher started 4 processes but JAX "
                                          r"joined 1; pass --coordinator_address=HOST:PORT .* --num_processes=4"):
        main.check_process_count({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"}, 1)
    with pytest.raises(ConfigError, match=r"PMI_SIZE=2"):
        main.check_process_count({"PMI_SIZE": "2"}, 1)
    main.check_process_count({"OMPI_COMM_WORLD_SIZE": "4"}, 4)  # joined: fine
    main.check_process_count({"PMI_SIZE": "1"}, 1)
    main.check_process_count({}, 1)


def test_process_flags_without_a_coordinator_are_an_error_not_ignored():
    with pytest.raises(ConfigError, match=r"--num_processes and --process_id need --coordinator_address"):
        main.initialize_distributed(None, 2, 0)
    with pytest.raises(ConfigError, match=r"needs --num_processes and --process_id as well"):
        main.initialize_distributed("127.0.0.1:1234", None, 0)
    for processes, process_id in ((2, 2), (2, -1), (0, 0)):  # refused before jax waits for a coordinator
        with pytest.raises(ConfigError, match=rf"--num_processes={processes} --process_id={process_id}: expected"):
            main.initialize_distributed("127.0.0.1:1234", processes, process_id)


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:notaport", "127.0.0.1:0", "127.0.0.1:65536", ":1234",
                                     "[::1]", "::1:1234", "127.0.0.1:1234/x"])
def test_a_malformed_coordinator_address_is_refused_naming_it(monkeypatch, address):
    """JAX failed on these with an IndexError or a gRPC error's traceback (or waited for peers)."""
    monkeypatch.setattr(main.jax.distributed, "initialize", lambda *args: pytest.fail(f"{address} reached JAX"))
    with pytest.raises(ConfigError, match=rf"--coordinator_address={re.escape(address)} is invalid: expected "
                                          r"HOST:PORT of process 0 with a port in 1-65535, e\.g\. "):
        main.initialize_distributed(address, 2, 0)


@pytest.mark.parametrize("address", ["127.0.0.1:1234", "node-1.cluster:65535", "[::1]:1234", "[fe80::1%eth0]:1"])
def test_a_coordinator_address_of_host_and_port_is_accepted(address):
    main.check_coordinator_address(address)


SLURM_TASK = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_PROCID": "0",
              "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("tasks, joins", [
    ({"SLURM_NTASKS": "2"}, True),
    ({"SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}, True),
    ({"SLURM_NTASKS": "1"}, False),  # srun --gpus=8 python -m vit_jax.main: one process drives all 8 GPUs
    ({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "1"}, False),  # srun -n1 inside an 8-task allocation
])
def test_a_slurm_step_of_one_task_is_not_a_cluster(monkeypatch, tasks, joins):
    """jax.distributed.initialize() in a one-task Slurm step restricted the process to the GPU of SLURM_LOCALID."""
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in {**SLURM_TASK, **tasks}.items():
        monkeypatch.setenv(name, value)
    assert main._managed_cluster() is joins


# One process of a run that jax.distributed joined (as every run on a TPU VM): SIGTERM, then a while to die in.
SIGTERMED = """
import os, signal, socket, sys, time
from vit_jax import main

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
main.initialize_distributed(f"127.0.0.1:{port}", 1, 0)
main.release_sigterm(sys.argv[1])
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(10)
print("still running")
"""


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sigterm_ends_a_process_jax_distributed_joined(mode):
    """JAX's preemption notifier swallowed SIGTERM ("SIGTERM caught") in --mode=eval and before a single process's
    training loop: the process went on. Now it ends as usual, killed by the signal (exit status 143)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", SIGTERMED, mode], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGTERM and "still running" not in result.stdout, result.stderr[-2000:]


def _make_recipe(target: str) -> list[list[str]]:
    """The commands of a Makefile target, each as argv ($(PY) -> this Python)."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"{target}:"))) + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        recipe.append([sys.executable if word == "$(PY)" else word for word in shlex.split(line)])
    return recipe


@pytest.mark.parametrize("target", ["demo", "demo-finetune"])
def test_the_makefiles_demo_commands_run(target, tmp_path):
    """Each command of `make demo` / `make demo-finetune`, as written there, succeeds (shortened: one block, a
    few steps, workdir/ under tmp_path). The second demo-finetune step had failed for sessions unnoticed."""
    short = ["--config.model.num_layers=1", "--config.total_steps=4", "--config.eval_every=4", "--config.log_every=2",
             "--config.checkpoint_every=4", "--config.optimizer.warmup_steps=1",
             f"--config.tfds_data_dir={tmp_path / 'tfds'}"]
    recipe = _make_recipe(target)
    assert recipe and all(argv[1:3] == ["-m", "vit_jax.main"] for argv in recipe)
    for argv in recipe:
        argv = [word.replace("=workdir/", f"={tmp_path}/workdir/") for word in argv]
        result = subprocess.run([*argv, *short], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stderr[-2000:]}"
        assert "test accuracy" in result.stdout or "eval of step" in result.stdout, result.stdout[-2000:]


def test_make_refuses_a_python_older_than_3_11_before_creating_the_venv(tmp_path):
    import shutil

    for name in ("Makefile", "setup.py", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    old = tmp_path / "python3.10"
    old.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "Python 3.10.12" && exit 0\nexit 1\n')
    old.chmod(0o755)
    result = subprocess.run(["make", "-C", str(tmp_path), "demo", f"PYTHON={old}"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert f"vit_jax needs Python >= 3.11; {old} is Python 3.10.12: make PYTHON=python3.11" in result.stdout
    assert not (tmp_path / ".venv").exists()
