"""Training-step throughput: our jitted `vit_jax.train` step against timm's ViT-B/16, same process and threads.

  python benchmarks/train_step.py [--dtype=float32|bfloat16] [--batch=8] [--config=configs/vit_b16.py]
      [--repeats=5] [--rounds=3] [--peak_size=4096] [--no-timm]

Ours: `vit_jax.train.make_train_step` (the real step: forward, backward, grad clipping, AdamW; dropout as the
config says; float32 params, compute in --dtype) on a one-device mesh with a 1000-class head. timm:
`vit_base_patch16_224` with the same dropout, cross-entropy, `clip_grad_norm_` and AdamW, with the config's
hyperparameters (lr, betas, eps 1e-8, clip norm, weight decay on the Linear/Conv kernels only, as ours; ours
follows its warmup schedule, timm a constant lr: the same work per step); with --dtype=bfloat16 under
`torch.autocast("cpu", torch.bfloat16)`. timm's optimizer takes torch's fastest CPU path: `AdamW(fused=True)`
(one fused kernel over all parameters; `foreach=True` where a torch has no fused CPU AdamW) and
`clip_grad_norm_(foreach=True)`. Torch's default on CPU is the per-tensor Python loop over the ~150 parameter
tensors, its slowest path, while ours clips and updates in one fused XLA program: the default would charge timm
for optimizer overhead that is not the model's. Both are timed after warm-up as the median of --repeats steps,
torch with one thread per core this process may use (its CPU affinity); ours, the peak and timm are timed in turn
--rounds times (the machine drifts), and each figure is the median over the rounds. Achieved GFLOP/s counts the
analytic FLOPs (forward x 3, `vit_jax.summary`: issue #8's definition); MFU = achieved / a large XLA matmul
measured on the spot in --dtype (for bf16 accumulating in float32, the path the model takes). Forward x 3 includes
the patch embedding's input gradient, which the step never computes (the images need none): achieved GFLOP/s and
MFU read that share high, `analytic_overcount` in the JSON (~0.22% for B/16 at 224px; the FLOPs done are
gflop_per_step x (1 - analytic_overcount)). Prints a table, then one JSON line last: ours_img_s, timm_img_s,
ratio_vs_timm (= ours_img_s / timm_img_s), achieved_gflop_s, peak_gflop_s, mfu (= achieved / peak), the
per-round spread (ratio_min/max, mfu_min/max), the threads of XLA and torch (threads_match) and what else differs
from timm (GELU form, eager torch: `common.compare`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)


def parse_args(argv: list[str] | None = None, doc: str = __doc__,
               repeats_help: str = "timed steps (median reported)") -> argparse.Namespace:
    """The flags of this benchmark and of inference.py (which passes its own description)."""
    parser = common.argument_parser(doc, 5, repeats_help)
    parser.add_argument("--rounds", type=common.count(1), default=3,
                        help="rounds of ours, peak, timm (median reported)")
    parser.add_argument("--no-timm", dest="timm", action="store_false", help="skip timm")
    return parser.parse_args(argv)


def step_runner(config) -> Callable[[], None]:
    """One call = one of our jitted train steps (state donated and carried over, as in training), blocking."""
    import jax
    import jax.numpy as jnp

    from vit_jax import sharding, train

    mesh = sharding.make_mesh(config, jax.devices()[:1])
    step = train.make_train_step(config, mesh, config.total_steps)
    state = train.init_state(config, mesh, config.total_steps)
    size, batch = config.image_size, config.batch_size
    images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), jnp.float32, -1.0, 1.0)
    labels = jax.nn.one_hot(jnp.arange(batch) % config.num_classes, config.num_classes)
    data = {"image": images, "label": labels}
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready((holder["state"], metrics))

    return run


def timm_adamw(model, opt):
    """torch's fastest CPU AdamW over `model` with our optimizer config's hyperparameters: `fused=True` (one
    kernel over every parameter), else `foreach=True` in a torch without a fused CPU AdamW. Weight decay on the
    Linear and Conv kernels only (ours: `vit_jax.optim`, kernels only), none on biases, norms, embeddings."""
    import torch

    if opt.name != "adam":
        from vit_jax.errors import UserError

        raise UserError(f"config.optimizer.name={opt.name!r}: the timm comparison times AdamW only; pass "
                        "--no-timm or an Adam config")
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) in kernels], "weight_decay": opt.weight_decay},
              {"params": [p for p in params if id(p) not in kernels], "weight_decay": 0.0}]
    hyper = {"lr": opt.lr, "betas": (opt.b1, opt.b2), "eps": 1e-8}  # optax.adamw's eps
    try:
        return torch.optim.AdamW(groups, fused=True, **hyper)
    except RuntimeError:  # "`fused=True` requires all the params to be ... on a supported device": an old torch
        return torch.optim.AdamW(groups, foreach=True, **hyper)


def timm_step_runner(config) -> Callable[[], None]:
    """One call = one timm training step (forward, backward, clip, AdamW) at the same batch."""
    import contextlib

    import torch

    model = common.timm_vit(config, train=True)
    optimizer = timm_adamw(model, config.optimizer)
    clip_norm = config.optimizer.grad_clip_norm
    size, batch = config.image_size, config.batch_size
    images = torch.rand(batch, 3, size, size) * 2 - 1
    labels = torch.arange(batch) % config.num_classes
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if config.model.dtype == "bfloat16"
                else contextlib.nullcontext())

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        if clip_norm > 0:  # as ours (vit_jax.optim: no clipping at 0)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm, foreach=True)
        optimizer.step()

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = common.load_config(args.config, args.dtype, args.batch)  # a bad --config first, torch or not
    torch_threads = common.torch_threads() if args.timm else None
    return common.compare("train_step", args, config, torch_threads, step_runner, timm_step_runner,
                          3 * common.forward_flops_per_image(config) * config.batch_size, "step",
                          ("train step", "analytic forward x 3"),
                          {"analytic_overcount": common.analytic_overcount(config)})


if __name__ == "__main__":
    common.run_main(main)
