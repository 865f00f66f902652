"""One process of tests/test_multiprocess.py: `python tests/multiprocess_worker.py PID NPROC PORT OUTDIR`.

Four devices in all (NPROC processes x 4/NPROC CPU devices), a (data 2, fsdp 2) mesh: a few training steps on
fixed synthetic batches, a checkpoint saved and read back onto a (fsdp 2, model 2) mesh; then the start of a
fine-tuning run from `config.pretrained` (an .npz every process reads) on an (fsdp 4) mesh, whose params span
both processes. Prints one JSON line.
"""

import json
import os
import sys

process_id, num_processes, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.train_helpers import synthetic_batch, tiny_config, to_device  # noqa: E402
from vit_jax import checkpoints, main, sharding, train  # noqa: E402
from vit_jax.config_check import ConfigError  # noqa: E402
from vit_jax.data.pipeline import check_rows_per_process  # noqa: E402
from vit_jax.interop import save_as  # noqa: E402
from vit_jax.models.vit import build_model  # noqa: E402


def checksum(tree) -> float:
    """Sum of |x| over a (possibly multi-process) tree: computed by a jitted reduction, replicated."""
    return float(jax.jit(lambda t: sum(jax.numpy.abs(x).sum() for x in jax.tree.leaves(t)))(tree))


if num_processes > 1:
    main.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
assert jax.device_count() == 4, jax.devices()

SGD = {"optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.weight_decay": 0.0}
config = tiny_config(**SGD, **{"mesh.data": 2, "mesh.fsdp": 2})
mesh = sharding.make_mesh(config)
state = train.init_state(config, mesh, config.total_steps)
step = train.make_train_step(config, mesh, config.total_steps)
losses = []
for i in range(4):
    state, metrics = step(state, to_device(synthetic_batch(config, i % 2), sharding.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))  # blocks: gloo deadlocks with many steps in flight

ckpt = checkpoints.Checkpoints(outdir, keep=1)
ckpt.save(4, state["params"], state["opt_state"], {"step": 4, "rng": [0, 0]}, {"process": jax.process_index()})
ckpt.wait()
other = tiny_config(**SGD, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.model": 2})
other_mesh = sharding.make_mesh(other)
abstract = train.abstract_state(other, other_mesh, other.total_steps)
restored = ckpt.restore(4, abstract["params"], abstract["opt_state"])
ckpt.close()

host = nn.unbox(build_model(config.model, config.num_classes).init(
    jax.random.key(3), np.zeros((1, 16, 16, 3), np.float32), train=False)["params"])
host = jax.device_get(host)
pretrained = f"{outdir}_pretrained_{process_id}.npz"
save_as(host, config.model, pretrained, "npz")
fine = tiny_config(**SGD, **{"mesh.data": 1, "mesh.fsdp": 4, "pretrained": pretrained})
empty = checkpoints.Checkpoints(f"{outdir}_finetune", keep=1)
fine_state, _, _ = train.restore_or_init(fine, sharding.make_mesh(fine), fine.total_steps, empty)
empty.close()
# A model axis across both processes: each would load its own rows for the same batch rows.
spanning = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.model": 4})
try:
    check_rows_per_process(sharding.batch_sharding(sharding.make_mesh(spanning)), spanning.batch_size, "batch_size")
    spanning_error = ""
except ConfigError as e:
    spanning_error = str(e)
expected = float(sum(np.abs(np.asarray(x, np.float64)).sum()
                     for name, branch in host.items() if name != "head" for x in jax.tree.leaves(branch)))
print(json.dumps({"losses": losses, "params": checksum(state["params"]), "restored": checksum(restored["params"]),
                  "finetune_start": checksum(fine_state["params"]), "pretrained_without_head": expected,
                  "spanning_error": spanning_error,
                  "data_state": restored["data_state"], "processes": jax.process_count(),
                  "finite": bool(np.isfinite(losses).all())}), flush=True)
