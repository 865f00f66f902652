"""`vit_jax.plan`: topologies, the real step compiled for a TPU slice without a TPU, FSDP memory, CLI errors."""

import json
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
    assert any(s.startswith("--config.accum_steps=2:") and "~6.00 GiB" in s for s in found)
    assert any(s.startswith("--config.model.dtype=bfloat16") for s in found)


def test_cli_without_libtpu_is_one_line_and_exit_2():
    hide_libtpu = ("import sys, runpy; sys.modules['libtpu'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_module('vit_jax.plan', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_libtpu, "plan", "--config=configs/vit_b16.py",
                             "--topology=v5e:2x2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: compiling for a TPU topology needs libtpu, which is not installed: pip install -e .[tpu]")


def test_cli_bad_topology_exit_2():
    result = subprocess.run([sys.executable, "-m", "vit_jax.plan", "--config=configs/vit_b16.py",
                             "--topology=tpu9:4x4"], cwd=ROOT, capture_output=True, text=True, timeout=120)
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
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["fits"] is True and report["num_chips"] == 4
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


@pytest.mark.parametrize("variant, image_size", [("L/16", 32), ("H/14", 28)])
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
        per_device[fsdp] = memory.params + memory.opt_state
    assert per_device[8] <= per_device[1] / 6
