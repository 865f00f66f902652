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
