"""XLA compiler options per platform, passed to `jax.jit(..., compiler_options=...)` by the jitted steps.

CPU: every matmul runs on its own through YNNPACK (`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`) and so do reductions
(`LIBRARY_FUSION_TYPE_REDUCE`). XLA:CPU's default also fuses the elementwise and reduce ops around a matmul into
one YNNPACK subgraph; for ViT that fuses attention (logits, softmax, values) into one subgraph 3-4x slower than
its parts in float32. YNNPACK's reductions are what make the training step's bias and LayerNorm gradients (sums
over the 1576 rows of a batch-8 ViT-B/16 activation) cheap: XLA's own emitter split each into a 7-window
reduce-window at a few GB/s (~0.2 s of a 3 s float32 step). With reductions claimed by YNNPACK, attention's
softmax would again join its two matmuls (float32 inference 10.4 -> 8.8 img/s); `vit_jax.models.layers.softmax`
keeps it apart. Measured on ViT-B/16 at 224px, batch 8, 2 cores, variants compiled in one process and timed
interleaved: XLA's default -> individual dots: float32 inference 10.2 -> 11.5 img/s, float32 training step
2.39 -> 2.58, bfloat16 step 4.25 -> 4.37; individual dots -> also reductions (with that softmax): float32 step
2.50 -> 2.72, bfloat16 inference 19.8 -> 21.3, float32 inference and the bfloat16 step unchanged (within 2%).
Other platforms get no options. A YNN setting already in the environment's XLA_FLAGS wins, so it can still be
experimented with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def compiler_options(devices: Iterable[jax.Device] | None = None) -> dict[str, str] | None:
    """The options for a computation on `devices` (default: `jax.devices()`); None unless they are all CPUs."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices or any(d.platform != "cpu" for d in devices):
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_OPTIONS.items() if f"--{k}" not in flags} or None
