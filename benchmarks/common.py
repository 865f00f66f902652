"""Shared helpers of the model benchmarks: config loading, timing, the on-the-spot matmul peak, timm setup.

The benchmarks compare our jitted JAX step with timm's same ViT (`vit_base_patch16_224` for B/16) in the same
process and with the same thread count (one per core this process may use: `cores`), so both see the same machine
state, in rounds (ours, the matmul peak, timm; each figure reported is its median over the rounds, and the ratio
and MFU are computed from the reported figures). Timings are the median of `repeats` runs after `warmup` untimed
ones (the first includes XLA compilation / torch's lazy init). The two models do the same matmuls, dropout and
stochastic depth; they differ in GELU (ours tanh-approximate by default, timm's exact erf) and timm runs eager, not
torch.compile'd (`timm_vit`; the JSON line's ours_gelu, timm_gelu, timm_compiled).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python benchmarks/x.py` from anywhere: configs/ and vit_jax/ importable
    sys.path.insert(0, ROOT)

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "vit_b16.py")
DTYPES = ("float32", "bfloat16")


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum` (a bad one is argparse's usage error naming the flag)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer >= {minimum}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse type: a number > 0 (a bad one is argparse's usage error naming the flag)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):  # also NaN
        raise argparse.ArgumentTypeError(f"{text} is invalid: expected a finite number > 0")
    return value


PEAK_MIN = 512  # smaller matmuls are dominated by call overhead: their "peak" would make MFU meaningless


def peak_size(text: str) -> int:
    """An argparse type for --peak_size: 0 (skip the peak) or a matmul size >= `PEAK_MIN`."""
    value = count(0)(text)
    if 0 < value < PEAK_MIN:
        raise argparse.ArgumentTypeError(f"{value} is too small for a matmul peak: expected 0 (skip the peak) or "
                                         f"an integer >= {PEAK_MIN}")
    return value


def argument_parser(doc: str, repeats: int, repeats_help: str, peak: bool = True) -> argparse.ArgumentParser:
    """The flags every model benchmark takes: --dtype, --batch, --config, --repeats, and --peak_size with `peak`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--batch", type=count(1), default=8)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--repeats", type=count(1), default=repeats, help=repeats_help)
    if peak:
        parser.add_argument("--peak_size", type=peak_size, default=4096,
                            help=f"matmul size for the peak (0: skip; else >= {PEAK_MIN})")
    return parser


def load_config(path: str, dtype: str, batch: int, num_classes: int = 1000):
    """`get_config()` of a configs/*.py file, with the benchmark's dtype, batch and a timm-like 1000-class head."""
    from vit_jax.errors import UserError

    if not os.path.isfile(path):
        raise UserError(f"--config {path!r} is not a file; pass a configs/*.py file such as {DEFAULT_CONFIG}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    spec = importlib.util.spec_from_file_location("_benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    with config.unlocked():
        config.model.dtype = dtype
        config.batch_size = batch
        config.accum_steps = 1
        config.num_classes = num_classes
        config.total_steps = 1000
        config.optimizer.warmup_steps = 10
    return config


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (which must block until its result is ready)."""
    return [wall for wall, _ in time_runs_cpu(fn, repeats, warmup)]


def time_runs_cpu(fn: Callable[[], Any], repeats: int, warmup: int = 1, calls: int = 1
                  ) -> list[tuple[float, float]]:
    """(wall seconds per call, cores busy) of each of `repeats` runs of `calls` calls of `fn`; cores = the
    process's CPU time (all its threads, user + system) / wall time, e.g. 1.0 for a computation that keeps one of
    the two cores busy.

    Linux books the CPU time of a thread running on another core at that core's scheduler ticks (~4 ms), so for
    calls of a few ms give `calls` enough for a run to span many ticks.
    """
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - start
        runs.append((wall / calls, (time.process_time() - cpu) / wall))
    return runs


def median_run(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The (wall, cores) of the run with the median wall time."""
    return sorted(runs)[(len(runs) - 1) // 2]


def median(times: list[float]) -> float:
    return statistics.median(times)


PEAK_KIND = {"float32": "float32", "bfloat16": "bfloat16_f32acc"}  # the matmul MFU is measured against


def matmul_peak(dtype: str, size: int = 4096, repeats: int = 3, f32_accumulate: bool = False) -> float:
    """GFLOP/s of a `size`^3 matmul in XLA on this machine now, in `dtype` (optionally accumulating in float32).

    The fastest of `repeats` runs: a peak, so a slow moment of this shared machine does not lower it (and raise MFU).
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    if f32_accumulate:
        matmul = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    else:
        matmul = jax.jit(jnp.matmul)
    seconds = min(time_runs(lambda: matmul(a, b).block_until_ready(), repeats))
    return 2.0 * size**3 / seconds / 1e9


def model_matmul_peak(dtype: str, size: int, repeats: int) -> float:
    """The peak MFU is measured against (`PEAK_KIND`): the matmul the model does in `dtype`. For bf16 that is bf16
    operands accumulating in float32 (`preferred_element_type=float32`, the model's path), not XLA:CPU's plain bf16
    matmul, which is a float32 matmul between converts and would overstate MFU."""
    return matmul_peak(dtype, size, repeats, f32_accumulate=dtype == "bfloat16")


def forward_flops_per_image(config) -> float:
    """Analytic forward FLOPs per image (vit_jax.summary: 2 x multiply-adds of every matmul and conv)."""
    from vit_jax import summary

    return sum(row.flops for row in summary.layer_table(config))


def analytic_overcount(config) -> float:
    """The share of "forward x 3" (issue #8's analytic FLOPs of a training step) that the step never computes:
    the input gradient of the layer that reads the images (the patch embedding; a hybrid's root conv), as many
    FLOPs as that layer's forward. ~0.22% for B/16 at 224px, so the achieved GFLOP/s and MFU counted against
    forward x 3 read that much high, and compile_report's flops_ratio that much low."""
    from vit_jax import summary

    rows = summary.layer_table(config)
    return rows[0].flops / (3 * sum(row.flops for row in rows))


TIMM_MISSING = ("the timm comparison needs torch, torchvision and timm (pip install torch==2.14.1 "
                "torchvision==0.29.1 timm), or pass --no-timm")


def cores() -> int:
    """The cores this process may run on: its CPU affinity (a container or `taskset` may allow fewer than
    `os.cpu_count()`, the machine's), which is also what XLA's CPU client sizes its thread pool to."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def xla_threads() -> int | None:
    """The threads of XLA:CPU's intra-op pool (named `...XLAEigen`), counted in /proc/self/task once the CPU
    client exists; None where that cannot be read (not Linux) or no such thread is found."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    found = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                found += "XLAEigen" in f.read()
        except OSError:  # the thread ended meanwhile
            pass
    return found or None


def torch_threads() -> int:
    """Pin torch to one thread per core (XLA's CPU client uses every core too); the threads torch then reports."""
    from vit_jax.errors import UserError

    try:
        import torch
        import torchvision  # noqa: F401  (before tensorflow, which vit_jax.train pulls in: segfault otherwise)
    except ImportError as e:
        raise UserError(f"{TIMM_MISSING}: {e}") from None

    torch.set_num_threads(cores())
    return torch.get_num_threads()


_TIMM_SIZES = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}


def timm_name(config) -> str | None:
    """timm's name of the same plain ViT (`vit_base_patch16_224` for B/16; the resolution is passed apart as
    `img_size`, since timm registers most models at 224px only); None for hybrids and axial models."""
    m = config.model
    size = _TIMM_SIZES.get(m.variant.split("/")[0])
    if m.resnet_layers or size is None or m.axial:
        return None
    return f"vit_{size}_patch{m.patch_size}_224"


TIMM_GELU = "erf"  # timm's ViT: nn.GELU(), exact


def gelu_form(config) -> str:
    """Our MLP's GELU: "tanh" (the tanh approximation, config.model.gelu_approximate, the default) or "erf"."""
    return "tanh" if config.model.gelu_approximate else "erf"


def timm_vit(config, train: bool):
    """timm's counterpart of the config's ViT (random init, no download) with the same dropout and stochastic-depth
    rates (with train; timm ramps drop-path 0 -> drop_path_rate over the blocks as ours does 0 ->
    config.model.stochastic_depth).

    Not the same: timm's MLP uses exact erf GELU where ours defaults to the tanh approximation
    (`gelu_form`, config.model.gelu_approximate), and timm runs eager (no torch.compile). The JSON line of
    `compare` says both (ours_gelu, timm_gelu, timm_compiled)."""
    from vit_jax.errors import UserError

    try:
        import timm
    except ImportError as e:
        raise UserError(f"{TIMM_MISSING}: {e}") from None

    name = timm_name(config)
    if name is None or not timm.is_model(name):
        what = f"variant {config.model.variant!r}" if name is None else f"{name!r}"
        raise UserError(f"timm has no counterpart of {what} (patch {config.model.patch_size}); pass --no-timm")
    rate = config.model.dropout_rate if train else 0.0
    model = timm.create_model(name, pretrained=False, num_classes=config.num_classes, img_size=config.image_size,
                              global_pool="token" if config.model.classifier == "token" else "avg",
                              class_token=config.model.classifier == "token",
                              proj_drop_rate=rate, pos_drop_rate=rate,
                              attn_drop_rate=config.model.attention_dropout_rate if train else 0.0,
                              drop_path_rate=config.model.stochastic_depth if train else 0.0)
    return model.train(train)


def load_average() -> str:
    """`uptime`'s load averages: timings on a shared machine are only comparable at similar load."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def print_table(rows: list[tuple[str, str]], result: dict) -> None:
    """A two-column table, then the result as one JSON line (always the last line)."""
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result, sort_keys=True))


def summarise_rounds(rounds: list[dict], flops_per_run: float, batch: int) -> dict:
    """The figures the JSON line reports, from each round's timings; they agree with each other.

    A round is {"ours_s", "timm_s" (None without timm), "peak" (GFLOP/s; None with --peak_size=0)}, timed back to
    back. Reported: the median over rounds of ours_s, timm_s and the peak; the img/s and achieved GFLOP/s of those
    times; `ratio_vs_timm` = ours_img_s / timm_img_s and `mfu` = achieved_gflop_s / peak_gflop_s of those reported
    numbers. The spread of the per-round ratio and MFU (each pairs figures taken back to back) is `ratio_min`/`_max`
    and `mfu_min`/`_max`; `rounds` lists each round's figures.
    """
    def mid(values: list[float | None]) -> float | None:
        return None if None in values else median(values)

    def spread(values: list[float | None]) -> tuple[float | None, float | None]:
        return (None, None) if None in values else (min(values), max(values))

    per_round = []
    for r in rounds:
        ours_img_s = batch / r["ours_s"]
        timm_img_s = batch / r["timm_s"] if r["timm_s"] else None
        achieved = flops_per_run / r["ours_s"] / 1e9
        per_round.append({"ours_img_s": ours_img_s, "timm_img_s": timm_img_s,
                          "ratio_vs_timm": ours_img_s / timm_img_s if timm_img_s else None,
                          "achieved_gflop_s": achieved, "peak_gflop_s": r["peak"],
                          "mfu": achieved / r["peak"] if r["peak"] else None})
    ours_s, timm_s = median([r["ours_s"] for r in rounds]), mid([r["timm_s"] for r in rounds])
    peak = mid([r["peak"] for r in rounds])
    ours_img_s = batch / ours_s
    timm_img_s = batch / timm_s if timm_s else None
    achieved = flops_per_run / ours_s / 1e9
    ratio_min, ratio_max = spread([r["ratio_vs_timm"] for r in per_round])
    mfu_min, mfu_max = spread([r["mfu"] for r in per_round])
    return {
        "ours_s": ours_s, "timm_s": timm_s, "ours_img_s": ours_img_s, "timm_img_s": timm_img_s,
        "ratio_vs_timm": ours_img_s / timm_img_s if timm_img_s else None, "ratio_min": ratio_min,
        "ratio_max": ratio_max, "achieved_gflop_s": achieved, "peak_gflop_s": peak,
        "mfu": achieved / peak if peak else None, "mfu_min": mfu_min, "mfu_max": mfu_max, "rounds": per_round,
    }


def compare(benchmark: str, args: Any, config: Any, torch_threads: int | None,
            ours_runner: Callable[[Any], Callable[[], None]], timm_runner: Callable[[Any], Callable[[], None]],
            flops_per_run: float, unit: str, what: str, extra: dict | None = None) -> dict:
    """Time the matmul peak, ours, the peak again, then timm (same process, batch and threads), --rounds times
    over; print the table and JSON.

    `*_runner(config)` builds one side and returns a call that runs one `unit` (a "batch" or "step") to completion.
    `torch_threads`: torch's thread count (None without timm). This shared machine's speed drifts (the float32
    matmul peak 340-425 GFLOP/s over a day, 414 -> 361 within one run), so each round takes its figures under the
    same conditions: the peak right after ours, timm right after the peak. The summary (`summarise_rounds`) is the
    median over rounds of each time and of the peak, with the ratio and MFU computed from those, so the JSON line
    agrees with itself; the per-round ratio and MFU spread is reported beside them. A round's peak is the faster
    of the peaks measured just before and just after ours: one slow reading of the peak, from a neighbour's burst,
    would otherwise raise that round's MFU (a 389 GFLOP/s reading beside 429-431 gave one round 94.5%). The peak
    is `model_matmul_peak` in --dtype (bf16: accumulating in float32, the model's path). `what` labels our row
    and the FLOP count; `extra` adds fields to the JSON line.

    The ratio is only fair at equal threads: `threads_match` is XLA's intra-op thread count == torch's (None
    without timm or where XLA's threads cannot be counted), with a warning row in the table when they differ. The
    JSON also says what else differs from timm: ours_gelu / timm_gelu (tanh-approximate vs exact erf by default)
    and timm_compiled (false: eager).
    """
    if args.rounds < 1 or args.repeats < 1:
        from vit_jax.errors import UserError

        raise UserError(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}")
    load_before = load_average()
    run_ours = ours_runner(config)
    run_timm = timm_runner(config) if args.timm else None
    rounds = []
    for i in range(args.rounds):
        warmup = 2 if i == 0 else 1  # the first calls compile (XLA) / initialise lazily (torch)
        before = model_matmul_peak(args.dtype, args.peak_size, 5) if args.peak_size else None
        ours = median(time_runs(run_ours, args.repeats, warmup))
        peak = max(model_matmul_peak(args.dtype, args.peak_size, 5), before) if args.peak_size else None
        timm_seconds = median(time_runs(run_timm, args.repeats, warmup)) if run_timm else None
        rounds.append({"ours_s": ours, "timm_s": timm_seconds, "peak": peak})
    summary = summarise_rounds(rounds, flops_per_run, config.batch_size)
    ours, timm_seconds, achieved, peak = (summary["ours_s"], summary["timm_s"], summary["achieved_gflop_s"],
                                          summary["peak_gflop_s"])
    peak_kind = PEAK_KIND[args.dtype]
    xla = xla_threads()  # counted now that XLA's CPU client exists; torch_threads is None without timm
    result = {
        "benchmark": benchmark, "config": args.config, "variant": config.model.variant, "dtype": args.dtype,
        "batch": config.batch_size, "image_size": config.image_size, "repeats": args.repeats,
        "rounds_run": args.rounds, "cores": cores(), "xla_threads": xla, "timm_torch_threads": torch_threads,
        "threads_match": xla == torch_threads if xla is not None and torch_threads is not None else None,
        "ours_gelu": gelu_form(config), "timm_gelu": TIMM_GELU if args.timm else None,
        "timm_compiled": False if args.timm else None,  # eager torch, no torch.compile
        "ours_img_s": summary["ours_img_s"], f"ours_{unit}_s": ours,
        "timm_img_s": summary["timm_img_s"], f"timm_{unit}_s": timm_seconds,
        "ratio_vs_timm": summary["ratio_vs_timm"], "ratio_min": summary["ratio_min"],
        "ratio_max": summary["ratio_max"], "timm_model": timm_name(config) if args.timm else None,
        f"gflop_per_{unit}": flops_per_run / 1e9, "achieved_gflop_s": achieved,
        "peak_gflop_s": peak, "peak_kind": peak_kind if peak else None,
        "mfu": summary["mfu"], "mfu_min": summary["mfu_min"], "mfu_max": summary["mfu_max"],
        "rounds": summary["rounds"],
        "load_average": f"{load_before} -> {load_average()}",
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # huge pages for malloc: vit_jax.hugepages
        **(extra or {}),
    }
    threads = f"XLA {result['xla_threads'] or '?'} threads, torch {torch_threads or '-'} ({result['cores']} cores)"
    rows = [("config", f"{result['variant']} {config.image_size}px batch {config.batch_size} {args.dtype}"),
            ("threads", threads)]
    if result["threads_match"] is False:
        rows.append(("warning", f"XLA runs {xla} threads and torch {torch_threads}: ratio_vs_timm compares unequal "
                                "thread counts"))
    if args.rounds > 1:
        for i, r in enumerate(result["rounds"], 1):
            parts = [f"ours {r['ours_img_s']:.2f} img/s"]
            if r["timm_img_s"]:
                parts.append(f"timm {r['timm_img_s']:.2f} img/s, {r['ratio_vs_timm']:.2f}x")
            if r["peak_gflop_s"]:
                parts.append(f"MFU {r['mfu']:.1%} of {r['peak_gflop_s']:.0f}")
            rows.append((f"round {i}", ", ".join(parts)))
    label = f" (median of {args.rounds} rounds)" if args.rounds > 1 else ""
    rows.append((f"ours (jax {what[0]})", f"{result['ours_img_s']:.2f} img/s ({ours:.3f} s/{unit}){label}"))
    if timm_seconds:
        spread = (f" (rounds {result['ratio_min']:.2f}-{result['ratio_max']:.2f}x)" if args.rounds > 1 else "")
        rows += [(f"timm {result['timm_model']}", f"{result['timm_img_s']:.2f} img/s ({timm_seconds:.3f} s/{unit})"
                  + (" autocast bf16" if args.dtype == "bfloat16" else "") + label),
                 ("timm differs", f"{TIMM_GELU} GELU (ours {result['ours_gelu']}), eager (no torch.compile)"),
                 ("ratio ours/timm", f"{result['ratio_vs_timm']:.2f}x{spread}")]
    rows.append(("achieved", f"{achieved:.1f} GFLOP/s ({what[1]})"))
    if peak:
        spread = f" (rounds {result['mfu_min']:.1%}-{result['mfu_max']:.1%})" if args.rounds > 1 else ""
        rows.append((f"matmul peak {peak_kind}", f"{peak:.1f} GFLOP/s{label} -> MFU {result['mfu']:.1%}{spread}"))
    rows.append(("load average", result["load_average"]))
    rows.append(("GLIBC_TUNABLES", result["glibc_tunables"] or "(none)"))
    print_table(rows, result)
    return result


def run_main(main: Callable[[], Any]) -> None:
    """Run a benchmark's main: bad input (vit_jax's UserError) is one `error:` line and exit code 2.

    First restarts the process with huge pages for XLA's buffers where that helps, as `python -m vit_jax.main`
    does (`vit_jax.hugepages`), so the benchmarks time what a training run gets.
    """
    from vit_jax import hugepages
    from vit_jax.errors import UserError

    try:
        hugepages.restart_with_hugepages()  # UserError for a VIT_JAX_HUGEPAGES value it does not know
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
