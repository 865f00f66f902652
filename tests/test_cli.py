"""The command-line wrapper: a `UserError` is one line on stderr and exit code 2, whatever is left behind."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A command that abandons failed background work, as a read of a damaged orbax checkpoint does: native code in
# another thread calls onto the closed event loop (reported as unraisable, before the error reaches the CLI); one
# asyncio task's exception is raised, its siblings' are never retrieved, and asyncio logs them, with tracebacks,
# when they are collected; a read scheduled but never started is a coroutine never awaited, which Python warns
# about (RuntimeWarning, with a tracemalloc hint) when it is collected at exit.
ABANDONING_COMMAND = """
import asyncio, functools, threading
from vit_jax import cli
from vit_jax.errors import UserError

async def fail(n):
    raise ValueError(f"shard {n} is damaged")

async def read():
    tasks = [asyncio.ensure_future(fail(n)) for n in range(3)]
    await asyncio.sleep(0)  # all three fail
    await tasks[0]

def late_callback():
    # What TensorStore's threads do when a read completes after its event loop was closed: native code calls
    # loop.call_soon_threadsafe and reports the RuntimeError as unraisable. Here the native caller is the
    # finaliser slot calling a __del__ that is the bound call_soon_threadsafe itself (no Python frame before it).
    closed = asyncio.new_event_loop()
    closed.close()

    class Late:
        __del__ = functools.partial(closed.call_soon_threadsafe, print)

    Late()

NEVER_STARTED = []

def main(argv):
    NEVER_STARTED.append(fail(99))  # collected at exit, never awaited
    worker = threading.Thread(target=late_callback)
    worker.start()
    worker.join()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(read())
    except ValueError as e:
        raise UserError(f"checkpoint cannot be read ({e})") from e
    finally:
        loop.close()

cli.run(main)
"""


def test_a_user_error_is_one_line_even_when_background_work_failed_too():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0"}  # no re-exec
    result = subprocess.run([sys.executable, "-c", ABANDONING_COMMAND], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: checkpoint cannot be read (shard 0 is damaged)"], \
        result.stderr


def test_the_main_threads_own_event_loop_error_is_still_shown():
    command = ("from vit_jax import cli\n\ndef main(argv):\n    raise RuntimeError('Event loop is closed')\n\n"
               "cli.run(main)\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "VIT_JAX_HUGEPAGES": "0"}  # no re-exec
    result = subprocess.run([sys.executable, "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "RuntimeError: Event loop is closed" in result.stderr, result.stderr


def test_a_projects_config_file_is_found_from_any_directory(tmp_path):
    """`pip install .` puts `configs` beside vit_jax: the README's `--config=configs/...` works outside the
    checkout; a file of that name in the working directory wins."""
    env = {**os.environ, "VIT_JAX_HUGEPAGES": "0", "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, "-m", "vit_jax.summary", "--config=configs/common.py:Ti/16",
                             "--config.num_classes=7"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0 and "variant Ti/16 at 224px, 7 classes" in result.stdout, result.stderr[-2000:]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "common.py").write_text("raise ValueError('the local one')\n")
    result = subprocess.run([sys.executable, "-m", "vit_jax.summary", "--config=configs/common.py:Ti/16"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2 and "the local one" in result.stderr, result.stderr[-2000:]


def test_an_error_quoting_text_of_several_lines_is_still_one_line():
    """A split error quotes TFDS's message, which holds newlines: the command printed several lines."""
    code = ("from vit_jax import cli\nfrom vit_jax.errors import UserError\n"
            "def main(argv):\n    raise UserError(\"config.eval_split='test[:110%]': bad slice\\n  See format at: x\\n"
            "When unit=%, boundaries are in [-100, 100]\")\ncli.run(main)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "VIT_JAX_HUGEPAGES": "0", "PYTHONPATH": ROOT})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config.eval_split='test[:110%]': bad slice See format at: x When unit=%, boundaries are in [-100, 100]"]


LOCKED_CONFIG = """import ml_collections

def get_config():
    config = ml_collections.ConfigDict({"a": 1, "b": {"y": 1}})
    config.lock()
    config.b.x = 2
    return config
"""


@pytest.mark.parametrize("source, error", [
    ("x = = 1\n", "at line 1: SyntaxError: invalid syntax"),
    ("def get_config():\n    return undefined_name\n", "at line 2: NameError: name 'undefined_name' is not defined"),
    ("import no_such_module_xyz\n", "at line 1: ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("def get_config():\n    return open('/no/such/notes.txt')\n",
     "at line 2: FileNotFoundError: [Errno 2] No such file or directory: '/no/such/notes.txt'"),
    # Not "unknown config field 'b'": no --config.b override was given.
    (LOCKED_CONFIG, 'at line 6: AttributeError: Key "x" does not exist and cannot be added since the config is locked'),
])
def test_a_config_file_that_fails_is_one_line_naming_the_file_the_line_and_the_error(tmp_path, source, error):
    """ml_collections only reports TypeError and ValueError of a config file as a flag error: the others were a
    traceback (exit 1), a locked config's unknown key was blamed on the command line, a file get_config() could not
    open was "no such config file"."""
    config = tmp_path / "my_config.py"
    config.write_text(source)
    result = subprocess.run([sys.executable, "-m", "vit_jax.summary", f"--config={config}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "VIT_JAX_HUGEPAGES": "0", "PYTHONPATH": ROOT})
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: flag --config={config}: the config file failed {error}"), \
        result.stderr[-2000:]


def _config_command(module: str, config, *args: str, cwd) -> subprocess.CompletedProcess:
    extra = [f"--workdir={cwd / 'w'}"] if module == "vit_jax.main" else []
    return subprocess.run([sys.executable, "-m", module, f"--config={config}", *extra, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VIT_JAX_HUGEPAGES": "0", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})


def _the_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("module", ["vit_jax.main", "vit_jax.summary"])
@pytest.mark.parametrize("content, reason", [
    (b"PK\x03\x04\x14\x00\x00\x00\x00\x00", "SyntaxError: source code string cannot contain null bytes"),  # a .npz
    (b"\xff\xfe config = 1\n", "SyntaxError: (unicode error) 'utf-8' codec can't decode byte 0xff"),
])
def test_a_binary_file_as_the_config_is_one_line(tmp_path, module, content, reason):
    """An .npz given as --config was a 40-frame traceback ending in a SyntaxError that names no file."""
    config = tmp_path / "weights.npz"
    config.write_bytes(content)
    error = _the_error_line(_config_command(module, config, cwd=tmp_path))
    assert error.startswith(f"error: flag --config={config}: not a Python config file ({reason}"), error
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module", ["vit_jax.main", "vit_jax.summary"])
@pytest.mark.parametrize("returned, what", [
    ("None", "None (a missing return statement?)"),
    ("{'model': {'patch_size': 16}}", "a dict"),
    ("ml_collections.FieldReference(1)", "a FieldReference"),
])
@pytest.mark.parametrize("override", [(), ("--config.a=2",)])
def test_a_config_file_whose_get_config_returns_no_config_dict_is_one_line(tmp_path, module, returned, what,
                                                                           override):
    """main said "--config is required" (it was given), summary "flag --config=None", a dict was a traceback."""
    config = tmp_path / "my_config.py"
    config.write_text(f"import ml_collections\n\ndef get_config():\n    return {returned}\n")
    error = _the_error_line(_config_command(module, config, *override, cwd=tmp_path))
    assert error == (f"error: flag --config={config}: get_config() returned {what}: expected an "
                     "ml_collections.ConfigDict")
    assert not (tmp_path / "w").exists()


def test_checkpoint_reader_errors_name_the_checkpoint_flag_once():
    from vit_jax import cli
    from vit_jax.errors import UserError

    assert cli.naming_checkpoint_flag("/w/x.npz: no such file", "/w/x.npz") == "--checkpoint=/w/x.npz: no such file"
    assert cli.naming_checkpoint_flag("/w/x.npz does not fit the model", "/w/x.npz") == \
        "--checkpoint=/w/x.npz does not fit the model"
    assert cli.naming_checkpoint_flag("/w/checkpoints/5/params: unreadable", "/w") == \
        "--checkpoint=/w: /w/checkpoints/5/params: unreadable"
    assert cli.naming_checkpoint_flag("/w/x.npz2: no such file", "/w/x.npz") == \
        "--checkpoint=/w/x.npz: /w/x.npz2: no such file"
    assert cli.naming_checkpoint_flag("--checkpoint=/w: has no head", "/w") == "--checkpoint=/w: has no head"
    for blank in ("", "  ", None):
        with pytest.raises(UserError, match="^--checkpoint is (empty|blank)"):
            cli.checkpoint_path(blank)
    assert cli.checkpoint_path("~/ckpt") == os.path.expanduser("~/ckpt")
