"""Training-step throughput: our jitted `vit_jax.train` step against timm's ViT-B/16, same process and threads.

  python benchmarks/train_step.py [--dtype=float32|bfloat16] [--batch=8] [--config=configs/vit_b16.py]
      [--repeats=5] [--rounds=3] [--peak_size=4096] [--no-timm]

Ours: `vit_jax.train.make_train_step` (the real step: forward, backward, grad clipping, AdamW; dropout as the
config says; float32 params, compute in --dtype) on a one-device mesh with a 1000-class head. timm:
`vit_base_patch16_224` with the same dropout, cross-entropy, `clip_grad_norm_` and AdamW; with
--dtype=bfloat16 under `torch.autocast("cpu", torch.bfloat16)`. Both are timed after warm-up as the
median of --repeats steps, torch with one thread per core; ours, the peak and timm are timed in turn --rounds
times (the machine drifts) and the summary is the median round. Achieved GFLOP/s counts the analytic FLOPs
(forward x 3, `vit_jax.summary`); MFU divides it by a large XLA matmul measured on the spot in --dtype
(for bf16 both plain and accumulating in float32, the path the model takes). Prints a table, then one
JSON line last.
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


def timm_step_runner(config) -> Callable[[], None]:
    """One call = one timm training step (forward, backward, clip, AdamW) at the same batch."""
    import contextlib

    import torch

    model = common.timm_vit(config, train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=config.optimizer.weight_decay)
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip_norm)
        optimizer.step()

    return run


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = common.load_config(args.config, args.dtype, args.batch)  # a bad --config first, torch or not
    threads = common.torch_threads() if args.timm else None
    return common.compare("train_step", args, config, threads, step_runner, timm_step_runner,
                          3 * common.forward_flops_per_image(config) * config.batch_size, "step",
                          ("train step", "analytic forward x 3"))


if __name__ == "__main__":
    common.run_main(main)
