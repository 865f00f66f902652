"""Test set-up: 8 CPU devices for sharding tests, before anything initialises a jax backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
