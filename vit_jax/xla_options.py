"""XLA compiler options per platform, passed to `jax.jit(..., compiler_options=...)` by the jitted steps.

CPU: every matmul runs on its own through YNNPACK (`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`). XLA:CPU's default also
fuses the elementwise and reduce ops around a matmul into one YNNPACK subgraph; for ViT that fuses attention
(logits, softmax, values) into one subgraph 3-4x slower than its parts. Measured on ViT-B/16 at 224px, batch 8,
2 cores, default vs this option compiled in one process: float32 inference 10.2 -> 11.5 img/s, float32 training
step 2.39 -> 2.58, bfloat16 training step 4.25 -> 4.37. Other platforms get no options. A YNN setting already in the
environment's XLA_FLAGS wins, so it can still be experimented with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def compiler_options(devices: Iterable[jax.Device] | None = None) -> dict[str, str] | None:
    """The options for a computation on `devices` (default: `jax.devices()`); None unless they are all CPUs."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices or any(d.platform != "cpu" for d in devices):
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_OPTIONS.items() if f"--{k}" not in flags} or None
