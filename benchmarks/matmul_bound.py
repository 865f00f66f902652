"""How close the train step can get to the matmul peak: each of its matmuls timed alone, as the model calls it.

  python benchmarks/matmul_bound.py [--dtype=float32|bfloat16] [--batch=8] [--config=configs/vit_b16.py]
      [--repeats=7] [--peak_size=4096]

Lists every contraction of one training step of a plain ViT as the model computes it (`vit_jax.models.layers.
einsum`, with the operand shapes of `layers.Dense`: float32 flattens the leading axes, bf16 keeps them; the
patch embedding's 6-D einsum; attention's two einsums) and times each alone, jitted with the step's compiler
options: its forward, and its backward (`jax.vjp`: the gradients of both operands; of the kernel only for the
patch embedding), median of --repeats, the faster of two passes. Then the real step (`benchmarks/train_step.py`'s
timing) and the XLA matmul peak. What the step spends beyond its matmuls is the rest: softmax, LayerNorm, GELU,
dropout, residual adds, layout copies, gradient clipping and AdamW (in the step some of it is fused into the
matmuls). MFU if that rest cost nothing = the ceiling that the matmuls alone allow. Both MFUs count the analytic
FLOPs, forward x 3 (issue #8's definition, as train_step.py), which include the patch embedding's input gradient
that the step never computes (~0.22% for B/16 at 224px, `analytic_overcount` in the JSON): they read that share
high; the listed contractions leave it out (matmul_gflop = analytic_gflop x (1 - analytic_overcount)). Prints a
table, then one JSON line last.
"""

from __future__ import annotations

import dataclasses
import math

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)
import train_step


@dataclasses.dataclass(frozen=True)
class Contraction:
    """`count` einsums per step of one shape, forward and backward (gradients of the operands in `grads`)."""

    name: str
    count: int
    spec: str
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    grads: tuple[int, ...] = (0, 1)
    keep_f32: bool = False

    @property
    def flops(self) -> float:
        """Forward FLOPs: 2 x the product of every index's size (each index is in two of the three terms)."""
        sizes = dict(zip(self.spec.split(",")[0], self.lhs)) | dict(zip(self.spec.split(",")[1].split("->")[0],
                                                                       self.rhs))
        return 2.0 * math.prod(sizes.values())


def step_contractions(config) -> list[Contraction]:
    """Every matmul-like contraction of one training step of the config's plain ViT, grouped by shape."""
    import jax.numpy as jnp

    from vit_jax.errors import UserError
    from vit_jax.models.layers import LOW_PRECISION

    m = config.model
    if m.resnet_layers or m.axial:
        raise UserError(f"variant {m.variant!r}: only plain ViTs are listed (no hybrid / axial)")
    batch, grid, p = config.batch_size, config.image_size // m.patch_size, m.patch_size
    tokens = grid * grid + (1 if m.classifier == "token" else 0)
    width, layers, heads = m.hidden_size, m.num_layers, m.num_heads
    head_dim = width // heads
    flat = jnp.dtype(m.dtype) not in LOW_PRECISION  # layers.Dense: float32 flattens the leading axes

    def dense(name: str, count: int, d_in: int, d_out: int) -> Contraction:
        if flat:
            return Contraction(name, count, "rk,kn->rn", (batch * tokens, d_in), (d_in, d_out))
        return Contraction(name, count, "btk,kn->btn", (batch, tokens, d_in), (d_in, d_out))

    out = [Contraction("patch embedding", 1, "bxiyjc,ijcd->bxyd", (batch, grid, p, grid, p, 3), (p, p, 3, width),
                       grads=(1,)),
           dense("query/key/value", 3 * layers, width, width),
           dense("attention out", layers, width, width),
           dense("MLP in", layers, width, m.mlp_dim),
           dense("MLP out", layers, m.mlp_dim, width),
           Contraction("attention logits", layers, "bhqd,bhkd->bhqk", (batch, heads, tokens, head_dim),
                       (batch, heads, tokens, head_dim), keep_f32=True),
           Contraction("attention values", layers, "bhqk,bhkd->bhqd", (batch, heads, tokens, tokens),
                       (batch, heads, tokens, head_dim))]
    if m.representation_size:
        out.append(Contraction("pre-logits", 1, "bk,kn->bn", (batch, width), (width, m.representation_size)))
    features = m.representation_size or width
    out.append(Contraction("head", 1, "bk,kn->bn", (batch, features), (features, config.num_classes)))
    return out


Run = tuple[float, float]  # (wall seconds, cores busy): common.time_runs_cpu


def time_contraction(c: Contraction, dtype: str, repeats: int) -> tuple[Run, Run]:
    """The median run of its forward and of its backward alone, jitted with the step's CPU compiler options."""
    import jax
    import jax.numpy as jnp

    from vit_jax import xla_options
    from vit_jax.models import layers

    lhs = jax.random.normal(jax.random.key(0), c.lhs, jnp.float32).astype(dtype)
    rhs = jax.random.normal(jax.random.key(1), c.rhs, jnp.float32).astype(dtype)
    options = xla_options.compiler_options(float32_training=dtype == "float32")

    def forward(a, b):
        return layers.einsum(c.spec, a, b, keep_f32=c.keep_f32)

    def backward(a, b, g):  # a gradient not returned is dead code to XLA: only those in `grads` are computed
        grads = jax.vjp(forward, a, b)[1](g)
        return tuple(grads[i] for i in c.grads)

    out = jax.eval_shape(forward, lhs, rhs)
    cotangent = jax.random.normal(jax.random.key(2), out.shape, jnp.float32).astype(out.dtype)
    fwd = jax.jit(forward, compiler_options=options)
    bwd = jax.jit(backward, compiler_options=options)
    # 5 calls per timed run: CPU time is booked per scheduler tick (common.time_runs_cpu), and a call is a few ms.
    fwd_run = common.median_run(common.time_runs_cpu(lambda: fwd(lhs, rhs).block_until_ready(), repeats, warmup=2,
                                                     calls=5))
    bwd_run = common.median_run(common.time_runs_cpu(lambda: jax.block_until_ready(bwd(lhs, rhs, cotangent)),
                                                     repeats, warmup=2, calls=5))
    return fwd_run, bwd_run


def main(argv: list[str] | None = None) -> dict:
    args = common.argument_parser(__doc__, 7, "timed runs per contraction (median)").parse_args(argv)
    if args.peak_size < 1:
        from vit_jax.errors import UserError

        raise UserError(f"--peak_size must be > 0 here (the bound is a fraction of the peak), got {args.peak_size}")
    config = common.load_config(args.config, args.dtype, args.batch)
    contractions = step_contractions(config)
    step_seconds, step_cores = common.median_run(common.time_runs_cpu(train_step.step_runner(config), 5, warmup=2))
    # Two passes, the faster of each: the first contractions timed right after the step read up to 2x slow.
    passes = [[time_contraction(c, args.dtype, args.repeats) for c in contractions] for _ in range(2)]
    timed = [(c, min(a[0], b[0]), min(a[1], b[1])) for c, a, b in zip(contractions, *passes)]  # (wall, cores)
    peak_name = common.PEAK_KIND[args.dtype]  # bf16: accumulating in float32, the model's path
    peak = common.model_matmul_peak(args.dtype, args.peak_size, 5)

    flops = sum(c.flops * c.count * (1 + len(c.grads)) for c in contractions)
    analytic = 3 * common.forward_flops_per_image(config) * config.batch_size
    matmul_seconds = sum((fwd[0] + bwd[0]) * c.count for c, fwd, bwd in timed)
    matmul_cpu = sum((fwd[0] * fwd[1] + bwd[0] * bwd[1]) * c.count for c, fwd, bwd in timed)
    step_cpu = step_seconds * step_cores
    rest = step_seconds - matmul_seconds
    rows = [("config", f"{config.model.variant} {config.image_size}px batch {config.batch_size} {args.dtype}")]
    width = max(len(c.name) for c in contractions) + 5
    for c, (fwd, fwd_cores), (bwd, bwd_cores) in timed:
        bwd_flops = c.flops * len(c.grads)
        rows.append((f"{c.name} x{c.count}".ljust(width),
                     f"fwd {fwd * 1e3:7.2f} ms {c.flops / fwd / 1e9:6.1f} GFLOP/s {fwd_cores:4.2f} cores, "
                     f"bwd {bwd * 1e3:7.2f} ms {bwd_flops / bwd / 1e9:6.1f} GFLOP/s {bwd_cores:4.2f} cores "
                     f"-> {(fwd + bwd) * c.count * 1e3:7.1f} ms/step"))
    rows += [
        ("matmul FLOPs / analytic", f"{flops / 1e9:.1f} / {analytic / 1e9:.1f} GFLOP"),
        ("step's matmuls alone", f"{matmul_seconds:.3f} s ({flops / matmul_seconds / 1e9:.1f} GFLOP/s, "
                                 f"{flops / matmul_seconds / 1e9 / peak:.1%} of the peak)"),
        ("whole step", f"{step_seconds:.3f} s ({config.batch_size / step_seconds:.2f} img/s, "
                       f"{step_cores:.2f} cores busy)"),
        ("rest of the step", f"{rest:.3f} s ({rest / step_seconds:.1%})"),
        ("CPU time: step / matmuls / rest", f"{step_cpu:.3f} / {matmul_cpu:.3f} / {step_cpu - matmul_cpu:.3f} "
                                            f"core-s (rest {1 - matmul_cpu / step_cpu:.1%})"),
        (f"matmul peak {peak_name}", f"{peak:.1f} GFLOP/s"),
        ("MFU of the step", f"{analytic / step_seconds / 1e9 / peak:.1%}"),
        ("MFU if the rest cost nothing", f"{analytic / matmul_seconds / 1e9 / peak:.1%}"),
    ]
    result = {"benchmark": "matmul_bound", "config": args.config, "variant": config.model.variant,
              "dtype": args.dtype, "batch": config.batch_size, "step_s": step_seconds,
              "matmul_s": matmul_seconds, "rest_s": rest, "step_cpu_s": step_cpu, "matmul_cpu_s": matmul_cpu,
              "matmul_gflop": flops / 1e9,
              "analytic_gflop": analytic / 1e9, "analytic_overcount": common.analytic_overcount(config),
              "peak_gflop_s": peak,
              "mfu": analytic / step_seconds / 1e9 / peak, "mfu_matmuls_only": analytic / matmul_seconds / 1e9 / peak,
              "contractions": {c.name: {"count": c.count, "spec": c.spec, "fwd_ms": fwd[0] * 1e3,
                                        "fwd_cores": fwd[1], "bwd_ms": bwd[0] * 1e3, "bwd_cores": bwd[1]}
                               for c, fwd, bwd in timed}}
    common.print_table(rows, result)
    return result


if __name__ == "__main__":
    common.run_main(main)
