"""What attention's matmuls cost on this CPU, in each form the training step needs, alone.

  python benchmarks/attention_forms.py [--config=configs/vit_b16.py] [--batch=8] [--repeats=15] [--pad=3,11]

Float32, the shapes of one layer of the config's model (batch, heads, tokens, head_dim), jitted with the float32
training step's compiler options. Rows:
- the attention core as `vit_jax.models.vit` computes it (heads-first logits, softmax, probs @ values), forward
  + backward through `jax.vjp`; then the same with the tokens padded by each --pad (padded keys masked out, so
  the results are equal: the padding only changes the matmul shapes);
- the contractions over the key axis (probs @ values) and over the query axis (dV = P^T dO, as the backward
  pass writes it; the same after a transposed copy of P; dV^T = dO^T P), and the transposed copy alone.
Every backward contraction over the query axis has that axis major in both operands; XLA:CPU sends such a
transposed-left product to Eigen rather than YNNPACK. CPU time counts both cores: it is what the step pays while
its other core has work of its own. Each timed run is 20 calls in a row, per call reported: Linux books a
thread's CPU time on another core at its scheduler ticks, so a single ms-long call's CPU time is off by up to a
tick. Prints a table, then one JSON line last.
"""

from __future__ import annotations

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)

CALLS = 20  # per timed run


def _forms(batch: int, heads: int, tokens: int, head_dim: int, pads: list[int]) -> dict:
    """name -> (function, arguments, FLOPs of its matmuls)."""
    import jax
    import jax.numpy as jnp

    from vit_jax.models.layers import einsum, softmax

    def core(q, k, v, pad):
        if pad:
            q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
            mask = jnp.where(jnp.arange(tokens + pad) < tokens, 0.0, -jnp.inf).astype(jnp.float32)
        logits = einsum("bhqd,bhkd->bhqk", q, k, keep_f32=True)
        weights = softmax(logits + mask if pad else logits, axis=-1)
        return einsum("bhqk,bhkd->bhqd", weights, v)[:, :, :tokens]

    def core_step(pad):
        def step(q, k, v, g):
            out, vjp = jax.vjp(lambda q, k, v: core(q, k, v, pad), q, k, v)
            return out, vjp(g)
        return step

    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, g = (jax.random.normal(key, (batch, heads, tokens, head_dim)) for key in keys[:4])
    probs = jax.nn.softmax(jax.random.normal(keys[4], (batch, heads, tokens, tokens)), axis=-1)
    one = 2.0 * batch * heads * tokens * tokens * head_dim  # one (tokens x tokens x head_dim) contraction
    transposed = jax.lax.optimization_barrier  # keeps XLA from folding a transposed copy back into the dot

    forms = {"attention core, forward + backward (6 matmuls)": (core_step(0), (q, k, v, g), 6 * one)}
    for pad in pads:
        forms[f"  same, tokens padded {tokens} -> {tokens + pad}"] = (core_step(pad), (q, k, v, g), 6 * one)
    forms.update({
        "P @ V (over keys)": (lambda p, v: jnp.einsum("bhqk,bhkd->bhqd", p, v), (probs, v), one),
        "P^T @ dO (dV, over queries)": (lambda p, g: jnp.einsum("bhqk,bhqd->bhkd", p, g), (probs, g), one),
        "transposed copy of P, then @ dO": (
            lambda p, g: jnp.einsum("bhkq,bhqd->bhkd", transposed(jnp.swapaxes(p, 2, 3) + 0.0), g), (probs, g), one),
        "dO^T @ P (dV^T, dO^T copied)": (
            lambda p, g: transposed(jnp.einsum("bhdq,bhqk->bhdk", transposed(jnp.swapaxes(g, 2, 3) + 0.0), p)),
            (probs, g), one),
        "transposed copy of P alone": (lambda p: jnp.swapaxes(p, 2, 3) + 0.0, (probs,), 0.0),
    })
    return forms


def main(argv: list[str] | None = None) -> dict:
    import jax

    from vit_jax import xla_options
    from vit_jax.errors import UserError

    parser = common.argument_parser(__doc__, 15, "timed runs per form (median)", peak=False)
    parser.add_argument("--pad", default="3,11", help="comma-separated token paddings to time the core with")
    args = parser.parse_args(argv)
    try:
        pads = [int(p) for p in args.pad.split(",") if p.strip()]
    except ValueError as e:
        raise UserError(f"--pad must be comma-separated integers, e.g. 3,11; got {args.pad!r}") from e
    if any(p <= 0 for p in pads):
        raise UserError(f"--pad values must be positive token counts, got {args.pad!r}")
    if args.dtype != "float32":
        raise UserError(f"--dtype={args.dtype}: this benchmark times the float32 step's attention only")
    config = common.load_config(args.config, args.dtype, args.batch)
    m = config.model
    if m.classifier != "token" or m.resnet_layers or m.axial:
        raise UserError(f"--config={args.config}: a plain ViT with a class token is needed here")
    tokens = (config.image_size // m.patch_size) ** 2 + 1
    options = xla_options.compiler_options(float32_training=True)
    forms = _forms(config.batch_size, m.num_heads, tokens, m.hidden_size // m.num_heads, pads)
    rows, result = [], {"benchmark": "attention_forms", "config": args.config, "batch": config.batch_size,
                        "heads": m.num_heads, "tokens": tokens, "head_dim": m.hidden_size // m.num_heads, "forms": {}}
    for name, (fn, fn_args, flops) in forms.items():
        jitted = jax.jit(fn, compiler_options=options)
        wall, cores = common.median_run(common.time_runs_cpu(lambda f=jitted, a=fn_args: jax.block_until_ready(f(*a)),
                                                             args.repeats, warmup=2, calls=CALLS))
        cpu = wall * cores
        rate = f"{flops / wall / 1e9:6.1f} GFLOP/s, {flops / cpu / 1e9:6.1f} per busy core" if flops else ""
        rows.append((name, f"{wall * 1e3:6.2f} ms wall, {cpu * 1e3:6.2f} ms CPU  {rate}"))
        result["forms"][name.strip()] = {"wall_ms": wall * 1e3, "cpu_ms": cpu * 1e3, "gflop": flops / 1e9}
    rows.append(("layers per step", f"{m.num_layers}: the core's CPU time x {m.num_layers} is attention's share of "
                                    "the step's core time"))
    common.print_table(rows, result)  # the table, then the JSON line last
    return result


if __name__ == "__main__":
    common.run_main(main)
