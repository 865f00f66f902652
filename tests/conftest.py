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
