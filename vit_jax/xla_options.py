"""XLA compiler options per platform, passed to `jax.jit(..., compiler_options=...)` by the jitted steps.

CPU: matmuls and reductions run through YNNPACK (`xla_cpu_experimental_ynn_fusion_type`), each matmul on its own
(`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`) except in a float32 training step, where the elementwise ops around a
matmul join its YNNPACK subgraph (`LIBRARY_FUSION_TYPE_DOT`). XLA:CPU's default fuses attention (logits, softmax,
values) into one subgraph 3-4x slower than its parts in a float32 forward pass; there the model's attention
takes `vit_jax.models.layers.softmax`, which keeps softmax out of it (in bf16 and in the float32 training step
the joined subgraph is the faster). YNNPACK's reductions (`LIBRARY_FUSION_TYPE_REDUCE`) make the training step's bias
and LayerNorm gradients (sums over the 1576 rows of a batch-8 ViT-B/16 activation) cheap: XLA's own emitter split
each into a 7-window reduce-window at a few GB/s (~0.2 s of a 3 s float32 step).
Measured on ViT-B/16 at 224px, batch 8, 2 cores, variants compiled in one process and timed interleaved (img/s):
XLA's default -> individual dots: float32 inference 10.2 -> 11.5, float32 training step 2.39 -> 2.58, bfloat16
step 4.25 -> 4.37; individual dots -> also reductions: float32 step 2.50 -> 2.72, bfloat16 inference 19.8 -> 21.3,
float32 inference and the bfloat16 step unchanged (within 2%); float32 step, individual -> fused dots: 2.71 ->
2.85 (but float32 inference 10.3 -> 9.7, the bfloat16 step 4.5 -> 2.6, bfloat16 inference 20 -> 8).
A computation run once (a fresh state's initialisation: hundreds of small random-number kernels, no matmul)
gets LLVM's level-1 optimisation instead of XLA's default: it compiles 30-40% faster (benchmarks/init_compile.py:
the demo's model 3.1 -> 1.9 s, B/16 3.7 -> 2.5 s) into code that gives the same values bit for bit and runs as
fast. Level 0 compiles faster still but changes values in the last bit and runs 4x slower (B/16: 4.8 s).
Other platforms get no options. A setting already in the environment's XLA_FLAGS wins, so it can still be
experimented with.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import jax

_YNN = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS = {_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CPU_FLOAT32_TRAINING_OPTIONS = {_YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CPU_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": "1"}


def compiler_options(devices: Iterable[jax.Device] | None = None, *, float32_training: bool = False,
                     run_once: bool = False) -> dict[str, str] | None:
    """The options for a computation on `devices` (default: `jax.devices()`); None unless they are all CPUs.

    `float32_training`: the computation is a training step (forward and backward) computing in float32.
    `run_once`: the computation runs once (initialisation), so its compile time is most of its cost.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices or any(d.platform != "cpu" for d in devices):
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    if run_once:
        options = CPU_RUN_ONCE_OPTIONS
    else:
        options = CPU_FLOAT32_TRAINING_OPTIONS if float32_training else CPU_OPTIONS
    return {k: v for k, v in options.items() if f"--{k}" not in flags} or None
