"""Compiled cost of our train step: XLA's FLOPs against the analytic model FLOPs, and peak temporary memory.

  python benchmarks/compile_report.py [--dtype=float32|bfloat16] [--batch=8] [--config=configs/vit_b16.py]

`flops_ratio` = XLA cost-analysis FLOPs of the jitted `vit_jax.train` step / (analytic forward FLOPs x 3 x
batch). XLA counts every op (softmax, GELU, LayerNorm, AdamW too), so a ratio a little above 1 is the
elementwise work; a ratio well above 1 is wasted compute (recomputation, a dot done twice, padding) on any
hardware. XLA's cost analysis counts a scan/while body once, so the step is lowered with `model.scan=False`
(and one micro-batch); remat's recomputation does show. Peak temporary memory is the compiled step's
`temp_size_in_bytes` (activations and scratch; params and optimizer state are arguments, donated).
The forward pass is reported the same way, compiled as `benchmarks/inference.py` times it
(`inference.inference_program`: `predict.make_classifier` with its CPU compiler options, params cast by
`predict.cast_for_inference`); its memory is that of the config as given (scanned if `model.scan`), its FLOPs
those of the unrolled program. The analytic step FLOPs are forward x 3 (issue #8's definition, as train_step.py
counts them), which include the patch embedding's input gradient that the step never computes: flops_ratio reads
that share low (`analytic_overcount` in the JSON, ~0.22% for B/16 at 224px; the ratio against the FLOPs the step
does is flops_ratio / (1 - analytic_overcount)). A cost analysis without a "flops" figure is an error, not a
ratio of 0. Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)
import inference


def cost_of(compiled_or_lowered) -> dict:
    cost = compiled_or_lowered.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost) or {}


def flops_of(what: str, *programs) -> float:
    """XLA's cost-analysis FLOPs of the first of `programs` (compiled, then lowered) that reports them; an error
    where none does, rather than a ratio of 0."""
    for program in programs:
        flops = float(cost_of(program).get("flops", 0.0) or 0.0)
        if flops > 0:
            return flops
    raise RuntimeError(f"XLA's cost analysis of the {what} has no 'flops' figure on this backend "
                       f"({programs[0].__class__.__name__}); compile_report cannot compute its FLOPs ratio")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=common.DTYPES)
    parser.add_argument("--batch", type=common.count(1), default=8)
    parser.add_argument("--config", default=common.DEFAULT_CONFIG)
    args = parser.parse_args(argv)

    import jax

    from vit_jax import sharding, train

    config = common.load_config(args.config, args.dtype, args.batch)
    scanned = bool(config.model.scan)
    with config.unlocked():
        config.model.scan = False  # XLA counts a loop body once: lower unrolled for the count
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    lowered = train.make_train_step(config, mesh, config.total_steps).lower(
        train.abstract_state(config, mesh, config.total_steps), train.abstract_batch(config, mesh))
    compiled = lowered.compile()
    step_flops = flops_of("train step", compiled, lowered)
    memory = compiled.memory_analysis()
    analytic_forward = common.forward_flops_per_image(config) * config.batch_size

    def compile_forward(forward_config):  # the program inference.py times, compiled for abstract inputs
        forward, make_params = inference.inference_program(forward_config)
        images = jax.ShapeDtypeStruct((config.batch_size, config.image_size, config.image_size, 3), "float32")
        return forward.lower(jax.eval_shape(make_params, images), images).compile()

    forward_unrolled = compile_forward(config)
    forward_flops = flops_of("forward pass", forward_unrolled)
    # The memory of the program inference.py times: with the config's own scan setting.
    forward = compile_forward(common.load_config(args.config, args.dtype, args.batch)) if scanned else forward_unrolled
    forward_memory = forward.memory_analysis()

    result = {
        "benchmark": "compile_report", "config": args.config, "variant": config.model.variant, "dtype": args.dtype,
        "batch": config.batch_size, "image_size": config.image_size, "remat": bool(config.model.remat),
        "scan_in_config": scanned, "xla_step_gflop": step_flops / 1e9,
        "analytic_step_gflop": 3 * analytic_forward / 1e9, "flops_ratio": step_flops / (3 * analytic_forward),
        "analytic_overcount": common.analytic_overcount(config),
        "xla_forward_gflop": forward_flops / 1e9, "analytic_forward_gflop": analytic_forward / 1e9,
        "forward_flops_ratio": forward_flops / analytic_forward,
        "temp_mib": memory.temp_size_in_bytes / 2**20 if memory else None,
        "argument_mib": memory.argument_size_in_bytes / 2**20 if memory else None,
        "forward_temp_mib": forward_memory.temp_size_in_bytes / 2**20 if forward_memory else None,
    }
    rows = [("config", f"{result['variant']} {config.image_size}px batch {config.batch_size} {args.dtype}"
             + (" (scan lowered unrolled)" if scanned else "") + (" remat" if result["remat"] else "")),
            ("train step XLA / analytic", f"{result['xla_step_gflop']:.1f} / {result['analytic_step_gflop']:.1f} "
             f"GFLOP = {result['flops_ratio']:.3f}"),
            ("forward XLA / analytic", f"{result['xla_forward_gflop']:.1f} / {result['analytic_forward_gflop']:.1f} "
             f"GFLOP = {result['forward_flops_ratio']:.3f}")]
    if memory:
        rows.append(("train step peak temp",
                     f"{result['temp_mib']:.0f} MiB (arguments {result['argument_mib']:.0f} MiB)"))
    if forward_memory:
        rows.append(("forward peak temp", f"{result['forward_temp_mib']:.0f} MiB (as inference.py times it)"))
    common.print_table(rows, result)
    return result


if __name__ == "__main__":
    common.run_main(main)
