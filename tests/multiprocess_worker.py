"""One process of tests/test_multiprocess.py: `python tests/multiprocess_worker.py PID NPROC PORT OUTDIR`.

Four devices in all (NPROC processes x 4/NPROC CPU devices), a (data 2, fsdp 2) mesh: a few training steps on
fixed synthetic batches, a checkpoint saved and read back onto a (fsdp 2, model 2) mesh. Prints one JSON line.
"""

import json
import os
import sys

process_id, num_processes, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests.train_helpers import synthetic_batch, tiny_config, to_device  # noqa: E402
from vit_jax import checkpoints, main, sharding, train  # noqa: E402


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
print(json.dumps({"losses": losses, "params": checksum(state["params"]), "restored": checksum(restored["params"]),
                  "data_state": restored["data_state"], "processes": jax.process_count(),
                  "finite": bool(np.isfinite(losses).all())}), flush=True)
