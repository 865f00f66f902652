"""How close the train step can get to the matmul peak: each of its matmuls timed alone, at its shape.

  python benchmarks/matmul_bound.py [--dtype=float32|bfloat16] [--batch=8] [--config=configs/vit_b16.py]
      [--repeats=7] [--peak_size=4096]

Lists every matmul of one training step of a plain ViT (forward; backward: input and weight gradients;
attention's batched products both ways; the patch embedding without an input gradient), times each shape
alone as a jitted `dot_general` with the step's compiler options (float32 accumulation in bf16), then the
real step (`benchmarks/train_step.py`'s timing) and the XLA matmul peak. What the step spends beyond its
matmuls is the rest: softmax, LayerNorm, GELU, dropout, residual adds, layout copies, gradient clipping and
AdamW (in the step some of it is fused into the matmuls). MFU if that rest cost nothing = the ceiling that
the matmuls alone allow. Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)
import train_step


@dataclasses.dataclass(frozen=True)
class Matmul:
    """`count` matmuls per step of one shape: `dot_general(lhs, rhs, (contract, batch))`."""

    name: str
    count: int
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    contract: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    @property
    def flops(self) -> float:
        contracted = 1
        for axis in self.contract[0]:
            contracted *= self.lhs[axis]
        out = 1
        for axis, size in enumerate(self.lhs):
            if axis not in self.contract[0]:
                out *= size
        for axis, size in enumerate(self.rhs):
            if axis not in self.contract[1] and axis not in self.batch[1]:
                out *= size
        return 2.0 * out * contracted


def _dense(name: str, count: int, lead: tuple[int, ...], d_in: int, d_out: int, input_grad: bool = True
           ) -> list[Matmul]:
    """y = x @ W forward; dx = dy @ W^T and dW = x^T @ dy backward; x is `lead + (d_in,)` (`vit_jax.models.layers.
    Dense` flattens the leading axes into one in float32 and keeps them in bf16: the forms the step computes)."""
    n = len(lead)
    out = [Matmul(f"{name} fwd", count, lead + (d_in,), (d_in, d_out), ((n,), (0,))),
           Matmul(f"{name} dW", count, lead + (d_in,), lead + (d_out,), (tuple(range(n)), tuple(range(n))))]
    if input_grad:
        out.append(Matmul(f"{name} dx", count, lead + (d_out,), (d_in, d_out), ((n,), (1,))))
    return out


def step_matmuls(config) -> list[Matmul]:
    """Every matmul of one training step of the config's plain ViT, grouped by shape."""
    import jax.numpy as jnp

    from vit_jax.errors import UserError
    from vit_jax.models.layers import LOW_PRECISION

    m = config.model
    if m.resnet_layers or m.axial:
        raise UserError(f"variant {m.variant!r}: only plain ViTs are listed (no hybrid / axial)")
    batch, grid = config.batch_size, config.image_size // m.patch_size
    tokens = grid * grid + (1 if m.classifier == "token" else 0)
    width, layers, heads = m.hidden_size, m.num_layers, m.num_heads
    head_dim, bh = width // heads, batch * heads
    flat = jnp.dtype(m.dtype) not in LOW_PRECISION
    rows = (batch * tokens,) if flat else (batch, tokens)
    # The patch embedding is an einsum over (batch, rows, cols) of patches, flattened or not.
    patches = (batch * grid * grid,) if flat else (batch, grid * grid)
    out = _dense("patch embedding", 1, patches, m.patch_size ** 2 * 3, width, input_grad=False)
    out += _dense("query/key/value", 3 * layers, rows, width, width)
    out += _dense("attention out", layers, rows, width, width)
    out += _dense("MLP in", layers, rows, width, m.mlp_dim)
    out += _dense("MLP out", layers, rows, m.mlp_dim, width)
    q = (bh, tokens, head_dim)
    p = (bh, tokens, tokens)
    bdims = ((0,), (0,))
    out += [Matmul("q k^T fwd; dP = dout v^T", 2 * layers, q, q, ((2,), (2,)), bdims),
            Matmul("P v fwd; dq = dlogits k", 2 * layers, p, q, ((2,), (1,)), bdims),
            Matmul("dv = P^T dout; dk = dlogits^T q", 2 * layers, p, q, ((1,), (1,)), bdims)]
    if m.representation_size:
        out += _dense("pre-logits", 1, (batch,), width, m.representation_size)
    out += _dense("head", 1, (batch,), m.representation_size or width, config.num_classes)
    return out


def time_matmul(mm: Matmul, dtype: str, repeats: int) -> float:
    """Median seconds of one such matmul alone, jitted with the step's CPU compiler options."""
    import jax
    import jax.numpy as jnp

    from vit_jax import xla_options

    lhs = jax.random.normal(jax.random.key(0), mm.lhs, jnp.float32).astype(dtype)
    rhs = jax.random.normal(jax.random.key(1), mm.rhs, jnp.float32).astype(dtype)
    options = xla_options.compiler_options(float32_training=dtype == "float32")
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (mm.contract, mm.batch), preferred_element_type=jnp.float32),
                 compiler_options=options)
    return common.median(common.time_runs(lambda: fn(lhs, rhs).block_until_ready(), repeats, warmup=2))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--config", default=common.DEFAULT_CONFIG)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per matmul (median)")
    parser.add_argument("--peak_size", type=int, default=4096, help="matmul size for the peak")
    args = parser.parse_args(argv)
    config = common.load_config(args.config, args.dtype, args.batch)
    matmuls = step_matmuls(config)
    step_seconds = train_step.time_ours(config, 5)
    timed = [(mm, time_matmul(mm, args.dtype, args.repeats)) for mm in matmuls]
    peaks = common.matmul_peaks(args.dtype, args.peak_size, 5)
    peak_name = "float32" if args.dtype == "float32" else "bfloat16_f32acc"  # bf16: the model's accumulation
    peak = peaks[peak_name]

    flops = sum(mm.flops * mm.count for mm in matmuls)
    analytic = 3 * common.forward_flops_per_image(config) * config.batch_size
    matmul_seconds = sum(seconds * mm.count for mm, seconds in timed)
    rest = step_seconds - matmul_seconds
    rows = [("config", f"{config.model.variant} {config.image_size}px batch {config.batch_size} {args.dtype}")]
    width = max(len(mm.name) for mm in matmuls)
    for mm, seconds in timed:
        rows.append((f"{mm.name:<{width}} x{mm.count:<3d}",
                     f"{mm.flops / 1e9:7.3f} GFLOP {seconds * 1e3:8.2f} ms {mm.flops / seconds / 1e9:6.1f} GFLOP/s "
                     f"-> {seconds * mm.count * 1e3:7.1f} ms/step"))
    rows += [
        ("matmul FLOPs / analytic", f"{flops / 1e9:.1f} / {analytic / 1e9:.1f} GFLOP"),
        ("step's matmuls alone", f"{matmul_seconds:.3f} s ({flops / matmul_seconds / 1e9:.1f} GFLOP/s, "
                                 f"{flops / matmul_seconds / 1e9 / peak:.1%} of the peak)"),
        ("whole step", f"{step_seconds:.3f} s ({config.batch_size / step_seconds:.2f} img/s)"),
        ("rest of the step", f"{rest:.3f} s ({rest / step_seconds:.1%})"),
        (f"matmul peak {peak_name}", f"{peak:.1f} GFLOP/s"),
        ("MFU of the step", f"{analytic / step_seconds / 1e9 / peak:.1%}"),
        ("MFU if the rest cost nothing", f"{analytic / matmul_seconds / 1e9 / peak:.1%}"),
    ]
    result = {"benchmark": "matmul_bound", "config": args.config, "variant": config.model.variant,
              "dtype": args.dtype, "batch": config.batch_size, "step_s": step_seconds,
              "matmul_s": matmul_seconds, "rest_s": rest, "matmul_gflop": flops / 1e9, "analytic_gflop": analytic / 1e9,
              "peak_gflop_s": peak, "mfu": analytic / step_seconds / 1e9 / peak,
              "mfu_matmuls_only": analytic / matmul_seconds / 1e9 / peak,
              "matmuls": {mm.name: {"count": mm.count, "ms": seconds * 1e3, "gflop_s": mm.flops / seconds / 1e9}
                          for mm, seconds in timed}}
    common.print_table(rows, result)
    return result


if __name__ == "__main__":
    common.run_main(main)
