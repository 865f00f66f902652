"""Start-up cost of a fresh model: compiling and running the initialisation of its params.

  python benchmarks/init_compile.py [--config=configs/vit_b16.py] [--rounds=2]
  python benchmarks/init_compile.py --config=configs/vit_h14.py --topology=v5e:4x4 --fsdp=16   # needs .[tpu]

Three forms of the same jitted initialisation (params laid out for a mesh of --fsdp x --model devices, default
the config's: one CPU device), each traced, lowered, compiled and run from scratch in every round (the persistent
compilation cache is off on the command line):
  per-block   `model.init` as it was before `vit_jax.train.init_params`: every block's initialisers compiled on
              their own, XLA's default options;
  scanned     the blocks drawn as the scanned model's and split (`init_params`), default options;
  run-once    `init_params` with the compiler options of a computation run once (`vit_jax.xla_options`: LLVM
              level 1 on CPU), what `vit_jax.train.init_state` compiles.
Reported per form: the median over the rounds of lowering (trace + lower), compile and run seconds. Prints a
table, then one JSON line last with `speedup` = per-block total / run-once total.
With --topology (libtpu, no TPU needed: `vit_jax.plan`'s compile-only devices, TPU runs' rbg PRNG) the forms are
only compiled, on a mesh of --fsdp x --model chips (data: the rest), and the per-chip temporaries reported (the
run-once options are CPU-only: there it is the scanned form); `speedup` is then of lower + compile.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import common  # noqa: I001  (benchmarks/common.py; also puts the repo root on sys.path)

FORMS = ("per-block", "scanned", "run-once")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=common.DEFAULT_CONFIG)
    parser.add_argument("--rounds", type=common.count(1), default=2, help="rounds of the three forms (median)")
    parser.add_argument("--topology", default=None, help="TPU slice to compile for (e.g. v5e:4x4); no run")
    parser.add_argument("--fsdp", type=common.count(1), default=None, help="mesh.fsdp (default: the config's)")
    parser.add_argument("--model", type=common.count(1), default=None, help="mesh.model (default: the config's)")
    return parser.parse_args(argv)


def initialiser(form: str, config, mesh):
    """A new jitted function (so nothing is reused from an earlier round) drawing `config`'s params in `form`."""
    import flax.linen as nn
    import jax

    from vit_jax import train, xla_options

    model = train.make_model(config)
    shardings = train.state_shardings(config, mesh)["params"]
    if form == "per-block":
        return jax.jit(lambda rng: nn.unbox(train._boxed_params(model, config, rng)), out_shardings=shardings)
    options = xla_options.compiler_options(mesh.devices.flat, run_once=True) if form == "run-once" else None
    return jax.jit(lambda rng: train.init_params(model, config, rng, mesh), out_shardings=shardings,
                   compiler_options=options)


def time_form(form: str, config, mesh, run: bool) -> dict[str, float]:
    """Seconds to lower, compile and (with `run`) run `form`; without `run`, the compiled temporaries instead."""
    import jax

    fn = initialiser(form, config, mesh)
    start = time.perf_counter()
    lowered = fn.lower(jax.random.key(config.seed))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    figures = {"lower_s": lowered_at - start, "compile_s": compiled_at - lowered_at}
    if not run:
        return {**figures, "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}
    jax.block_until_ready(compiled(jax.random.key(config.seed)))
    return {**figures, "run_s": time.perf_counter() - compiled_at}


def main(argv: list[str] | None = None, *, own_process: bool = False) -> dict:
    """The benchmark; `own_process` (the command line, not a test) also sets process-wide JAX options: no
    persistent compilation cache and, with --topology, a CPU backend and TPU runs' PRNG (`plan.use_tpu_prng`)."""
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from vit_jax import plan, sharding
    from vit_jax.errors import UserError

    if own_process:
        jax.config.update("jax_enable_compilation_cache", False)
    config = common.load_config(args.config, "float32", 8)
    with config.unlocked():
        config.mesh.fsdp = config.mesh.fsdp if args.fsdp is None else args.fsdp
        config.mesh.model = config.mesh.model if args.model is None else args.model
        config.mesh.data = -1
    if config.mesh.fsdp < 1 or config.mesh.model < 1:
        raise UserError(f"mesh.fsdp={config.mesh.fsdp}, mesh.model={config.mesh.model}: this benchmark needs "
                        "explicit sizes >= 1; pass --fsdp and --model")
    if args.topology:
        if own_process:
            jax.config.update("jax_platforms", "cpu")  # compile only, as vit_jax.plan does
            plan.use_tpu_prng()
        devices = plan.topology_devices(plan.parse_topology(args.topology))
    else:
        devices = jax.devices()[:config.mesh.fsdp * config.mesh.model]
    mesh = sharding.make_mesh(config, devices)
    jax.jit(lambda x: x + 1)(jnp.zeros(4)).block_until_ready()  # the backend's own start-up, outside the timings
    load_before = common.load_average()
    runs = {form: [] for form in FORMS}
    for _ in range(args.rounds):
        for form in FORMS:
            runs[form].append(time_form(form, config, mesh, run=not args.topology))
    figures = {form: {key: statistics.median(run[key] for run in runs[form]) for key in runs[form][0]}
               for form in FORMS}
    for figure in figures.values():
        figure["total_s"] = figure["lower_s"] + figure["compile_s"] + figure.get("run_s", 0.0)
    result = {"benchmark": "init_compile", "config": args.config, "variant": config.model.variant,
              "num_layers": config.model.num_layers, "platform": devices[0].platform, "rounds": args.rounds,
              "topology": args.topology, "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
              "cores": common.cores(), "load_average": f"{load_before} -> {common.load_average()}",
              **{f"{form.replace('-', '_')}_{key}": value for form, figure in figures.items()
                 for key, value in figure.items()},
              "speedup": figures["per-block"]["total_s"] / figures["run-once"]["total_s"]}
    rows = [("config", f"{args.config} ({config.model.variant}, {config.model.num_layers} blocks)"),
            ("devices", f"{len(devices)} {devices[0].platform} {result['mesh']}"
                        + (f" ({args.topology}, compiled only)" if args.topology else "")),
            ("load average", result["load_average"])]
    form_line = ("lower {lower_s:.2f} s  compile {compile_s:.2f} s  temporaries {temp_mib:.0f} MiB per chip"
                 if args.topology else
                 "lower {lower_s:.2f} s  compile {compile_s:.2f} s  run {run_s:.2f} s  total {total_s:.2f} s")
    rows += [(form, form_line.format(**figure)) for form, figure in figures.items()]
    rows.append(("speedup", f"{result['speedup']:.2f}x (per-block total / run-once total)"))
    common.print_table(rows, result)
    return result


if __name__ == "__main__":
    common.run_main(functools.partial(main, own_process=True))
