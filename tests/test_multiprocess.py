"""Two JAX processes on 127.0.0.1 (jax.distributed, gloo) train, checkpoint and restore like one process."""

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
TIMEOUT = 300  # seconds; the workers are killed with SIGKILL after it (JAX handles SIGTERM itself)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(process_id: int, num_processes: int, port: int, outdir: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen(["timeout", "-s", "KILL", str(TIMEOUT), sys.executable, WORKER, str(process_id),
                             str(num_processes), str(port), outdir],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _checksum(value: float):
    """A worker's weighted checksum up to float32 summation order (its terms cancel: a relative tolerance alone
    would scale with the sum, not with its terms); a permuted shard of a kernel moves it by ~1 or more."""
    return pytest.approx(value, rel=1e-5, abs=1e-3)


def _result(process: subprocess.Popen, returncode: int = 0) -> dict:
    stdout, stderr = process.communicate(timeout=TIMEOUT + 30)
    assert process.returncode == returncode, stderr[-4000:]
    return {**json.loads(stdout.strip().splitlines()[-1]), "last_error": (stderr.strip().splitlines() or [""])[-1]}


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    workers = [_start(i, 2, port, str(tmp_path / "two")) for i in range(2)]
    single = _start(0, 1, _free_port(), str(tmp_path / "one"))
    results = [_result(w, returncode=2) for w in workers]  # each ends stopped by a file process 1 lacks (below)
    reference = _result(single)

    assert reference["processes"] == 1 and all(r["processes"] == 2 for r in results)
    assert reference["finite"] and reference["losses"][-1] < reference["losses"][0]
    for result in results:
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        assert result["params"] == _checksum(reference["params"])
        # The checkpoint read back onto another mesh equals what was saved; each process gets its data state.
        assert result["restored"] == _checksum(result["params"])
        # Process 1 saw step 2 as the latest and an average that is not there: both evaluate process 0's step 4.
        assert (result["evaluated_step"], result["evaluated_state_step"], result["evaluated_ema"]) == (4, 4, False)
        assert result["evaluated"] == _checksum(result["params"])
        # The pre-trained params are put on each process's devices from its own copy, never all-gathered whole
        # (jax.device_put of host data onto a multi-process sharding gathers every leaf to compare them).
        assert result["finetune_gathered_bytes"] < 1024 < 50_000 < result["param_bytes"]
    for result in results + [reference]:  # config.pretrained onto params sharded over both processes; new zero head
        assert result["finetune_start"] == _checksum(result["pretrained_without_head"])
    assert [r["data_state"] for r in results] == [{"process": 0}, {"process": 1}]
    # An error where process 0 decides for all stops every process; a user's error is one everywhere (exit code 2).
    zero, refused = "ZeroDivisionError: integer division or modulo by zero", \
        "UserError: gs://bucket/run/final_metrics.json: permission denied"
    unjson = "TypeError: Object of type int32 is not JSON serializable"
    decided = "process 0 failed where it decides for every process: "
    assert results[0]["decision_errors"] == [zero, refused, unjson]
    assert results[1]["decision_errors"] == [f"RuntimeError: {decided}{zero}", f"UserError: {decided}{refused}",
                                             f"RuntimeError: {decided}{unjson}"]
    assert reference["spanning_error"] == ""  # mesh.model=4 within one process's 4 devices
    for result in results:
        assert result["spanning_error"] == (
            "config.batch_size=16: rows 0:16 of each batch would sit on devices of processes [0, 1] (mesh "
            "{'data': 1, 'fsdp': 1, 'model': 4}), but every process loads rows of its own; keep config.mesh.model "
            "within one process: at most, and a divisor of, its 2 devices")
    assert reference["data_state"] == {"process": 0}
    # Last, a local --config.pretrained on process 0's disk only: every process exits with the error, none waits
    # for the others in a collective (it would, until the worker's timeout).
    for result in results:
        assert "config.pretrained=" in result["last_error"], result["last_error"]
        assert "does not exist on process 1 (it does on 0)" in result["last_error"]


PREEMPTED_EARLY = """
import os, signal, sys, time
import jax
from vit_jax import checkpoints
process_id, port, start = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(f"127.0.0.1:{port}", 2, process_id)
os.kill(os.getpid(), signal.SIGTERM)  # the notice arrives before the loop asks (a restore or compile under way)
time.sleep(3)
watcher = checkpoints.PreemptionWatcher()
print([step for step in range(start + 1, start + 12) if watcher.reached(step)], flush=True)
"""


@pytest.mark.parametrize("start", [0, 6])
def test_a_preemption_notice_before_the_loop_stops_it_at_its_first_step(start):
    """A run resumed at step 6 and SIGTERMed while restoring saves at step 7 on both processes (it asked about 7,
    8, ... while JAX's sync point was 1, and trained on to the scheduler's SIGKILL)."""
    port = str(_free_port())
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    workers = [subprocess.Popen(["timeout", "-s", "KILL", str(TIMEOUT), sys.executable, "-c", PREEMPTED_EARLY,
                                 str(i), port, str(start)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=TIMEOUT + 30)
        assert worker.returncode == 0, stderr[-4000:]
        assert stdout.strip().splitlines()[-1] == f"[{start + 1}]"
