"""Test set-up: 8 CPU devices for sharding tests, before anything initialises a jax backend."""

import contextlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# torchvision (pulled in by timm) segfaults when its C ops load after tensorflow's (measured with
# torch 2.14.1 / torchvision 0.29.1 / tensorflow-cpu 2.21); loading it first is safe. It is only in the test extra.
with contextlib.suppress(ImportError):
    import torchvision  # noqa: F401

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_under_pytest(tmp_path_factory):
    """Temporary files of the code under test go under pytest's base directory (it keeps the last three runs),
    not the machine's /tmp: TFDS leaves an empty mkdtemp directory for every builder of an unprepared dataset
    (`DatasetInfo.initialize_from_bucket`), dozens per run."""
    previous, previous_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tempfile"))  # env: for subprocesses
    yield
    tempfile.tempdir = previous
    if previous_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous_env


@pytest.fixture(autouse=True, scope="session")
def _one_compilation_cache_for_the_run(tmp_path_factory):
    """One persistent compilation cache for the run, shared by the xdist workers and the processes the tests start
    (`python -m vit_jax.main` on the same tiny configs compiles the same steps again: ~4 s of a 19 s demo run).
    Its size limit turns on JAX's file lock, so a process never reads an entry another is still writing; that
    limit also has every write list the cache, so only compilations of 1 s or more are kept (JAX's default): tens
    of entries, not thousands of small eager ops. A clean checkout starts empty: nothing is reused from an earlier
    run."""
    from tests.train_helpers import run_shared_dir

    directory = run_shared_dir(tmp_path_factory) / "jax_compilation_cache"
    directory.mkdir(exist_ok=True)
    settings = {"JAX_COMPILATION_CACHE_DIR": str(directory), "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30)}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)  # for subprocesses
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> str:
    """A TFDS data dir holding the prepared digits dataset, made once per test file."""
    from vit_jax import data

    directory = str(tmp_path_factory.mktemp("tfds"))
    data.prepare("digits", directory)
    return directory


# The files that take ~35 s or more on a 2-core machine (session 24's CI: 35-210 s each, the whole suite ~1,600 s
# of test time), longest first. xdist's own order (files with the most tests first) left three of them to the end,
# run one after another on one worker while the other had finished: ~35 s of the suite's wall time. With the
# Makefile's --no-loadscope-reorder, these go first and the many short files fill in behind them.
LONGEST_FILES = ("test_train.py", "test_vit.py", "test_multiprocess.py", "test_train_ema.py", "test_finetune.py",
                 "test_predict.py", "test_faults_cli.py", "test_notebook.py", "test_faults_kill.py",
                 "test_masked_patch.py", "test_main.py", "test_layers.py", "test_plan.py", "test_axial.py",
                 "test_checkpoints.py", "test_masked_patch_train.py", "test_interop_torch.py")


def pytest_collection_modifyitems(config, items):
    """Under xdist, the longest files first (`LONGEST_FILES`' order), then the rest as collected (a stable sort);
    a run in one process keeps pytest's order (`pytest -x` reaches a quick failure as soon as before)."""
    if not hasattr(config, "workerinput"):  # the xdist workers collect; the controller and plain pytest do not
        return
    missing = [name for name in LONGEST_FILES if not os.path.exists(os.path.join(os.path.dirname(__file__), name))]
    if missing:  # a renamed file would silently lose its place
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FILES names files that do not exist: {missing}")
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
