"""`vit_jax.plan`: topologies, the real step compiled for a TPU slice without a TPU, FSDP memory, CLI errors."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import common
from vit_jax import plan
from vit_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The commands' environment without the huge-page re-exec (vit_jax.hugepages, tested in test_hugepages.py): 0.6-1.5 s
# per command.
COMMAND_ENV = {**os.environ, "VIT_JAX_HUGEPAGES": "0"}
needs_libtpu = pytest.mark.skipif(__import__("importlib").util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")


@pytest.mark.parametrize("name, chips, accelerator_type", [
    ("v4:4x8x8", 256, "v4-512"), ("v4:8x8x8", 512, "v4-1024"), ("v5e:16x16", 256, "v5litepod-256"),
    ("v5p:4x4x4", 64, "v5p-128"), ("v6e:2x2", 4, "v6e-4")])
def test_topology_names_chips_and_gcloud_accelerator_type(name, chips, accelerator_type):
    topology = plan.parse_topology(name)
    assert (topology.name, topology.num_chips, topology.accelerator_type) == (name, chips, accelerator_type)


@pytest.mark.parametrize("name, message", [
    ("v3:4x4", "unknown TPU generation 'v3'"), ("v5e:16", "a v5e slice is v5e:AxB"),
    ("v4:4x8", "a v4 slice is v4:AxBxC"), ("v6e:axb", "a v6e slice is v6e:AxB"), ("v5e:0x4", "v5e:AxB")])
def test_bad_topology_is_a_user_error(name, message):
    with pytest.raises(UserError, match=message):
        plan.parse_topology(name)


@pytest.mark.parametrize("mesh, line", [
    ({"data": 256, "fsdp": 1, "model": 1}, "global batch 4096 = 8 per batch shard x 256 shards x accum_steps 2; "
                                           "mesh data=256 fsdp=1 model=1"),
    ({"data": 16, "fsdp": 4, "model": 4}, "global batch 4096 = 32 per batch shard x 64 shards, each shared by 4 "
                                          "chips (model axis) x accum_steps 2; mesh data=16 fsdp=4 model=4"),
])
def test_the_batch_line_multiplies_out_to_the_global_batch(mesh, line):
    config = common.get_config("B/16")
    config.batch_size, config.accum_steps = 4096, 2
    result = {"mesh": mesh, "per_chip_micro_batch": 4096 // 2 // (mesh["data"] * mesh["fsdp"])}
    assert plan._batch_line(config, plan.parse_topology("v5e:16x16"), result) == line


@needs_libtpu
def test_topology_devices_are_one_per_chip_megacore_included():
    for name in ("v4:2x2x1", "v5e:2x4"):
        devices = plan.topology_devices(plan.parse_topology(name))
        assert len(devices) == plan.parse_topology(name).num_chips
        assert len({tuple(d.coords) for d in devices}) == len(devices)


@needs_libtpu
def test_out_of_hbm_error_of_libtpu_is_read():
    devices = plan.topology_devices(plan.parse_topology("v5e:2x2"))
    sharding = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec("d"))

    def outer_square(x):  # a 200k x 200k float32 temporary, far more than 16 GiB per chip
        y = jnp.sin(jnp.outer(x, x))
        return (y @ y.T).sum(axis=1)

    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.jit(outer_square, in_shardings=sharding, out_shardings=sharding).lower(
            jax.ShapeDtypeStruct((200_000,), jnp.float32)).compile()
    assert f"available HBM ({plan.CHIPS['v5e'].hbm_bytes / plan.GiB:.2f}G)" in str(info.value)
    asked = str(info.value).split("HLO temporaries (")[1].split("G)")[0]
    assert plan._out_of_hbm_temporaries(info.value) == int(float(asked) * plan.GiB)
    assert plan._out_of_hbm_temporaries(info.value) > 200_000**2 * 4 / 4  # at least each chip's share of y
    assert plan._out_of_hbm_temporaries(RuntimeError("INTERNAL: something else")) is None


def test_suggestions_name_switches_that_cover_the_overflow():
    config = common.get_config("H/14")
    config.model.dtype = "float32"
    mesh_shape = {"data": 256, "fsdp": 1, "model": 1}
    gib = plan.GiB
    memory = plan.Memory(params=3 * gib, opt_state=6 * gib, batch=0, other_inputs=0, temporaries=12 * gib,
                         outputs=0, code=0)
    found = plan.suggestions(config, mesh_shape, memory, hbm_bytes=16 * gib)  # 5 GiB over
    # fsdp=2 would save 4.5 of the 9 GiB of state, short of 5; fsdp=4 saves 6.75.
    assert found[0] == ("--config.mesh.fsdp=4 --config.mesh.data=-1: params + optimizer state 9.00 GiB -> "
                        "2.25 GiB per chip")
    assert any(s.startswith("--config.model.remat=True") for s in found)
    # Micro-batches shrink the 9 GiB of activations but not the 3 GiB of gradients, and add their 3 GiB sum:
    # 16 leave 6 + 9/16 = 6.56 GiB of the 12 (8 would leave 7.13: 4.88 saved, short of 5).
    assert any(s.startswith("--config.accum_steps=16:") and "~6.56 GiB" in s for s in found)
    assert any(s.startswith("--config.model.dtype=bfloat16") for s in found)
    assert not any("not enough alone" in s for s in found)


def test_suggestions_say_when_a_switch_is_not_enough_alone():
    config = common.get_config("L/16")
    gib = plan.GiB
    memory = plan.Memory(params=1 * gib, opt_state=2 * gib, batch=0, other_inputs=0, temporaries=40 * gib,
                         outputs=0, code=0)
    found = plan.suggestions(config, {"data": 256, "fsdp": 1, "model": 1}, memory, hbm_bytes=16 * gib)  # 27 over
    # All 3 GiB of state saved by fsdp=256 is short of 27 GiB; 4 micro-batches keep 2 + 39/4 = 11.75 of the 40 GiB
    # of temporaries, which is enough (2 would keep 21.5).
    assert found[0].startswith("--config.mesh.fsdp=256 ") and found[0].endswith("not enough alone: combine with "
                                                                                 "another switch)")
    accum = next(s for s in found if s.startswith("--config.accum_steps="))
    assert accum.startswith("--config.accum_steps=4:") and "not enough" not in accum
    # H/14's hidden_size 1280 is no multiple of 512: the largest FSDP it can take on 512 chips is 256 (fsdp=512
    # was suggested, and the config check refused it).
    huge = plan.suggestions(common.get_config("H/14"), {"data": 512, "fsdp": 1, "model": 1}, memory,
                            hbm_bytes=16 * gib)
    assert huge[0].startswith("--config.mesh.fsdp=256 --config.mesh.data=-1: ") and "not enough alone" in huge[0]
    # 400 GiB: even 16 micro-batches of 256 (1 image per chip, the smallest) leave 25 GiB: said so.
    tight = plan.suggestions(config, {"data": 256, "fsdp": 1, "model": 1},
                             dataclasses.replace(memory, temporaries=400 * gib), hbm_bytes=16 * gib)
    accum = next(s for s in tight if s.startswith("--config.accum_steps="))
    assert accum.startswith("--config.accum_steps=16: micro-batches of 256 ") and "not enough alone" in accum
    # State-bound: of 7 GiB of temporaries 6 are the gradients, so remat (1 GiB of activations) cannot cover 9.
    state_bound = plan.suggestions(config, {"data": 256, "fsdp": 1, "model": 1},
                                   dataclasses.replace(memory, params=6 * gib, opt_state=12 * gib,
                                                       temporaries=7 * gib), hbm_bytes=16 * gib)
    remat = next(s for s in state_bound if s.startswith("--config.model.remat=True"))
    assert "1.00 GiB" in remat and remat.endswith("not enough alone: combine with another switch)")


def test_cli_without_libtpu_is_one_line_and_exit_2():
    hide_libtpu = ("import sys, runpy; sys.modules['libtpu'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_module('vit_jax.plan', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_libtpu, "plan", "--config=configs/vit_b16.py",
                             "--topology=v5e:2x2"], cwd=ROOT, env=COMMAND_ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: compiling for a TPU topology needs libtpu, which is not installed: pip install -e .[tpu]")


def test_a_config_the_slice_cannot_run_is_reported_even_without_libtpu():
    hide_libtpu = ("import sys, runpy; sys.modules['libtpu'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_module('vit_jax.plan', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_libtpu, "plan", "--config=configs/vit_b16.py",
                             "--config.batch_size=100", "--topology=v5e:16x16"], cwd=ROOT, env=COMMAND_ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.batch_size=100 is invalid") and "256 data x fsdp devices" in last, last


def test_cli_bad_topology_exit_2():
    result = subprocess.run([sys.executable, "-m", "vit_jax.plan", "--config=configs/vit_b16.py",
                             "--topology=tpu9:4x4"], cwd=ROOT, env=COMMAND_ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert "unknown TPU generation 'tpu9'" in result.stderr


# The tests below compile vit_jax.train's real step (issue 5); they run once it exists.

@needs_libtpu
def test_b16_on_v5e_2x2_reports_memory_and_flops_matching_summary():
    pytest.importorskip("vit_jax.train")
    batch = 16
    result = subprocess.run(
        [sys.executable, "-m", "vit_jax.plan", "--config=configs/vit_b16.py", "--topology=v5e:2x2", "--json",
         f"--config.batch_size={batch}", "--config.model.scan=True", "--config.num_classes=1000"],
        cwd=ROOT, env=COMMAND_ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fits"] is True and report["num_chips"] == 4
    assert report["settings"] == {"variant": "B/16", "image_size": 224, "batch_size": batch, "accum_steps": 1,
                                  "dtype": "float32", "remat": False, "scan": True, "optimizer": "adam",
                                  "ema_decay": 0.0, "freeze": "", "layer_decay": 1.0, "prng_impl": "rbg"}
    assert report["hbm_bytes_per_chip"] == plan.CHIPS["v5e"].hbm_bytes
    # 86.6M float32 params sharded over at most 4 chips, Adam's two moments alike.
    assert 86.5e6 * 4 / 4 <= report["params_bytes_per_chip"] <= 86.6e6 * 4 * 1.01
    assert report["opt_state_bytes_per_chip"] >= 2 * report["params_bytes_per_chip"] * 0.99
    assert report["params_bytes_per_chip"] + report["opt_state_bytes_per_chip"] < report["bytes_per_chip"]
    assert report["bytes_per_chip"] < report["hbm_bytes_per_chip"]
    from vit_jax import summary

    config = common.get_config("B/16")
    config.num_classes = 1000
    expected = summary.summarize(config)["gflops_per_image"] * 1e9 * 3 * batch
    assert report["flops_per_step"] == pytest.approx(expected, rel=0.10)
    assert report["est_step_seconds"] == pytest.approx(expected / (4 * 197e12 * plan.DEFAULT_MFU), rel=1e-6)


# H/14 takes the same scanned-FSDP path to the same bound as L/16 (both widths divide by 8): `make test-slow`.
@pytest.mark.parametrize("variant, image_size", [("L/16", 32), pytest.param("H/14", 28, marks=pytest.mark.slow)])
def test_fsdp_splits_params_and_optimizer_state_over_8_devices(variant, image_size):
    pytest.importorskip("vit_jax.train")
    assert jax.device_count() == 8
    per_device = {}
    for fsdp in (1, 8):
        config = common.get_config(variant)
        config.image_size, config.batch_size, config.eval_batch_size = image_size, 8, 8
        config.model.scan = True  # one compiled block: the same parameters, a fast compile
        config.mesh.data, config.mesh.fsdp, config.mesh.model = -1, fsdp, 1
        result = plan.plan(config, jax.devices())
        memory = result["memory"]
        stats = result["compiled"].memory_analysis()
        # What the compiled executable takes as input is state + batch (+ a few scalars): the state is in there.
        assert memory.params + memory.opt_state + memory.batch <= stats.argument_size_in_bytes
        per_device[fsdp] = memory.params + memory.opt_state, stats.argument_size_in_bytes
    # Both as plan counts them (the executable's input shardings) and as XLA's memory analysis does (the step's
    # arguments per device: state + a tiny batch), 8-way FSDP leaves at most 1/6 per device (1/8 + replicated
    # leftovers such as the class token and norms' scales).
    assert per_device[8][0] <= per_device[1][0] / 6
    assert per_device[8][1] <= per_device[1][1] / 6


def _run_command_env(tmp_path, env) -> dict[str, str]:
    """The variables launch/tpu_vm.sh exports before `python -m vit_jax.main` on the workers (dry run)."""
    result = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "--dry-run", "--name", "x", "--zone", "z",
                             "--accelerator-type", "v5litepod-16", "--config", "configs/vit_b16.py", "--workdir",
                             "gs://b/x"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    remote = next(line for line in result.stdout.splitlines() if "vit_jax.main" in line)
    exports = remote.split("export ")[1].split(" && ")[0]
    return dict(word.split("=", 1) for word in exports.split())


def _plan_prng_env(env) -> dict[str, str]:
    """What vit_jax.plan sets up before compiling, in a fresh process."""
    code = ("import json, os, jax; from vit_jax import plan; plan.use_tpu_prng(); print(json.dumps("
            "{'JAX_DEFAULT_PRNG_IMPL': str(jax.config.jax_default_prng_impl), "
            "'LIBTPU_INIT_ARGS': os.environ.get('LIBTPU_INIT_ARGS')}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return {k: v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items() if v is not None}


@pytest.mark.parametrize("chosen", [None, "threefry2x32"])
def test_launched_runs_use_the_prng_setup_plan_compiles_with(tmp_path, chosen):
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_DEFAULT_PRNG_IMPL", "LIBTPU_INIT_ARGS")}
    if chosen:
        env["JAX_DEFAULT_PRNG_IMPL"] = chosen
    launched = _run_command_env(tmp_path, env)
    assert launched == _plan_prng_env(env)
    if chosen is None:  # rbg, with each chip drawing only its own shard's bits
        assert launched == {"JAX_DEFAULT_PRNG_IMPL": "rbg", "LIBTPU_INIT_ARGS": plan.RBG_PARTITIONED_FLAG}
    else:
        assert launched == {"JAX_DEFAULT_PRNG_IMPL": "threefry2x32"}


_RBG_PROBE = """
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from vit_jax import plan
jax.config.update("jax_platforms", "cpu")
if sys.argv[1] == "plan":
    plan.use_tpu_prng()
else:
    jax.config.update("jax_default_prng_impl", "rbg")
devices = plan.topology_devices(plan.parse_topology("v5e:2x2"))
rows = NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec("d"))

def dropout(key, x):  # what nn.Dropout does: random bits of the activations' (global) shape, then a mask
    return jnp.where(jax.random.bits(key, x.shape) > jnp.uint32(2**31), x, 0.0)

key = jax.ShapeDtypeStruct(jax.random.key_data(jax.random.key(0)).shape, jnp.uint32)
x = jax.ShapeDtypeStruct((4096, 4096), jnp.float32, sharding=rows)
compiled = jax.jit(lambda k, x: dropout(jax.random.wrap_key_data(k), x), out_shardings=rows).lower(key, x).compile()
# The shapes each chip's compiled program draws random bits of.
print(json.dumps(re.findall(r"= u32\\[([\\d,]+)\\]\\S* rng-bit-generator\\(", compiled.as_text())))
"""


@needs_libtpu
def test_rbg_dropout_bits_are_drawn_per_shard_under_plans_prng_setup():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_DEFAULT_PRNG_IMPL", "LIBTPU_INIT_ARGS")}
    drawn = {}
    for setup in ("plain", "plan"):
        result = subprocess.run([sys.executable, "-c", _RBG_PROBE, setup], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        drawn[setup] = json.loads(result.stdout.strip().splitlines()[-1])
    # Plain rbg: XLA replicates the generator, so each of the 4 chips draws the whole (4096, 4096) array and
    # keeps its rows; under plan's set-up (the libtpu flag) each chip draws only its own 1024 rows.
    assert drawn == {"plain": ["4096,4096"], "plan": ["1024,4096"]}


@pytest.mark.parametrize("platforms", ["cpu", "cpu,gpu"])
def test_tpu_host_is_false_when_jax_platforms_excludes_tpu(monkeypatch, platforms):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert plan.tpu_host() is False


def test_tpu_host_needs_libtpu_and_tpu_device_files(monkeypatch):
    import glob
    import importlib.util

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    has_libtpu = importlib.util.find_spec("libtpu") is not None
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    assert plan.tpu_host() is (has_libtpu and has_chips)
    monkeypatch.setattr(glob, "glob", lambda pattern: [pattern])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "libtpu" else None)
    assert plan.tpu_host() is True  # libtpu found and a device file present


@pytest.mark.parametrize("libtpu, device_files, expected", [
    (True, [], False),  # libtpu installed on a host without TPU chips (a CPU host that plans)
    (False, ["/dev/accel0"], False),  # TPU chips but no libtpu: jax cannot use them
    (True, ["/dev/vfio/vfio"], False),  # the VFIO control file alone is no TPU (/dev/vfio/<n> is)
    (True, ["/dev/vfio/vfio", "/dev/vfio/0"], True),  # v5e and later
    (True, ["/dev/accel0", "/dev/accel1"], True),  # v2-v4
])
def test_tpu_host_needs_both_libtpu_and_a_tpu_device_file(monkeypatch, libtpu, device_files, expected):
    import fnmatch
    import glob
    import importlib.util

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(glob, "glob", lambda pattern: fnmatch.filter(device_files, pattern))
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: object() if name == "libtpu" and libtpu else None)
    assert plan.tpu_host() is expected


# libtpu's refusal of a step for lack of HBM (its wording, as in test_out_of_hbm_error_of_libtpu_is_read).
_OUT_OF_HBM = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm.\n"
               "total memory required for HLO temporaries ({}) exceeds available HBM (15.75G)")


@pytest.mark.parametrize("size, expected", [
    ("23.63G", 23.63 * 2**30), ("512.00M", 512 * 2**20), ("1.50T", 1.5 * 2**40), ("800.00K", 800 * 2**10)])
def test_out_of_hbm_temporaries_are_read_from_a_canned_message(size, expected):
    error = jax.errors.JaxRuntimeError(_OUT_OF_HBM.format(size))
    assert plan._out_of_hbm_temporaries(error) == int(expected)


def test_out_of_hbm_temporaries_are_read_from_the_program_requirement_wording():
    # libtpu's other refusal: arguments plus temporaries exceed HBM, the temporaries alone might not.
    message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used "
               "20.51G of 15.48G hbm. Exceeded hbm capacity by 5.03G.\n\nTotal hbm usage >= 21.03G:\n    reserved"
               "        530.00M \n    program          20.51G \n    arguments            0B \n\nOutput size 0B; "
               "shares 0B with arguments.\n\nProgram hbm requirement 20.51G:\n    global            1.05M\n    "
               "scoped           44.00M\n    HLO temp         14.31G (100.0% utilization: Unpadded (14.30G) Padded "
               "(14.30G), 0.0% fragmentation (0.00B))\n")
    assert plan._out_of_hbm_temporaries(jax.errors.JaxRuntimeError(message)) == int(14.31 * 2**30)


def test_out_of_hbm_temporaries_is_none_for_other_errors():
    # The temporaries' wording without RESOURCE_EXHAUSTED, and an out-of-memory error that gives no temporaries.
    assert plan._out_of_hbm_temporaries(RuntimeError("INTERNAL: HLO temporaries (3.00G) are fine")) is None
    assert plan._out_of_hbm_temporaries(RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Exceeded hbm capacity by 7.88G.")) is None
    assert plan._out_of_hbm_temporaries(RuntimeError("INTERNAL: something else")) is None


def _made_up_plan(fits: bool) -> tuple:
    """(config, topology, result) of plan_for_topology's shape with invented numbers: no libtpu, no compile."""
    gib = plan.GiB
    config = common.get_config("B/16")
    config.batch_size, config.accum_steps = 64, 2
    topology = plan.parse_topology("v5e:2x2")
    temporaries = 2 * gib if fits else 20 * gib
    memory = plan.Memory(params=gib, opt_state=2 * gib, batch=gib // 4, other_inputs=1024, temporaries=temporaries,
                         outputs=2048, code=gib // 8)
    result = {"memory": memory, "fits": fits, "mesh": {"data": 4, "fsdp": 1, "model": 1},
              "compiled": object() if fits else None, "compile_seconds": 12.5, "per_chip_micro_batch": 8,
              "flops_per_step": 3.5e15, "model_flops_per_step": 3.0e15, "mfu": 0.5,
              "est_step_seconds": 3.0e15 / (4 * 197e12 * 0.5), "images_per_second": 64 / (3.0e15 / (4 * 197e12 * 0.5)),
              "suggestions": [] if fits else ["--config.model.remat=True: made up", "--config.accum_steps=4: made up"]}
    return config, topology, result


def test_report_of_a_made_up_plan_adds_up_the_memory_and_says_whether_it_fits():
    gib, hbm = plan.GiB, 15.75 * plan.GiB
    config, topology, result = _made_up_plan(fits=True)
    text = plan.report(config, topology, result)
    total = gib + 2 * gib + gib // 4 + 1024 + 2 * gib + 2048 + gib // 8
    assert result["memory"].total == total
    lines = text.splitlines()
    assert lines[1] == ("global batch 64 = 8 per batch shard x 4 shards x accum_steps 2; mesh data=4 fsdp=1 "
                        "model=1")
    assert "topology v5e:2x2 (v5litepod-4): 4 x TPU v5e, 15.75 GiB HBM and 197 TFLOP/s bf16 peak per chip" in lines
    assert "compiled the training step in 12.5 s" in lines
    assert f"  {'total':<26}{total / gib:>10,.2f} GiB  of 15.75 GiB HBM ({total / hbm:.0%})" in lines
    assert f"  {'activations/temporaries':<26}{'2.00 GiB':>14}" in lines
    assert "FLOPs per step      3.50 PFLOP (XLA cost analysis of the step; 3.00 PFLOP model FLOPs = 3 x forward " \
           "x batch)" in lines
    est = 3.0e15 / (4 * 197e12 * 0.5)
    assert f"est. step time      {est:.3f} s at 50% MFU -> {64 / est:,.0f} images/s" in lines
    assert lines[-1] == f"fits: {(hbm - total) / gib:,.2f} GiB to spare per chip"

    config, topology, result = _made_up_plan(fits=False)
    lines = plan.report(config, topology, result).splitlines()
    over = result["memory"].total - int(hbm)
    assert "libtpu refused to compile the step for lack of HBM; temporaries below are what it asked for" in lines
    assert lines[-3] == (f"does NOT fit: {over / gib:,.2f} GiB ({over / int(hbm):.0%} of HBM) over per chip. What "
                         "helps (estimates; re-run plan with the switch to confirm):")
    assert lines[-2:] == ["  --config.model.remat=True: made up", "  --config.accum_steps=4: made up"]


def test_to_json_of_a_made_up_plan_is_flat_and_serialisable():
    config, topology, result = _made_up_plan(fits=False)
    memory = result["memory"]
    got = json.loads(json.dumps(plan.to_json(topology, result, config)))
    assert got["settings"] == {"variant": "B/16", "image_size": 224, "batch_size": 64, "accum_steps": 2,
                               "dtype": config.model.dtype, "remat": bool(config.model.remat),
                               "scan": bool(config.model.scan), "optimizer": config.optimizer.name,
                               "ema_decay": config.optimizer.ema_decay, "freeze": config.optimizer.freeze,
                               "layer_decay": config.optimizer.layer_decay,
                               "prng_impl": str(jax.config.jax_default_prng_impl)}
    assert {k: v for k, v in got.items() if k != "settings"} == {
        "topology": "v5e:2x2", "accelerator_type": "v5litepod-4", "num_chips": 4, "fits": False,
        "bytes_per_chip": memory.total, "hbm_bytes_per_chip": int(15.75 * plan.GiB),
        "params_bytes_per_chip": plan.GiB, "opt_state_bytes_per_chip": 2 * plan.GiB,
        "batch_bytes_per_chip": plan.GiB // 4, "temp_bytes_per_chip": 20 * plan.GiB,
        "flops_per_step": 3.5e15, "model_flops_per_step": 3.0e15, "peak_flops_per_chip": 197e12, "mfu": 0.5,
        "est_step_seconds": result["est_step_seconds"], "images_per_second": result["images_per_second"],
        "mesh": {"data": 4, "fsdp": 1, "model": 1}, "compile_seconds": 12.5,
        "suggestions": ["--config.model.remat=True: made up", "--config.accum_steps=4: made up"]}
    assert "settings" not in plan.to_json(topology, result)


def test_the_average_counts_with_the_optimizer_state_and_frozen_parameters_have_none():
    from tests.train_helpers import tiny_config

    def memory(**overrides):
        config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8, "batch_size": 8, **overrides})
        return plan.plan(config, jax.devices())["memory"]

    plain, averaged = memory(), memory(**{"optimizer.ema_decay": 0.9999})
    assert averaged.params == plain.params
    assert averaged.opt_state == plain.opt_state + plain.params
    probe = memory(**{"optimizer.freeze": "(?!head/).*"})
    head_bytes = (32 + 1) * 10 * 4  # kernel and bias of the 10-class head on hidden 32, float32, replicated
    assert probe.opt_state < 2 * head_bytes + 64  # Adam's two moments of the head (and its counts) only
    # A probe's average is its head's: the frozen parameters are their own average, of which it keeps no copy.
    averaged_probe = memory(**{"optimizer.freeze": "(?!head/).*", "optimizer.ema_decay": 0.9999})
    head_per_chip = 32 * 10 * 4 // 8 + 10 * 4  # the kernel split over fsdp 8, the bias replicated
    assert averaged_probe.opt_state == probe.opt_state + head_per_chip


@pytest.mark.parametrize("message, temporaries", [
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Exceeded hbm capacity by 5.03G.\n"
     "Program hbm requirement 20.51G:\n    HLO temp         14.31G (100.0% utilization)", int(14.31 * 2**30)),
    ("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Exceeded hbm capacity by 7.88G.", None)])
def test_a_step_libtpu_refuses_for_lack_of_hbm_is_reported_not_raised(monkeypatch, message, temporaries):
    from tests.train_helpers import tiny_config

    def refuse(self, *args, **kwargs):
        raise jax.errors.JaxRuntimeError(message)

    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
    config = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 1, "batch_size": 8})
    if temporaries is None:  # no size to report: one line naming libtpu's verdict, not a traceback
        with pytest.raises(UserError, match="does not fit in HBM.*Exceeded hbm capacity by 7.88G"):
            plan.plan(config, jax.devices()[:1])
    else:
        result = plan.plan(config, jax.devices()[:1])
        assert not result["fits"] and result["memory"].temporaries == temporaries


@pytest.mark.parametrize("name, hosts", [("v5e:2x4", 1), ("v5e:4x4", 4), ("v6e:16x16", 64), ("v4:2x2x1", 1),
                                         ("v4:2x2x2", 2), ("v5p:4x4x4", 16)])
def test_hosts_of_a_topology(name, hosts):
    # gcloud: v5litepod-8 is one VM of 8 chips, v5litepod-16 four of 4; v4-16 (8 chips) two VMs of 4.
    assert plan.parse_topology(name).num_hosts == hosts


def test_mixup_on_a_slice_of_one_row_per_host_is_refused_before_compiling():
    """v5e:16x16 is 64 TPU VMs of 4 chips: a global batch of 64 leaves each host's mixup one row to pair with."""
    from vit_jax.config_check import ConfigError

    config = common.get_config("B/16")
    config.batch_size, config.pp.mixup_alpha = 64, 0.2
    with pytest.raises(ConfigError, match="mixup_alpha.*64"):
        plan.plan_for_topology(config, plan.parse_topology("v5e:16x16"))
