"""`python -m vit_jax.main --config=configs/vit_l16.py --workdir=DIR [--mode=train|eval|fewshot] [--config.x=y]`.

Pre-trains or fine-tunes, evaluates and checkpoints with the same code on one CPU, one GPU or a TPU pod.
The entry point is intentionally thin: it sets up the processes, validates the config before anything is
compiled, and hands over to `vit_jax.train`. Bad input (an invalid config, a missing dataset) is one line on
stderr and exit code 2; a diverged run (NaN/inf loss) is one line and exit code 1. A training loop stopped by
SIGTERM (preemption, a scheduler's time limit) saves a checkpoint and exits with `PREEMPTED_EXIT_CODE`, 75
(EX_TEMPFAIL: try again), so a retry loop can tell it from a finished run (0) and resume; before the loop starts
(start-up, restoring; the first step compiles inside the loop) or in --mode=eval or fewshot, SIGTERM ends the
process as usual (143). In the loop of a single process, a first Ctrl-C saves and stops too (exit code 130); a
second stops at once. A training run of several processes leaves SIGTERM to JAX's preemption service from
start-up on: they save and stop at one step.

Multi-host: on Cloud TPU, Slurm, Open MPI or Kubernetes, `jax.distributed.initialize()` finds its peers by
itself; elsewhere pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I to every process.
"""

from __future__ import annotations

import logging as pylogging
import os
import re
import signal
import sys
import threading
from collections.abc import Mapping, Sequence

import jax
from absl import flags, logging
from ml_collections import config_flags

from vit_jax import cli, config_check, plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file, e.g. configs/vit_b16.py[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of checkpoints, TensorBoard logs and final_metrics.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "fewshot"],
                          "train: train (resuming from the workdir) and evaluate; eval: evaluate the latest "
                          "checkpoint (else config.pretrained); fewshot: few-shot linear evaluation of its "
                          "features on config.fewshot.datasets.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0, for multi-process runs outside managed clusters.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")

# EX_TEMPFAIL (sysexits.h): the run was stopped (SIGTERM) after saving a checkpoint; the same command resumes it.
PREEMPTED_EXIT_CODE = 75
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a Ctrl-C: no retry loop should rerun it


def _managed_cluster() -> bool:
    """Whether jax.distributed can find its peers by itself (Cloud TPU, Slurm, Open MPI, Kubernetes, ...).

    Not in a Slurm step of one task (`srun --gpus=8 python -m vit_jax.main`, a shell from `srun --pty bash`): JAX
    would make a cluster of that one process and give it only the GPU of its SLURM_LOCALID, silently.
    """
    from jax._src import clusters  # the environment detection jax.distributed.initialize() itself uses

    return any(not env.opt_in_only_method and env.is_env_present() and not _one_slurm_task(env, os.environ)
               for env in clusters.ClusterEnv._cluster_types)


def _one_slurm_task(cluster: type, environ: Mapping[str, str]) -> bool:
    """Whether `cluster` is JAX's SlurmCluster and Slurm runs one task: JAX counts the processes by SLURM_NTASKS,
    srun sets SLURM_STEP_NUM_TASKS for its step."""
    return cluster.__name__ == "SlurmCluster" and "1" in (environ.get("SLURM_NTASKS"),
                                                          environ.get("SLURM_STEP_NUM_TASKS"))


_HOST_PORT = re.compile(r"(\[[^\[\]]+\]|[^\[\]:]+):(\d+)")  # host or [IPv6], then the port


def check_coordinator_address(address: str) -> None:
    """Raise ConfigError unless `address` is HOST:PORT ([IPv6]:PORT) with a port in 1-65535: JAX fails on anything
    else with an IndexError or a gRPC error deep in its start-up."""
    found = _HOST_PORT.fullmatch(address)
    if not found or not 1 <= int(found.group(2)) <= 65535:
        raise config_check.ConfigError(
            f"--coordinator_address={address} is invalid: expected HOST:PORT of process 0 with a port in 1-65535, "
            "e.g. 10.0.0.1:1234 or [::1]:1234")


# MPI launchers' rank counts: a launcher that started several processes JAX did not join is an error.
_LAUNCHER_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def check_process_count(environ: Mapping[str, str], process_count: int) -> None:
    """Raise ConfigError if an MPI launcher started more processes than jax.distributed joined.

    JAX finds Open MPI only through OMPI_MCA_orte_hnp_uri (Open MPI 4 and older): under Open MPI 5 or MPICH each
    rank would otherwise train alone, all writing one workdir.
    """
    for name in _LAUNCHER_SIZES:
        size = environ.get(name, "")
        if size.isdigit() and int(size) > process_count:
            raise config_check.ConfigError(
                f"{name}={size}: the launcher started {size} processes but JAX joined {process_count}; pass "
                f"--coordinator_address=HOST:PORT (of rank 0) --num_processes={size} --process_id=<this rank> "
                "(e.g. $OMPI_COMM_WORLD_RANK or $PMI_RANK)")


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
    """Join the other processes of a multi-host job (a no-op for a single process outside a cluster)."""
    if coordinator_address:
        check_coordinator_address(coordinator_address)
        if num_processes is None or process_id is None:
            raise config_check.ConfigError(
                f"--coordinator_address={coordinator_address} needs --num_processes and --process_id as well")
        if num_processes < 1 or not 0 <= process_id < num_processes:  # would wait for the coordinator's timeout
            raise config_check.ConfigError(f"--num_processes={num_processes} --process_id={process_id}: expected "
                                           "num_processes >= 1 and 0 <= process_id < num_processes")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif num_processes is not None or process_id is not None:
        raise config_check.ConfigError("--num_processes and --process_id need --coordinator_address=HOST:PORT "
                                       "(of process 0) as well")
    elif _managed_cluster():
        jax.distributed.initialize()
    check_process_count(os.environ, jax.process_count())


def release_sigterm(mode: str) -> None:
    """Give SIGTERM back its default action (end the process, exit status 143) where JAX's preemption service does
    not use it.

    jax.distributed.initialize() installs the service's SIGTERM handler, which only records the signal ("SIGTERM
    caught") for a multi-process training loop to agree on a step to save at (checkpoints.PreemptionWatcher). In
    --mode=eval or fewshot, and in a single process (whose loop sets a handler of its own) before its loop starts,
    the process would go on as if nothing happened, until the machine or the scheduler kills it.
    """
    if not jax.distributed.is_initialized() or (mode == "train" and jax.process_count() > 1):
        return
    if threading.current_thread() is threading.main_thread():  # signal handlers are the main thread's to set
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _QuietLibraries(pylogging.Filter):
    """Drop the per-save INFO chatter of orbax (dozens of lines per checkpoint); its warnings still show."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    config = _CONFIG.value
    if config is None:
        raise config_check.ConfigError("--config is required, e.g. --config=configs/demo.py")
    if not _WORKDIR.value:
        raise config_check.ConfigError("--workdir is required: where checkpoints and logs go")
    workdir = cli.local_path(_WORKDIR.value)  # --workdir=~/x made a directory named '~' here
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise config_check.ConfigError(f"--workdir={_WORKDIR.value} is a file, not a directory; give a directory "
                                       "for checkpoints and logs")
    config.pretrained = cli.local_path(config.pretrained)  # an existing field: settable in the locked config
    logging.get_absl_handler().addFilter(_QuietLibraries())
    if plan.tpu_host():  # run directly on a TPU VM: the PRNG set-up of launch/tpu_vm.sh and vit_jax.plan
        plan.use_tpu_prng()  # before any backend loads (libtpu reads its flags once); the user's settings win
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    release_sigterm(_MODE.value)
    config_check.validate(config, jax.device_count())
    config_check.check_duration_flags(config, "config.num_epochs" in flags.FLAGS
                                      and flags.FLAGS["config.num_epochs"].present)

    from vit_jax import masked_patch, train  # after validation: importing the loop pulls in tensorflow (clu)

    masked_patch.check_config(config)
    logging.info("process %d/%d, %d devices (%s), config:\n%s", jax.process_index(), jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind, config)
    try:
        if _MODE.value == "train":
            result = train.train_and_evaluate(config, workdir)
        else:
            result = train.evaluate_checkpoint(config, workdir, _MODE.value)
    except train.NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if result.get("interrupted"):
        sys.exit(INTERRUPTED_EXIT_CODE)
    if result.get("preempted"):
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    cli.run(main)
