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


def _result(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=TIMEOUT + 30)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    workers = [_start(i, 2, port, str(tmp_path / "two")) for i in range(2)]
    single = _start(0, 1, _free_port(), str(tmp_path / "one"))
    results = [_result(w) for w in workers]
    reference = _result(single)

    assert reference["processes"] == 1 and all(r["processes"] == 2 for r in results)
    assert reference["finite"] and reference["losses"][-1] < reference["losses"][0]
    for result in results:
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)
        assert result["params"] == pytest.approx(reference["params"], rel=1e-5)
        # The checkpoint read back onto another mesh equals what was saved; each process gets its data state.
        assert result["restored"] == pytest.approx(result["params"], rel=1e-6)
    for result in results + [reference]:  # config.pretrained onto params sharded over both processes; new zero head
        assert result["finetune_start"] == pytest.approx(result["pretrained_without_head"], rel=1e-5)
    assert [r["data_state"] for r in results] == [{"process": 0}, {"process": 1}]
    assert reference["spanning_error"] == ""  # mesh.model=4 within one process's 4 devices
    for result in results:
        assert result["spanning_error"] == (
            "config.batch_size=16: rows 0:16 of each batch would sit on devices of processes [0, 1] (mesh "
            "{'data': 1, 'fsdp': 1, 'model': 4}), but every process loads rows of its own; keep config.mesh.model "
            "within one process: at most, and a divisor of, its 2 devices")
    assert reference["data_state"] == {"process": 0}
