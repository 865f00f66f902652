"""`python -m vit_jax.plan --config=configs/vit_h14.py --topology=v5e:16x16 [--config.x=y] [--json]`: will it fit?

Compiles the real training step (vit_jax.train's, with vit_jax.sharding's mesh and layouts) for a TPU slice
on a machine without a TPU (libtpu compiles for any topology: `pip install -e .[tpu]`), then prints per-chip
memory from the compiled executable (params, optimizer state, batch, activations/temporaries, total against
the chip's HBM), FLOPs per step from XLA's cost analysis, and an estimated step time and images/s from the
chip's peak bf16 FLOP/s at a stated MFU. When it does not fit it says by how much and which switches help.
It compiles under the PRNG set-up TPU runs use (`use_tpu_prng`: rbg, drawn per shard), which
launch/tpu_vm.sh gives vit_jax.main too. docs/plan_report.md has ViT-L/16 and ViT-H/14 on v4 and v5e pods.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from vit_jax import cli, config_check
from vit_jax.errors import UserError

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation: what a chip holds and computes, and how gcloud and libtpu name its slices."""

    generation: str
    hbm_bytes: int
    peak_bf16_flops: float  # per chip, dense bf16 matmuls
    cores_per_chip: int  # TensorCores; 2 = "megacore", one JAX device per chip (v4, v5p)
    torus_dims: int  # 3: topologies like 4x8x8 (v4, v5p); 2: like 16x16 (v5e, v6e)
    accelerator_prefix: str  # gcloud --accelerator-type is PREFIX-N, N = chips x cores_per_chip


# Peak bf16 FLOP/s: cloud.google.com/tpu/docs/<generation>. HBM: what libtpu 0.0.42's compiler says is available
# to a program ("exceeds available HBM (15.75G)"), a little under the nominal 32/16/95/32 GB per chip.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", int(30.75 * GiB), 275e12, 2, 3, "v4"),
    "v5e": Chip("v5e", int(15.75 * GiB), 197e12, 1, 2, "v5litepod"),
    "v5p": Chip("v5p", int(95.74 * GiB), 459e12, 2, 3, "v5p"),
    "v6e": Chip("v6e", int(31.25 * GiB), 918e12, 1, 2, "v6e"),
}
DEFAULT_MFU = 0.5  # model FLOPs utilisation; ViT training on TPU commonly reaches 0.4-0.6


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice such as "v5e:16x16" (256 chips) or "v4:4x8x8" (256 chips = v4-512)."""

    chip: Chip
    shape: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def num_hosts(self) -> int:
        """TPU VMs of the slice: 4 chips each, except the single-VM slices of up to 8 chips of the 2-D torus
        generations (v5e, v6e: v5litepod-8 is one VM)."""
        if self.chip.torus_dims == 2 and self.num_chips <= 8:
            return 1
        return max(1, self.num_chips // 4)

    @property
    def accelerator_type(self) -> str:
        return f"{self.chip.accelerator_prefix}-{self.num_chips * self.chip.cores_per_chip}"


def parse_topology(name: str) -> Topology:
    """"v5e:16x16" -> Topology; a bad name is a UserError listing the known generations and the shape syntax."""
    generation, _, shape_text = name.partition(":")
    examples = "v4:4x8x8 (v4-512), v5p:4x4x4 (v5p-128), v5e:16x16 (v5litepod-256), v6e:8x8 (v6e-64)"
    if generation not in CHIPS:
        raise UserError(f"--topology={name!r}: unknown TPU generation {generation!r}; known: {sorted(CHIPS)} "
                        f"(e.g. {examples})")
    chip = CHIPS[generation]
    try:
        shape = tuple(int(d) for d in shape_text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != chip.torus_dims or min(shape) < 1:
        form = "AxBxC" if chip.torus_dims == 3 else "AxB"
        raise UserError(f"--topology={name!r}: a {generation} slice is {generation}:{form} chips (e.g. {examples})")
    return Topology(chip, shape)


def topology_devices(topology: Topology) -> list[jax.Device]:
    """Compile-only devices of `topology` (one per chip), from libtpu; no TPU needed."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("compiling for a TPU topology needs libtpu, which is not installed: pip install -e .[tpu]")
    from jax.experimental import topologies

    # Without these libtpu asks the metadata server of a TPU VM that is not there, and logs errors about it.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
    # Compiling needs no chip: let several processes (parallel plans, tests) load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Hosts hold 2x2 chips; an axis of 16 chips (v5e/v6e) or whole 4-chip cubes (v4/v5p) close into a torus.
    if topology.chip.torus_dims == 3:
        wrap = (all(d % 4 == 0 for d in topology.shape),) * 3
    else:
        wrap = tuple(d == 16 for d in topology.shape) + (False,)
    desc = topologies.get_topology_desc(
        topology_name=topology.name, platform="tpu",
        chip_config_name="megacore" if topology.chip.cores_per_chip == 2 else "default",
        chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=wrap)
    devices = list(desc.devices)
    if len(devices) != topology.num_chips:
        raise AssertionError(f"libtpu gave {len(devices)} devices for {topology.name}, expected one per chip")
    return devices


@dataclasses.dataclass
class Memory:
    """Per-chip bytes of one compiled training step."""

    params: int  # the parameters' shards on one chip
    opt_state: int  # the optimizer state's shards (with the Polyak average of the params, if the run keeps one)
    batch: int  # the step's input images and labels
    other_inputs: int  # step counter, rng, ...
    temporaries: int  # activations kept for the backward pass, gradients, workspaces
    outputs: int  # outputs not written in place of a donated input (metrics, ...)
    code: int  # the compiled program

    @property
    def total(self) -> int:
        return (self.params + self.opt_state + self.batch + self.other_inputs + self.temporaries + self.outputs
                + self.code)


def per_device_bytes(tree, shardings) -> int:
    """Bytes of one device's shards of `tree` (ShapeDtypeStructs or arrays) laid out by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard_shape = sharding.shard_shape(tuple(leaf.shape))
        total += int(np.prod(shard_shape)) * np.dtype(leaf.dtype).itemsize
    return total


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:,.2f} GiB"


def _fmt_flops(n: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} FLOP"


def _batch_devices(mesh_shape: dict[str, int]) -> int:
    return mesh_shape["data"] * mesh_shape["fsdp"]


_NOT_ENOUGH = " (not enough alone: combine with another switch)"


def suggestions(config: ml_collections.ConfigDict, mesh_shape: dict[str, int], memory: Memory,
                hbm_bytes: int) -> list[str]:
    """Switches that shrink what overflows, each with its estimated effect (re-run plan with it to confirm)."""
    over = memory.total - hbm_bytes
    found = []
    state = memory.params + memory.opt_state
    batch_devices = _batch_devices(mesh_shape)
    # FSDP splits params and optimizer state over the fsdp axis (taken from data parallelism), along hidden_size:
    # a size that does not divide it is refused by the config check.
    candidates = [f for f in range(mesh_shape["fsdp"] + 1, batch_devices + 1)
                  if batch_devices % f == 0 and f % mesh_shape["fsdp"] == 0 and config.model.hidden_size % f == 0]
    if candidates:
        saving = {f: state * (1 - mesh_shape["fsdp"] / f) for f in candidates}
        fsdp = next((f for f in candidates if saving[f] >= over), candidates[-1])
        found.append(f"--config.mesh.fsdp={fsdp} --config.mesh.data=-1: params + optimizer state "
                     f"{_fmt_bytes(state)} -> {_fmt_bytes(state - saving[fsdp])} per chip"
                     + ("" if saving[fsdp] >= over else _NOT_ENOUGH))
    # Of the temporaries, the gradients (one params-sized buffer) stay whatever the micro-batch; accumulating
    # micro-batches adds a second one (their sum). The rest are activations, which remat and micro-batches shrink.
    gradients = memory.params * (2 if config.accum_steps > 1 else 1)
    activations = max(memory.temporaries - gradients, 0)
    if not config.model.remat:
        found.append(f"--config.model.remat=True: recompute each block in the backward pass instead of keeping "
                     f"its activations (most of the {_fmt_bytes(activations)} of temporaries besides the "
                     "gradients; ~1/3 more FLOPs)" + ("" if activations >= over else _NOT_ENOUGH))
    micro_batch = config.batch_size // config.accum_steps
    for factor in (2, 4, 8, 16, 32, 64):
        accum = config.accum_steps * factor
        if config.batch_size % accum or (config.batch_size // accum) % batch_devices:
            continue
        last = factor == 64 or (config.batch_size // (2 * accum)) % batch_devices or config.batch_size % (2 * accum)
        temporaries = 2 * memory.params + activations / factor
        enough = memory.temporaries - temporaries >= over
        if enough or last:
            found.append(f"--config.accum_steps={accum}: micro-batches of {config.batch_size // accum} instead of "
                         f"{micro_batch}; activations shrink with them (the gradients and their sum do not), "
                         f"temporaries ~{_fmt_bytes(temporaries)}" + ("" if enough else _NOT_ENOUGH))
            break
    if config.model.dtype == "float32":
        found.append("--config.model.dtype=bfloat16: activations in bfloat16 (about half), and the MXU's native "
                     "precision")
    return found


def _batch_line(config: ml_collections.ConfigDict, topology: Topology, result: dict) -> str:
    """How the global batch splits: over the data x fsdp batch shards, each shared by the `model` axis' chips."""
    mesh = result["mesh"]
    shards = _batch_devices(mesh)
    shared = f", each shared by {mesh['model']} chips (model axis)" if mesh.get("model", 1) > 1 else ""
    return (f"global batch {config.batch_size} = {result['per_chip_micro_batch']} per batch shard x {shards} shards"
            f"{shared} x accum_steps {config.accum_steps}; mesh " + " ".join(f"{k}={v}" for k, v in mesh.items()))


def report(config: ml_collections.ConfigDict, topology: Topology, result: dict) -> str:
    """The plan as a human-readable table."""
    from vit_jax import optim  # optax: only once a plan is reported

    chip = topology.chip
    memory = result["memory"]
    m = config.model
    lines = [
        f"ViT {m.variant} at {config.image_size}px, {config.num_classes} classes, dtype {m.dtype}, "
        f"remat {m.remat}, scan {m.scan}, PRNG {jax.config.jax_default_prng_impl}",
        _batch_line(config, topology, result),
        f"topology {topology.name} ({topology.accelerator_type}): {topology.num_chips} x TPU {chip.generation}, "
        f"{_fmt_bytes(chip.hbm_bytes)} HBM and {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 peak per chip",
        (f"compiled the training step in {result['compile_seconds']:.1f} s" if result["compiled"] is not None else
         "libtpu refused to compile the step for lack of HBM; temporaries below are what it asked for"),
        "",
        "per-chip memory (compiled)",
    ]
    optimizer = "optimizer state + average" if optim.uses_ema(config) else "optimizer state"
    rows = [("params", memory.params), (optimizer, memory.opt_state), ("batch", memory.batch),
            ("other inputs", memory.other_inputs), ("activations/temporaries", memory.temporaries),
            ("other outputs", memory.outputs), ("compiled code", memory.code)]
    lines += [f"  {name:<26}{_fmt_bytes(size):>14}" for name, size in rows]
    lines.append(f"  {'total':<26}{_fmt_bytes(memory.total):>14}  of {_fmt_bytes(chip.hbm_bytes)} HBM "
                 f"({memory.total / chip.hbm_bytes:.0%})")
    lines += [
        "",
        f"FLOPs per step      {_fmt_flops(result['flops_per_step'])} (XLA cost analysis of the step; "
        f"{_fmt_flops(result['model_flops_per_step'])} model FLOPs = 3 x forward x batch)",
        f"est. step time      {result['est_step_seconds']:.3f} s at {result['mfu']:.0%} MFU "
        f"-> {result['images_per_second']:,.0f} images/s",
        "",
    ]
    if result["fits"]:
        lines.append(f"fits: {_fmt_bytes(chip.hbm_bytes - memory.total)} to spare per chip")
    else:
        over = memory.total - chip.hbm_bytes
        lines.append(f"does NOT fit: {_fmt_bytes(over)} ({over / chip.hbm_bytes:.0%} of HBM) over per chip. "
                     "What helps (estimates; re-run plan with the switch to confirm):")
        lines += [f"  {s}" for s in result["suggestions"]]
    return "\n".join(lines)


def _field(state, name: str):
    return state[name] if isinstance(state, dict) else getattr(state, name)


def _optimizer_part(state):
    """The optimizer state, with the Polyak average of the params where the run keeps one (what the optimizer
    adds to the params)."""
    opt_state = _field(state, "opt_state")
    return {"opt_state": opt_state, "ema": state["ema"]} if isinstance(state, dict) and "ema" in state else opt_state


def _out_of_hbm_temporaries(error: Exception) -> int | None:
    """The temporaries' bytes from libtpu's refusal of a step for lack of HBM, in either of its wordings:
    "... total memory required for HLO temporaries (23.63G) exceeds available HBM ..." (the temporaries alone do
    not fit) or "... Exceeded hbm capacity by ... Program hbm requirement ...: HLO temp 20.46G (...)" (arguments
    and temporaries together do not)."""
    text = str(error)
    match = (re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", text)
             or re.search(r"HLO temp\s+([\d.]+)([KMGT])\b", text))
    if "RESOURCE_EXHAUSTED" not in text or not match:
        return None
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1))


def _out_of_hbm(error: Exception) -> bool:
    """Whether a compile error is libtpu's refusal of the step for lack of HBM."""
    return "RESOURCE_EXHAUSTED" in str(error) and "memory space hbm" in str(error)


def step_flops(config: ml_collections.ConfigDict) -> float:
    """XLA's FLOP count of one whole training step (all chips), from the step lowered for one CPU device.

    `train.step_flops` (blocks unrolled, one micro-batch times `accum_steps`; nothing is compiled) on a
    one-device mesh, since the count does not depend on how the step is split.
    """
    from vit_jax import sharding, train

    flat = copy.deepcopy(config)
    with flat.unlocked():
        flat.mesh.data, flat.mesh.fsdp, flat.mesh.model = 1, 1, 1
    return train.step_flops(flat, sharding.make_mesh(flat, devices=jax.devices("cpu")[:1]), None)


def model_flops_per_step(config: ml_collections.ConfigDict) -> float:
    """Model FLOPs of a step: forward + backward = 3 x the analytic forward FLOPs x global batch (no recompute)."""
    from vit_jax import summary

    return 3.0 * sum(row.flops for row in summary.layer_table(config)) * config.batch_size


def plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], hbm_bytes: int | None = None) -> dict:
    """Compile the real training step of `config` for `devices` and measure per-chip memory.

    `devices` are a TPU topology's compile-only devices or local ones (CPU in tests). Returns the Memory, whether
    it fits in `hbm_bytes`, the mesh and the compile time. A step that libtpu refuses for lack of HBM still
    reports its inputs and the temporaries the compiler asked for.
    """
    from vit_jax import sharding, train

    mesh_shape = config_check.validate(config, len(devices), process_count=1)  # the processes: checked by the caller
    mesh = sharding.make_mesh(config, devices=devices)
    state = train.abstract_state(config, mesh)
    batch = train.abstract_batch(config, mesh)
    step = train.make_train_step(config, mesh)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    params = _field(state, "params")
    opt_state = _optimizer_part(state)
    param_bytes = per_device_bytes(params, jax.tree.map(lambda x: x.sharding, params))
    opt_bytes = per_device_bytes(opt_state, jax.tree.map(lambda x: x.sharding, opt_state))
    batch_bytes = per_device_bytes(batch, jax.tree.map(lambda x: x.sharding, batch))
    state_bytes = per_device_bytes(state, jax.tree.map(lambda x: x.sharding, state))
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        temporaries = _out_of_hbm_temporaries(e)
        if temporaries is None and _out_of_hbm(e):
            raise UserError(f"the step does not fit in HBM, and libtpu's message gives no size of its temporaries "
                            f"to report: {str(e).strip().splitlines()[0]}") from e
        if temporaries is None:
            raise
        memory = Memory(param_bytes, opt_bytes, batch_bytes, state_bytes - param_bytes - opt_bytes, temporaries, 0, 0)
        return {"memory": memory, "fits": False, "mesh": mesh_shape, "compiled": None,
                "compile_seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    # The compiled executable's own input layouts: what each chip really holds of params and optimizer state.
    (state_shardings, batch_shardings), _ = compiled.input_shardings
    param_bytes = per_device_bytes(params, _field(state_shardings, "params"))
    opt_bytes = per_device_bytes(opt_state, _optimizer_part(state_shardings))
    batch_bytes = per_device_bytes(batch, batch_shardings)
    other_inputs = stats.argument_size_in_bytes - param_bytes - opt_bytes - batch_bytes
    memory = Memory(param_bytes, opt_bytes, batch_bytes, other_inputs, stats.temp_size_in_bytes,
                    stats.output_size_in_bytes - stats.alias_size_in_bytes, stats.generated_code_size_in_bytes)
    fits = hbm_bytes is None or memory.total <= hbm_bytes
    return {"memory": memory, "fits": fits, "mesh": mesh_shape, "compiled": compiled, "compile_seconds": seconds}


def plan_for_topology(config: ml_collections.ConfigDict, topology: Topology, mfu: float = DEFAULT_MFU) -> dict:
    """`plan` on a TPU topology plus FLOPs, estimated step time and images/s, and suggestions when it won't fit."""
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu={mfu} is invalid: expected a fraction of peak in (0, 1], e.g. 0.5")
    # A config that cannot work says so, with or without libtpu (one process per TPU VM: what the rows of each
    # process's batch depend on).
    config_check.validate(config, topology.num_chips, process_count=topology.num_hosts)
    result = plan(config, topology_devices(topology), topology.chip.hbm_bytes)
    mesh_shape = result["mesh"]
    result["per_chip_micro_batch"] = config.batch_size // config.accum_steps // _batch_devices(mesh_shape)
    result["flops_per_step"] = step_flops(config)
    result["model_flops_per_step"] = model_flops_per_step(config)
    result["mfu"] = mfu
    cluster_flops = topology.num_chips * topology.chip.peak_bf16_flops * mfu
    result["est_step_seconds"] = result["model_flops_per_step"] / cluster_flops
    result["images_per_second"] = config.batch_size / result["est_step_seconds"]
    result["suggestions"] = ([] if result["fits"] else
                             suggestions(config, mesh_shape, result["memory"], topology.chip.hbm_bytes))
    return result


def settings(config: ml_collections.ConfigDict) -> dict:
    """The switches that decide whether a step fits, as they were planned."""
    return {"variant": config.model.variant, "image_size": config.image_size, "batch_size": config.batch_size,
            "accum_steps": config.accum_steps, "dtype": config.model.dtype, "remat": bool(config.model.remat),
            "scan": bool(config.model.scan), "optimizer": config.optimizer.name,
            "ema_decay": config.optimizer.ema_decay, "freeze": config.optimizer.freeze,
            "layer_decay": config.optimizer.layer_decay,
            "prng_impl": str(jax.config.jax_default_prng_impl)}


def to_json(topology: Topology, result: dict, config: ml_collections.ConfigDict | None = None) -> dict:
    """The plan as one flat JSON-serialisable dict (with the planned `settings` when `config` is given)."""
    memory = result["memory"]
    return {
        **({"settings": settings(config)} if config is not None else {}),
        "topology": topology.name, "accelerator_type": topology.accelerator_type, "num_chips": topology.num_chips,
        "fits": bool(result["fits"]), "bytes_per_chip": memory.total, "hbm_bytes_per_chip": topology.chip.hbm_bytes,
        "params_bytes_per_chip": memory.params, "opt_state_bytes_per_chip": memory.opt_state,
        "batch_bytes_per_chip": memory.batch, "temp_bytes_per_chip": memory.temporaries,
        "flops_per_step": result["flops_per_step"], "model_flops_per_step": result["model_flops_per_step"],
        "peak_flops_per_chip": topology.chip.peak_bf16_flops, "mfu": result["mfu"],
        "est_step_seconds": result["est_step_seconds"], "images_per_second": result["images_per_second"],
        "mesh": result["mesh"], "compile_seconds": result["compile_seconds"], "suggestions": result["suggestions"],
    }


RBG_PARTITIONED_FLAG = "--xla_tpu_spmd_rng_bit_generator_unsafe=true"


def tpu_host() -> bool:
    """Whether this process will run on TPU chips: libtpu is installed, JAX_PLATFORMS allows TPUs, and the host
    has TPU device files (/dev/accel* on v2-v4, /dev/vfio/* on v5e and later). Needs no backend, so it can decide
    `use_tpu_prng` before libtpu loads (`vit_jax.main` does)."""
    import glob

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "tpu" not in platforms.split(","):
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def use_tpu_prng() -> None:
    """The PRNG set-up TPU jobs run with (launch/tpu_vm.sh exports the same variables to vit_jax.main).

    rbg: threefry's dropout masks make the TPU compile ~7x slower (and the step slower). But XLA replicates an
    rbg RngBitGenerator over the mesh unless told otherwise: every chip would draw the *global* batch's dropout
    bits (gigabytes per layer at batch 4096), so libtpu is told to let each chip draw only its own shard's bits
    (the masks then depend on the mesh layout, not their distribution). JAX_DEFAULT_PRNG_IMPL and
    LIBTPU_INIT_ARGS, when set, take precedence. Call before libtpu is first loaded.
    """
    if "JAX_DEFAULT_PRNG_IMPL" not in os.environ:
        jax.config.update("jax_default_prng_impl", "rbg")
    if "rbg" in str(jax.config.jax_default_prng_impl):
        args = os.environ.get("LIBTPU_INIT_ARGS", "")
        if "xla_tpu_spmd_rng_bit_generator_unsafe" not in args:
            os.environ["LIBTPU_INIT_ARGS"] = f"{args} {RBG_PARTITIONED_FLAG}".strip()


def _define_flags() -> None:
    """Flags of the command; defined only when run as a program, so importing plan beside summary works."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/vit_h14.py.", lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice to compile for: v4:4x8x8, v5e:16x16, v5p:4x4x4, v6e:8x8")
    flags.DEFINE_float("mfu", DEFAULT_MFU, "Model FLOPs utilisation assumed for the step-time estimate.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
    flags.mark_flags_as_required(["config", "topology"])


def main(argv: Sequence[str]) -> None:
    cli.no_positional_arguments(argv)
    # This process only compiles: keep JAX's own backend on the CPU, even where libtpu or a TPU is present.
    jax.config.update("jax_platforms", "cpu")
    use_tpu_prng()
    topology = parse_topology(flags.FLAGS.topology)
    config = flags.FLAGS.config
    result = plan_for_topology(config, topology, flags.FLAGS.mfu)
    print(json.dumps(to_json(topology, result, config)) if flags.FLAGS.json else report(config, topology, result))


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
