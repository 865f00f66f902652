"""Inference throughput: our jitted forward pass against timm's ViT-B/16, same process and threads.

  python benchmarks/inference.py [--dtype=float32|bfloat16] [--batch=8] [--config=configs/vit_b16.py]
      [--repeats=5] [--rounds=3] [--peak_size=4096] [--no-timm]

Ours: `vit_jax.predict.make_classifier` (the jitted `model.apply(params, images, train=False)` + softmax that
`python -m vit_jax.predict` runs, with its CPU compiler options), float32 params (their matmul kernels cast once
to a bf16 --dtype by `predict.cast_for_inference`, as predict does), compute in --dtype, float32 logits.
timm: the same ViT (`vit_base_patch16_224` for B/16) in eval mode under `torch.inference_mode()`, with
--dtype=bfloat16 also under `torch.autocast("cpu", torch.bfloat16)` and its Linear and Conv weights cast to bf16
once before timing, as ours (autocast alone casts every weight again at every call: ~10% of a bf16 forward).
Both are timed after warm-up as the median of --repeats batches, torch with one thread per core this process may
use, in --rounds rounds of ours, peak, timm (each figure the median over the rounds). Achieved GFLOP/s counts
the analytic forward FLOPs (`vit_jax.summary`); MFU = achieved / a large XLA matmul measured on the spot in
--dtype (for bf16 accumulating in float32, the model's path). Prints a table, then one JSON line last, with
ratio_vs_timm = ours_img_s / timm_img_s and mfu = achieved_gflop_s / peak_gflop_s of the reported numbers
(per-round spread in ratio_min/max, mfu_min/max) and the threads of XLA and torch.
"""

from __future__ import annotations

from collections.abc import Callable

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)
from train_step import parse_args


def inference_program(config) -> tuple[Callable, Callable]:
    """(forward, make_params): the jitted classifier `python -m vit_jax.predict` runs (`predict.make_classifier`,
    with its CPU compiler options) and `make_params(images)`, the model's params initialised and cast as predict
    casts them (`predict.cast_for_inference`). compile_report.py compiles this same program."""
    import jax

    from vit_jax import predict
    from vit_jax.models.vit import build_model

    model = build_model(config.model, config.num_classes)

    def make_params(images):
        params = model.init(jax.random.key(0), images[:1])["params"]
        return predict.cast_for_inference(params, config.model.dtype)  # what `vit_jax.predict` does

    return predict.make_classifier(config.model, config.num_classes), make_params


def forward_runner(config) -> Callable[[], None]:
    """One call = one jitted forward pass over the batch, blocking."""
    import jax
    import jax.numpy as jnp

    size, batch = config.image_size, config.batch_size
    images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), jnp.float32, -1.0, 1.0)
    forward, make_params = inference_program(config)
    params = jax.jit(make_params)(images)
    return lambda: forward(params, images).block_until_ready()


def timm_forward_runner(config) -> Callable[[], None]:
    """One call = one timm eval forward pass at the same batch (autocast bf16 for --dtype=bfloat16)."""
    import contextlib

    import torch

    model = common.timm_vit(config, train=False)
    size, batch = config.image_size, config.batch_size
    images = torch.rand(batch, 3, size, size) * 2 - 1
    autocast = contextlib.nullcontext()
    if config.model.dtype == "bfloat16":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        # As ours (predict.cast_for_inference): the matmul weights cast once, not by autocast at every call.
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.data = module.weight.data.to(torch.bfloat16)

    def run() -> None:
        with torch.inference_mode(), autocast:
            model(images)

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv, __doc__, "timed batches (median reported)")
    config = common.load_config(args.config, args.dtype, args.batch)  # a bad --config first, torch or not
    torch_threads = common.torch_threads() if args.timm else None
    return common.compare("inference", args, config, torch_threads, forward_runner, timm_forward_runner,
                          common.forward_flops_per_image(config) * config.batch_size, "batch",
                          ("forward", "analytic forward"))


if __name__ == "__main__":
    common.run_main(main)
