"""One process of tests/test_multiprocess.py: `python tests/multiprocess_worker.py PID NPROC PORT OUTDIR`.

Four devices in all (NPROC processes x 4/NPROC CPU devices), a (data 2, fsdp 2) mesh: a few training steps on
fixed synthetic batches, checkpoints of steps 2 and 4 saved, the latest read back onto a (fsdp 2, model 2) mesh
and restored for evaluation by processes that see different latest steps; then the start of a fine-tuning run
from `config.pretrained` (an .npz every process reads) on an (fsdp 4) mesh, whose params span both processes.
Prints one JSON line. Then, with several processes, the start of a fine-tune from an .npz that process 1 does not
have: every process exits 2 with the error on stderr.
"""

import json
import os
import sys
from unittest import mock

process_id, num_processes, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from tests.train_helpers import synthetic_batch, tiny_config, to_device  # noqa: E402
from vit_jax import checkpoints, main, sharding, train  # noqa: E402
from vit_jax.config_check import ConfigError  # noqa: E402
from vit_jax.data.pipeline import check_rows_per_process  # noqa: E402
from vit_jax.errors import UserError  # noqa: E402
from vit_jax.interop import save_as  # noqa: E402
from vit_jax.models.vit import build_model  # noqa: E402


def _weights(leaf: int, shape: tuple[int, ...]) -> np.ndarray:
    # Fixed random weights per leaf: a restore that permuted shards or swapped leaves changes the weighted sum
    # (a sum of |x| would not see it; cos(position) weights nearly repeat: a shift of 1024 is ~163 periods).
    return np.random.default_rng(leaf).standard_normal(shape).astype(np.float32)


def checksum(tree) -> float:
    """Sum of each element times its fixed random weight over a (possibly multi-process) tree: computed by a
    jitted reduction (the weights are constants of it), replicated."""
    weights = [_weights(i, x.shape) for i, x in enumerate(jax.tree.leaves(tree))]
    return float(jax.jit(lambda t: sum((x * w).sum() for x, w in zip(jax.tree.leaves(t), weights)))(tree))


def host_checksum(tree) -> float:
    """`checksum` of a host tree, in float64."""
    return float(sum((np.asarray(x, np.float64) * _weights(i, np.shape(x))).sum()
                     for i, x in enumerate(jax.tree.leaves(tree))))


def counting_bytes(counter: list[int], function):
    """`function` (a multihost_utils collective), adding the bytes of the tree it is given to `counter[0]`."""
    def counted(tree, *args, **kwargs):
        counter[0] += sum(x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes for x in jax.tree.leaves(tree))
        return function(tree, *args, **kwargs)
    return counted


def pretrained_npz(path: str) -> dict:
    """A random model of the tiny config saved at `path` as an official-layout .npz; its host params."""
    host = nn.unbox(build_model(config.model, config.num_classes).init(
        jax.random.key(3), np.zeros((1, 16, 16, 3), np.float32), train=False)["params"])
    host = jax.device_get(host)
    save_as(host, config.model, path, "npz")
    return host


def start_from_a_pretrained_file_process_1_lacks() -> None:
    """The start of a fine-tune from an .npz on process 0's disk only (a local file on host 0): exits 2 with the
    error on stderr, as `python -m vit_jax.main` does; process 0 must not wait for process 1 in a collective."""
    path = f"{outdir}_pretrained.npz" if process_id == 0 else f"{outdir}_not_on_this_host.npz"
    if process_id == 0:
        pretrained_npz(path)
    fine = tiny_config(**SGD, **{"mesh.data": 1, "mesh.fsdp": 4, "pretrained": path})
    try:
        train.restore_or_init(fine, sharding.make_mesh(fine), fine.total_steps,
                              checkpoints.Checkpoints(f"{outdir}_missing", keep=1))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if num_processes > 1:
    main.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id)
assert jax.device_count() == 4, jax.devices()

SGD = {"optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.weight_decay": 0.0}
config = tiny_config(**SGD, **{"mesh.data": 2, "mesh.fsdp": 2})

mesh = sharding.make_mesh(config)
state = train.init_state(config, mesh, config.total_steps)
step = train.make_train_step(config, mesh, config.total_steps)
ckpt = checkpoints.Checkpoints(outdir, keep=2)
losses = []
for i in range(4):
    state, metrics = step(state, to_device(synthetic_batch(config, i % 2), sharding.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))  # blocks: gloo deadlocks with many steps in flight
    if i + 1 in (2, 4):
        ckpt.save(i + 1, state["params"], state["opt_state"], {"step": i + 1, "rng": [0, 0]},
                  {"process": jax.process_index()})
        ckpt.wait()
other = tiny_config(**SGD, **{"mesh.data": 1, "mesh.fsdp": 2, "mesh.model": 2})
other_mesh = sharding.make_mesh(other)
abstract = train.abstract_state(other, other_mesh, other.total_steps)
restored = ckpt.restore(4, abstract["params"], abstract["opt_state"])
ckpt.close()

# An evaluation's restore where process 1's view of the workdir lags (an NFS cache, a save in flight): it sees
# step 2 as the latest and an "ema" item that is not there. Process 0's view decides for both.
reader = checkpoints.Checkpoints(outdir, keep=2)
if process_id == 1:
    reader.latest_step = lambda: 2
    reader.has_ema = lambda step: True
evaluated, _, evaluated_meta = train.restore_or_init(other, other_mesh, other.total_steps, reader, params_only=True)
reader.close()


def _refused() -> None:
    raise UserError("gs://bucket/run/final_metrics.json: permission denied")


decision_errors = []
for failing in (lambda: 1 // 0, _refused, lambda: {"not JSON": np.int32(1)}):
    try:  # process 0 fails where it decides for all: every process stops (none waits in a collective)
        train._decided_by_process_0(failing)
        decision_errors.append("")
    except Exception as e:  # noqa: BLE001
        decision_errors.append(f"{type(e).__name__}: {e}")

pretrained = f"{outdir}_pretrained_{process_id}.npz"
host = pretrained_npz(pretrained)
fine = tiny_config(**SGD, **{"mesh.data": 1, "mesh.fsdp": 4, "pretrained": pretrained})
empty = checkpoints.Checkpoints(f"{outdir}_finetune", keep=1)
gathered = [0]  # bytes every process sent through all-gathers and broadcasts while starting the fine-tune
with (mock.patch.object(multihost_utils, "process_allgather", counting_bytes(gathered,
                                                                             multihost_utils.process_allgather)),
      mock.patch.object(multihost_utils, "broadcast_one_to_all", counting_bytes(gathered,
                                                                                multihost_utils.broadcast_one_to_all))):
    fine_state, _, _ = train.restore_or_init(fine, sharding.make_mesh(fine), fine.total_steps, empty)
empty.close()
# A model axis across both processes: each would load its own rows for the same batch rows.
spanning = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.model": 4})
try:
    check_rows_per_process(sharding.batch_sharding(sharding.make_mesh(spanning)), spanning.batch_size, "batch_size")
    spanning_error = ""
except ConfigError as e:
    spanning_error = str(e)
expected = host_checksum({**host, "head": jax.tree.map(np.zeros_like, host["head"])})  # a new zero head
print(json.dumps({"losses": losses, "params": checksum(state["params"]), "restored": checksum(restored["params"]),
                  "evaluated_step": evaluated_meta["step"], "evaluated": checksum(evaluated["params"]),
                  "evaluated_state_step": int(evaluated["step"]), "evaluated_ema": "ema" in evaluated,
                  "finetune_start": checksum(fine_state["params"]), "pretrained_without_head": expected,
                  "finetune_gathered_bytes": gathered[0], "decision_errors": decision_errors,
                  "param_bytes": sum(np.asarray(x).nbytes for x in jax.tree.leaves(host)),
                  "spanning_error": spanning_error,
                  "data_state": restored["data_state"], "processes": jax.process_count(),
                  "finite": bool(np.isfinite(losses).all())}), flush=True)
if num_processes > 1:  # last: it ends the process
    start_from_a_pretrained_file_process_1_lacks()
