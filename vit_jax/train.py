"""Training and evaluation: state born sharded, one jitted step, periodic eval, metrics and checkpoints.

`train_and_evaluate(config, workdir)` is the whole run and reads top to bottom: mesh and data, state (resumed,
pre-trained or fresh), then the loop (step, log, profile, eval, checkpoint, preemption) and the final report.
The state is a dict {"step", "params", "opt_state", "rng"} of global arrays laid out by `vit_jax.sharding`
(and "ema", the Polyak average of the params, laid out as they are, when `optimizer.ema_decay` > 0);
the step is `jax.jit` with explicit in/out shardings and the state donated. Each step draws its randomness
from fold_in(rng, step), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from vit_jax import (
    checkpoints,
    config_check,
    extra_evals,
    fewshot,
    masked_patch,
    metric_writer,
    optim,
    sharding,
    xla_options,
)
from vit_jax.errors import UserError
from vit_jax.masked_patch import make_model  # the model the objective trains (public here too)
from vit_jax.models.vit import unstack_blocks

State = dict[str, Any]
FINAL_METRICS = "final_metrics.json"

# Peak dense bf16 FLOP/s per device, by jax `device_kind`, for MFU (unknown kinds, e.g. CPUs, report none).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the message names the first such step."""


# ----------------------------------------------------------------------------------------------------------------
# Model, state and step functions (pure functions of the config and the mesh: also what vit_jax.plan compiles).

def _default_num_steps(config: ml_collections.ConfigDict) -> int:
    # Used where only shapes matter (lowering for vit_jax.plan): the schedule's values do not change the program.
    return max(config.total_steps, config.optimizer.warmup_steps + 1)


def _boxed_params(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array) -> Any:
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return model.init({"params": rng, "dropout": rng}, images, train=False)["params"]


def init_params(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array, mesh: Mesh) -> Any:
    """A fresh draw of the model's params. A model of per-block params has them drawn as its scanned twin's, then
    split into blocks (the same tree as its own init): XLA compiles one block's initialisers, not one per block
    (benchmarks/init_compile.py on 2 CPU cores: ViT-L/16's compile in 4.6 s instead of 17.8 s). Each block has its
    own key, split by nn.scan from the params key; the stack is laid out as a scan=True run's params (by the
    logical axes, "layers" unsharded), so wherever the params are sharded (FSDP, tensor parallel) it is too: a
    temporary of the blocks' shards (83 MiB per chip for H/14 on 16 chips)."""
    if model.scan or model.num_layers < 2:
        return nn.unbox(_boxed_params(model, config, rng))
    boxed = _boxed_params(model.clone(scan=True), config, rng)
    stacked = jax.lax.with_sharding_constraint(nn.unbox(boxed), sharding.param_shardings(boxed, mesh))
    return unstack_blocks(stacked)


def state_shardings(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int | None = None) -> State:
    """NamedShardings of the train state: params by the logical-axis rules, optimizer state like its params."""
    model = make_model(config)
    tx = optim.make_optimizer(config, num_steps or _default_num_steps(config))
    boxed = jax.eval_shape(functools.partial(_boxed_params, model, config), jax.random.PRNGKey(0))
    params = sharding.param_shardings(boxed, mesh)
    abstract_params = nn.unbox(boxed)
    opt_state = sharding.like_params(jax.eval_shape(tx.init, abstract_params), abstract_params, params, mesh)
    replicated = sharding.replicated(mesh)
    shardings = {"step": replicated, "params": params, "opt_state": opt_state, "rng": replicated}
    return {**shardings, "ema": optim.trained_only(config, params)} if optim.uses_ema(config) else shardings


def abstract_state(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int | None = None) -> State:
    """The train state as jax.ShapeDtypeStructs carrying their shardings (nothing is allocated)."""
    model = make_model(config)
    tx = optim.make_optimizer(config, num_steps or _default_num_steps(config))

    def init(rng):
        params = nn.unbox(_boxed_params(model, config, rng))
        return _with_ema(config, {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                                  "rng": rng})

    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = state_shardings(config, mesh, num_steps)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_state(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int, params_only: bool = False) -> State:
    """A fresh state from `config.seed`, created directly in its sharded layout (never whole on one device).

    `params_only` (evaluating a fresh model) builds no optimizer state (opt_state None) and no average.
    """
    model = make_model(config)
    tx = optim.make_optimizer(config, num_steps)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    shardings = state_shardings(config, mesh, num_steps)
    if params_only:
        shardings = {key: shardings[key] for key in ("step", "params", "rng")}

    def init(init_rng, train_rng):
        params = init_params(model, config, init_rng, mesh)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "rng": train_rng}
        return state if params_only else _with_ema(config, {**state, "opt_state": tx.init(params)})

    options = xla_options.compiler_options(mesh.devices.flat, run_once=True)
    state = jax.jit(init, out_shardings=shardings, compiler_options=options)(init_rng, train_rng)
    return {**state, "opt_state": None} if params_only else state


def _with_ema(config: ml_collections.ConfigDict, state: State) -> State:
    """`state` with its Polyak average started at its params, when the run keeps one (traced: a separate copy of
    the trained ones)."""
    if not optim.uses_ema(config):
        return state
    return {**state, "ema": jax.tree.map(jnp.copy, optim.trained_only(config, state["params"]))}


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """A global train batch's shapes and shardings (what the data pipeline yields)."""
    batch_sharding = sharding.batch_sharding(mesh)
    size = config.image_size
    return {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32, sharding=batch_sharding),
            "label": jax.ShapeDtypeStruct((config.batch_size, config.num_classes), jnp.float32,
                                          sharding=batch_sharding)}


def _loss_fn(model: nn.Module, config: ml_collections.ConfigDict, params: Any, images: jax.Array,
             labels: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean training loss of one (micro-)batch and its metrics."""
    if config.objective == "masked_patch_prediction":
        loss, metrics = masked_patch.masked_patch_loss(model, params, images, rng, config, train=True)
        return loss, {"accuracy": metrics["accuracy"]}
    logits = model.apply({"params": params}, images, train=True, rngs={"dropout": rng})
    targets = optim.smooth_labels(labels, config.optimizer.label_smoothing)
    loss = optim.per_example_loss(logits, targets, config.label_kind).mean()
    return loss, {}


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int | None = None) -> Callable:
    """`step(state, batch) -> (state, metrics)`, jitted with the mesh's shardings and the state donated.

    With `accum_steps = k` the batch is cut into k micro-batches whose gradients are averaged inside the step
    (a scan), which is exactly one step on the whole batch but holds one micro-batch's activations at a time.
    """
    num_steps = num_steps or _default_num_steps(config)
    model = make_model(config)
    tx = optim.make_optimizer(config, num_steps)
    schedule = optim.learning_rate_schedule(config.optimizer, num_steps)
    shardings = state_shardings(config, mesh, num_steps)
    batch_shardings = {key: s.sharding for key, s in abstract_batch(config, mesh).items()}
    accum = config.accum_steps
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, model, config), has_aux=True)

    def micro_batches(x: jax.Array) -> jax.Array:
        # (B, ...) -> (k, B/k, ...) where micro-batch j holds rows j, k + j, 2k + j, ...: every device keeps its
        # own rows (the batch axis stays split over data x fsdp), so the split costs no communication.
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)))

    def train_step(state: State, batch: dict[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        step_rng = jax.random.fold_in(state["rng"], state["step"])
        params = state["params"]
        if accum == 1:
            (loss, aux), grads = grad_fn(params, batch["image"], batch["label"], step_rng)
            grads = optim.zero_frozen(config, grads)  # never computed for `optimizer.freeze`'s parameters
        else:
            def accumulate(carry, micro):
                index, images, labels = micro
                (loss, aux), grads = grad_fn(params, images, labels, jax.random.fold_in(step_rng, index))
                grads = optim.zero_frozen(config, grads)  # as above, in each micro-batch
                return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

            micro = (jnp.arange(accum), micro_batches(batch["image"]), micro_batches(batch["label"]))
            (_, aux_shapes), _ = jax.eval_shape(grad_fn, params, micro[1][0], micro[2][0], step_rng)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                 (jax.ShapeDtypeStruct((), jnp.float32), aux_shapes, params))
            (loss, aux, grads), _ = jax.lax.scan(accumulate, zeros, micro)
            loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
        grads = jax.lax.with_sharding_constraint(grads, shardings["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state, "rng": state["rng"]}
        if "ema" in state:
            new_state["ema"] = optim.update_ema(state["ema"], new_state["params"], config.optimizer.ema_decay,
                                                new_state["step"])
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"]),
                   **aux}
        return new_state, metrics

    float32_training = jnp.dtype(config.model.dtype) == jnp.float32  # as build_model reads it
    return jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0,
                   compiler_options=xla_options.compiler_options(mesh.devices.flat, float32_training=float32_training))


def make_eval_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """`eval_step(params, batch) -> sums` over the real (mask 1) examples of a batch, jitted for the mesh.

    Classification sums: loss, top1, top5 (for multi-label: whether the top-1 / any top-5 class is a positive;
    no top5 with 5 classes or fewer) and count, over the examples with at least one label: as big_vision, an
    image without any (ImageNet ReaL has 3,163 of 50,000) counts for nothing, not as a miss. Masked patch
    prediction: loss and accuracy over the predicted patches, and their count.
    """
    model = make_model(config)
    param_shardings = state_shardings(config, mesh)["params"]
    batch_sharding = sharding.batch_sharding(mesh)
    top_k = min(5, config.num_classes)

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        mask = batch["mask"]
        if config.objective == "masked_patch_prediction":
            # Each image corrupted by a key of its index in the split: the same at every evaluation, whatever the
            # eval batch size or process count.
            seed = jax.random.PRNGKey(config.seed)
            keys = jax.vmap(lambda index: jax.random.fold_in(seed, index))(batch["index"])
            _, metrics = masked_patch.masked_patch_loss(model, params, batch["image"], seed, config, train=False,
                                                        example_weights=mask, example_keys=keys)
            count = metrics["num_predicted"]
            return {"loss": metrics["loss"] * count, "accuracy": metrics["accuracy"] * count, "count": count}
        logits = model.apply({"params": params}, batch["image"], train=False)
        labels = batch["label"]
        mask = mask * jnp.any(labels > 0, axis=-1)  # unlabelled images are not scored (big_vision, ReaL)
        losses = optim.per_example_loss(logits, labels, config.label_kind)
        _, top = jax.lax.top_k(logits, top_k)
        hits = jnp.take_along_axis(labels, top, axis=-1) > 0  # (batch, k): is the i-th guess a true class?
        sums = {"loss": jnp.sum(losses * mask), "top1": jnp.sum(hits[:, 0] * mask), "count": jnp.sum(mask)}
        if config.num_classes > 5:  # with 5 classes or fewer every label is in the top 5
            sums["top5"] = jnp.sum(jnp.any(hits, axis=-1) * mask)
        return sums

    return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding),
                   out_shardings=sharding.replicated(mesh),
                   compiler_options=xla_options.compiler_options(mesh.devices.flat))


def evaluate(config: ml_collections.ConfigDict, eval_step: Callable, params: Any, mesh: Mesh) -> dict[str, float]:
    """One pass over the eval split, every example counted once: {"loss", "top1", "top5"} (top5 with more than 5
    classes) or {"loss", "accuracy"} (masked patch prediction)."""
    from vit_jax import data

    totals: dict[str, float] = {}
    keys = ("image", "label", "mask") + (("index",) if config.objective == "masked_patch_prediction" else ())
    for batch in data.make_eval_iterator(config, sharding.batch_sharding(mesh), keys=keys):
        for key, value in jax.device_get(eval_step(params, batch)).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = totals.pop("count", 0.0)
    if not count:  # a global sum: every process raises
        raise data.DatasetError(f"config.eval_split={config.eval_split!r} of {config.dataset!r}: no image of it "
                                "could be decoded with a label (each was skipped as corrupt, see the warnings above, "
                                "or has no label); check the files the dataset was prepared from")
    return {key: value / count for key, value in totals.items()}


# ----------------------------------------------------------------------------------------------------------------
# Start-up: restore or init.

def _global_arrays(tree: Any, shardings: Any) -> Any:
    """Host values (numpy, or arrays every process holds whole) as global arrays laid out by `shardings`, each
    process putting only the slices its own devices hold.

    Not `jax.device_put`: onto a sharding that spans processes it first checks that every process holds the same
    value by all-gathering each array whole onto every device (jax 0.10, `multihost_utils.assert_equal`), process
    count x the array per device: an H/14 fine-tune's 840 MB scanned MLP kernel on 16 hosts would not fit.
    """

    def put(value: Any, leaf_sharding: jax.sharding.Sharding) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, leaf_sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def _decided_by_process_0(decide: Callable[..., Any], *args: Any) -> Any:
    """`decide(*args)` (a JSON value) as process 0 computed it, on every process; only process 0 calls it.

    For what each process would otherwise read from its own view of the file system (the latest checkpoint,
    whether it holds an average, a finished run's final_metrics.json): a writer saving meanwhile or a stale NFS
    cache would have processes restore different steps, or some return while others enter a collective. An error
    of process 0's stops every process (a UserError as a UserError: one error line and exit code 2 everywhere).
    """
    if jax.process_count() == 1:
        return decide(*args)
    failure, payload = None, None
    if jax.process_index() == 0:
        try:
            payload = {"value": json.loads(json.dumps(decide(*args)))}  # JSON, or an error before the gather
        except Exception as error:  # noqa: BLE001 (re-raised below, once the others know)
            failure = error
            payload = {"error": f"{type(error).__name__}: {error}", "user": isinstance(error, UserError)}
    decided = checkpoints.gather_json(payload)[0]
    if failure is not None:
        raise failure
    if "error" in decided:
        raise (UserError if decided["user"] else RuntimeError)(
            f"process 0 failed where it decides for every process: {decided['error']}")
    return decided["value"]


def _merge_pretrained(loaded: Any, fresh: Any) -> Any:
    """`loaded` as host float32 arrays in `fresh`'s tree, after checking it has exactly `fresh`'s names and shapes.

    `interop.load_pretrained` already fitted the checkpoint to this model (new heads, resized position
    embeddings); anything that still differs is an error listing every such array, never a partial load.
    """
    from flax import traverse_util

    from vit_jax.interop.common import check_matches

    old = traverse_util.flatten_dict(dict(loaded), sep="/")
    # Names, shapes and dtypes only: `fresh` may be sharded over processes, whose arrays no process can fetch.
    new = traverse_util.flatten_dict(dict(fresh), sep="/")
    check_matches(old, {name: tuple(value.shape) for name, value in new.items()}, "config.pretrained")
    return traverse_util.unflatten_dict({name: np.asarray(old[name], new[name].dtype) for name in new}, sep="/")


# pin_pretrained's gathered value when a process has no step to offer
_NOT_A_WORKDIR, _UNREADABLE, _MISSING = -1, -2, -3
_PIN_STATES = {_NOT_A_WORKDIR: "not a workdir (used as it is)", _UNREADABLE: "unreadable (see that process's log)"}


def pin_pretrained(path: str, gather: Callable[[Any], Any] | None = None) -> str:
    """`config.pretrained` pinned to one step: the step directory a workdir's latest finished step is now, chosen
    by process 0 for every process (`path` itself when it names no workdir).

    A run that fine-tunes from a workdir another run is still writing would otherwise read its numerics and its
    weights, or each process its weights, from whatever step was latest at that moment. `gather` collects every
    process's value (default: `multihost_utils.process_allgather` when there are several processes), so that
    processes that disagree on what `path` is, or that cannot read it, all stop with an error rather than some
    waiting for others. A local path that some processes lack (each TPU VM worker has its own disk) stops them all
    with an error naming those processes.
    """
    from vit_jax import interop

    if gather is None and jax.process_count() == 1:
        return interop.remote.pinned_step(path)
    gather = gather or multihost_utils.process_allgather
    try:  # a process that cannot read `path` still takes part in the gather: the others would wait for it forever
        pinned, failure = interop.remote.pinned_step(path), None
    except Exception as error:  # noqa: BLE001 (a permission error, a missing gs:// client...): raised after the gather
        pinned, failure = path, error
    name = pinned.rstrip("/").rsplit("/", 1)[-1]
    if failure:
        mine = _UNREADABLE
    elif not interop.remote.is_remote(path) and not os.path.exists(path):  # read as it is: it would fail later
        mine = _MISSING
    else:
        mine = int(name) if pinned != path and name.isdigit() else _NOT_A_WORKDIR
    seen = [int(v) for v in np.asarray(gather(np.int32(mine))).reshape(-1)]
    if failure:
        raise failure
    lacking = [i for i, v in enumerate(seen) if v == _MISSING]
    if lacking:
        having = [i for i, v in enumerate(seen) if v != _MISSING]
        raise interop.CheckpointError(
            f"config.pretrained={path} does not exist on process{'es' if len(lacking) > 1 else ''} "
            f"{', '.join(map(str, lacking))}" + (f" (it does on {', '.join(map(str, having))})" if having else "")
            + ": every process reads the weights itself; copy them to every host, or give a path all of them see "
            "(a shared file system, gs://)")
    if _UNREADABLE in seen or (_NOT_A_WORKDIR in seen and any(v != _NOT_A_WORKDIR for v in seen)):
        described = [f"{_PIN_STATES.get(v, f'step {v}')} for process {i}" for i, v in enumerate(seen)]
        raise interop.CheckpointError(f"config.pretrained={path} is {', '.join(described)}: every process must see "
                                      "the same checkpoint")
    chosen = seen[0]
    if chosen == mine:
        return pinned
    logging.info("config.pretrained=%s: process 0 chose step %d (this process saw %d as the latest)", path, chosen,
                 mine)
    return pinned.rstrip("/")[:-len(name)] + str(chosen)


def load_pretrained_params(config: ml_collections.ConfigDict, path: str, fresh_params: Any, reset_head: bool = False,
                           require_head: bool = False) -> Any:
    """Params from `path` (`config.pretrained` pinned to a step; vit_jax.interop), adapted to this model (head,
    resolution, objective).

    `reset_head`: a new zero head even where the checkpoint's has this run's class count (fine-tuning).
    `require_head`: the checkpoint's own head or an error, never a new one (evaluation).

    Also sets `config.model`'s numerics (GELU flavour, LayerNorm eps) to the weights' origin, in place: every
    model built from `config` afterwards (the train and eval steps) computes as the weights did at home.
    """
    from vit_jax import interop  # imported only when a run asks for pre-trained weights

    patch_classes = (masked_patch.num_colour_classes(config.masked_patch.colour_bits)
                     if config.objective == "masked_patch_prediction" else 0)
    loaded = interop.load_pretrained(path, config.model, num_classes=config.num_classes,
                                     image_size=config.image_size, masked_patch_classes=patch_classes,
                                     reset_head=reset_head, require_head=require_head)
    return _merge_pretrained(loaded, fresh_params)


def restore_or_init(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int,
                    ckpt: checkpoints.Checkpoints, params_only: bool = False, require_head: bool | None = None,
                    read_ema: bool = True) -> tuple[State, dict | None, dict]:
    """The start state, the data iterator state to continue from, and the saved meta.

    The model's numerics (GELU flavour, LayerNorm eps) are set in place to those of the weights: the ones a
    resumed checkpoint's run recorded (evaluating a fine-tune of timm weights without its --config.pretrained still
    computes with exact GELU; `config.pretrained` is then not read), or else those of `config.pretrained`. An
    evaluation (`params_only`), and the scoring of a finished run (its latest step at `num_steps` or beyond), also
    take the run's recorded `label_kind`, in place: its loss is the one it trained with.
    Order: resume the latest checkpoint in the workdir -> else `config.pretrained` (via vit_jax.interop; a
    training run puts a new zero head unless `config.pretrained_head` is "keep", an evaluation keeps the
    checkpoint's) -> else from scratch. Restoring reads onto this run's mesh, whatever mesh wrote the checkpoint.
    `params_only` (evaluation) does not read a checkpoint's optimizer state (opt_state None), so it may be
    evaluated under another optimizer config. `require_head` (default: `params_only`) refuses a pre-trained
    checkpoint whose head cannot serve this config; few-shot evaluation, which reads no head, turns it off.
    The state holds "ema", the Polyak average, where a resumed checkpoint has one and it will be used (training
    on with `optimizer.ema_decay` > 0, evaluating with `read_ema`, or re-evaluating a finished run), or where
    training will keep one (started from the params: fresh, pre-trained, or resumed from a checkpoint without).
    """
    from vit_jax import interop
    from vit_jax.interop import loading, orbax_io

    require_head = params_only if require_head is None else require_head
    latest = _decided_by_process_0(ckpt.latest_step)  # every process restores the same step
    if latest is not None:
        abstract = abstract_state(config, mesh, num_steps)
        trains_on = not params_only and latest < num_steps
        has_ema = _decided_by_process_0(ckpt.has_ema, latest)
        reads_ema = has_ema and (read_ema if params_only else optim.uses_ema(config) or not trains_on)
        # Outside evaluation the average holds the trained parameters only: the frozen ones are not read.
        abstract_ema = abstract["params"] if params_only else optim.trained_only(config, abstract["params"])
        # A finished run is only scored: its optimizer state is not read (nor checked against this config's).
        restored = ckpt.restore(latest, abstract["params"], abstract["opt_state"] if trains_on else None,
                                abstract_ema if reads_ema else None)
        meta = restored["meta"]
        # The numerics the run was trained with, whatever this run's flags say. `config.pretrained` is not read:
        # the run recorded its numerics, and the source may be gone (a spot VM's /tmp) or slow to reach.
        recorded = orbax_io.numerics_from_meta(meta, f"{ckpt.directory}/{latest}")
        if recorded is None and config.pretrained:  # a checkpoint that recorded none: the source's, as it began
            interop.apply_source_numerics(pin_pretrained(config.pretrained), config.model)
        elif recorded is not None and loading.apply_numerics(config.model, recorded) and not config.pretrained:
            logging.warning("the checkpoint was trained with model.gelu_approximate=%s, "
                            "model.layernorm_epsilon=%g: computing with those, not this config's",
                            recorded.gelu_approximate, recorded.layernorm_epsilon)
        # An evaluation, or the scoring of a finished run, uses the loss the run trained with (softmax or
        # sigmoid), whatever this config says: a multi-label run's test_loss is its sigmoid loss without the flag.
        if params_only or not trains_on:
            where = f"{ckpt.directory}/{latest}"
            config_check.adopt_recorded_label_kind(config, orbax_io.recorded_config(meta, where), where)
        replicated = sharding.replicated(mesh)
        state = {"step": _global_arrays(np.int32(meta["step"]), replicated),
                 "params": restored["params"], "opt_state": restored["opt_state"],
                 "rng": _global_arrays(_resumed_rng(config, meta, warn=trains_on), replicated)}
        if restored["ema"] is not None:
            state["ema"] = restored["ema"]
        elif optim.uses_ema(config) and trains_on:
            state["ema"] = _start_average(config, state["params"], jax.tree.map(lambda x: x.sharding, abstract["ema"]))
            logging.warning("the checkpoint of step %d holds no Polyak average (no 'ema' item): the average starts "
                            "from its params", meta["step"])
        if trains_on and not optim.uses_ema(config) and has_ema:
            logging.warning("the checkpoint of step %d holds a Polyak average, but optimizer.ema_decay is 0: it is "
                            "not carried on, and later checkpoints will not hold one", meta["step"])
        logging.info("resumed from %s at step %d", ckpt.directory, meta["step"])
        planned = meta.get("num_steps")
        if not params_only and planned is not None and planned != num_steps:
            logging.warning("resuming a run scheduled over %d steps with one of %d steps: from step %d the learning "
                            "rate follows the new schedule (%g there)", planned, num_steps, meta["step"],
                            float(optim.learning_rate_schedule(config.optimizer, num_steps)(meta["step"])))
        return state, restored["data_state"], meta
    if config.pretrained:
        pretrained = pin_pretrained(config.pretrained)
        interop.apply_source_numerics(pretrained, config.model)  # the weights' numerics (GELU, LayerNorm eps)
        return _pretrained_state(config, mesh, num_steps, pretrained, params_only, require_head), None, {}
    # Evaluating a fresh model: no optimizer state, and no average (it would be the params themselves).
    return init_state(config, mesh, num_steps, params_only), None, {}


def _resumed_rng(config: ml_collections.ConfigDict, meta: dict, warn: bool = True) -> jax.Array:
    """The training key a checkpoint recorded; one of another PRNG implementation (a TPU run's 4-word rbg key
    resumed on a GPU's 2-word threefry, or back) is drawn anew from the seed and the step, with a warning when the
    run will train on (`warn`)."""
    recorded = jnp.asarray(meta["rng"], jnp.uint32)
    expected = jax.random.split(jax.random.PRNGKey(config.seed))[1]
    if recorded.shape == expected.shape:
        return recorded
    if warn:
        logging.warning("the checkpoint's training key has shape %s, this run's PRNG implementation (%s) keys %s: "
                        "dropout and the other random draws continue from a new key (seed %d, step %d)",
                        recorded.shape, jax.config.jax_default_prng_impl, expected.shape, config.seed, meta["step"])
    return jax.random.fold_in(expected, meta["step"])


def _pretrained_state(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int, path: str, params_only: bool,
                      require_head: bool) -> State:
    """The start state from pre-trained weights (`path` pinned): their params, a fresh optimizer state (None to
    evaluate), a fresh run's step and rng, and the Polyak average started at the params when training keeps one.

    The model's own initialisation never runs: only its shapes are needed, so a fine-tune does not build (and throw
    away) a random model, its optimizer state and its average beside the weights it loads.
    """
    abstract = abstract_state(config, mesh, num_steps)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    reset_head = not params_only and config.pretrained_head == "reset"
    keep_head = not params_only and config.pretrained_head == "keep"
    from vit_jax.interop import surgery  # imported only when a run asks for pre-trained weights

    try:  # "keep" asks for the checkpoint's own head: one that cannot serve is refused, not replaced in silence
        loaded = load_pretrained_params(config, path, abstract["params"], reset_head, require_head or keep_head)
    except surgery.UnusableHeadError as e:
        if require_head:
            raise
        raise config_check.ConfigError(
            f"config.pretrained_head='keep' cannot keep the head of {path}: {e.reason}; use pretrained_head='reset' "
            "for a new zero head (the paper's fine-tuning)") from None
    params = _global_arrays(loaded, shardings["params"])
    replicated = sharding.replicated(mesh)
    train_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # as init_state's
    state = {"step": _global_arrays(np.int32(0), replicated), "params": params, "opt_state": None,
             "rng": _global_arrays(train_rng, replicated)}
    if not params_only:
        tx = optim.make_optimizer(config, num_steps)
        state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
        if optim.uses_ema(config):
            state["ema"] = _start_average(config, params, shardings["ema"])
    logging.info("initialised from pre-trained %s", path)
    return state


def _start_average(config: ml_collections.ConfigDict, params: Any, shardings: Any) -> Any:
    """The Polyak average started at `params`: a copy of the trained ones in new buffers laid out by `shardings`
    (the average's), as `_with_ema` starts it inside a fresh state."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(optim.trained_only(config, params))


# ----------------------------------------------------------------------------------------------------------------
# Reporting.

def step_flops(config: ml_collections.ConfigDict, mesh: Mesh, num_steps: int | None,
               train_step: Callable | None = None) -> float:
    """FLOPs of one whole training step (all devices) from XLA's cost analysis of the lowered step.

    XLA counts a loop body once, so with scanned blocks or gradient accumulation the step is lowered unrolled
    for one micro-batch and multiplied by `accum_steps` (lowering only: nothing is compiled). Otherwise the
    run's own jitted `train_step`, when given, is lowered: jit keeps that trace and lowering for the first step.
    """
    flat = copy.deepcopy(config)
    with flat.unlocked():
        flat.model.scan = False
        flat.batch_size = config.batch_size // config.accum_steps
        flat.accum_steps = 1
    if train_step is None or config.model.scan or config.accum_steps != 1:
        train_step = make_train_step(flat, mesh, num_steps)
    lowered = train_step.lower(abstract_state(flat, mesh, num_steps), abstract_batch(flat, mesh))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0)) * config.accum_steps


def peak_flops_per_device() -> float | None:
    """The device's peak dense bf16 FLOP/s if known (TPUs, recent NVIDIA GPUs), else None."""
    kind = jax.devices()[0].device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda item: -len(item[0])):
        if kind.startswith(name):
            return flops
    return None


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(step: int, num_steps: int, loss: float, images_per_second: float, seconds_per_step: float,
                  flops_per_step: float, peak_flops: float | None) -> str:
    """`step 500/1500 | loss 0.2100 | 850 img/s | ETA 1m10s | 0.85 TFLOP/s | MFU 41.0%` (MFU: n/a when unknown)."""
    achieved = flops_per_step / seconds_per_step if seconds_per_step > 0 else 0.0
    mfu = f"{100 * achieved / (peak_flops * jax.device_count()):.1f}%" if peak_flops else "n/a"
    return (f"step {step}/{num_steps} | loss {loss:.4f} | {images_per_second:,.0f} img/s | "
            f"ETA {_duration((num_steps - step) * seconds_per_step)} | {achieved / 1e12:.3g} TFLOP/s | MFU {mfu}")


def _report(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _check_finite(pending: list[tuple[int, dict[str, Any]]]) -> list[tuple[int, dict[str, float]]]:
    """Fetch the metrics of the steps since the last check (device arrays, or host floats a check fetched
    already); raise at the first NaN/inf loss or gradient norm.

    The gradient norm too: a step whose loss is finite but whose gradients are not leaves NaN params, which an
    evaluation or a checkpoint of that very step would otherwise receive.
    """
    fetched = [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in pending]
    for step, metrics in fetched:
        for key, what in (("loss", "the training loss"), ("grad_norm", "the gradient norm")):
            if key in metrics and not np.isfinite(metrics[key]):
                raise NonFiniteLossError(f"{what} is {metrics[key]} at step {step}; stopping. The last good "
                                         "checkpoint is kept: lower config.optimizer.lr, raise warmup_steps or "
                                         "check the data")
    return fetched


def _interval(fetched: list[tuple[int, dict[str, float]]], before: dict | None = None) -> dict:
    """{"steps": n, "sums": {metric: sum}} of the steps of a log interval: `before`'s and those `fetched` (host
    floats); what a checkpoint's meta carries for the next log line, of a size independent of `log_every`."""
    before = before or {"steps": 0, "sums": {}}
    keys = set(before["sums"]).union(*(metrics for _, metrics in fetched))
    return {"steps": before["steps"] + len(fetched),
            "sums": {key: before["sums"].get(key, 0.0) + sum(m.get(key, 0.0) for _, m in fetched) for key in keys}}


def write_final_metrics(workdir: str, result: dict) -> None:
    """WORKDIR/final_metrics.json (process 0), whole or not at all: written beside it, then renamed over it.

    Scores of the same step made with other settings (a finished run scored again on another split, crop or test
    set) are kept as final_metrics.N.json (the first free N), not replaced: they are results too."""
    if jax.process_index() == 0:
        path = epath.Path(workdir) / FINAL_METRICS
        partial = path.parent / f"{FINAL_METRICS}.partial"
        partial.write_text(json.dumps(result, indent=2))
        _keep_other_scores(path, result)
        partial.replace(path)


def _keep_other_scores(path: epath.Path, result: dict) -> None:
    """Move `path` aside as final_metrics.N.json if it holds `result`'s step scored with other settings."""
    try:
        old = json.loads(path.read_text()) if path.exists() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # unreadable: nothing to keep
    if not isinstance(old, dict) or old.get("step") != result.get("step") or "scored_with" not in old or \
            old["scored_with"] == result.get("scored_with"):
        return
    number = 1
    while (kept := path.parent / f"final_metrics.{number}.json").exists():
        number += 1
    path.rename(kept)
    logging.warning("kept the scores of step %s made with other settings as %s", old["step"], kept)


ExtraSteps = dict[str, tuple[ml_collections.ConfigDict, Callable]]
# {weight set ("params", "ema"): (eval split metrics, {extra test set: metrics})}, `_evaluate_weights`' result.
Evaluations = dict[str, tuple[dict[str, float], dict[str, dict[str, float]]]]


def _test_metrics(config: ml_collections.ConfigDict, eval_metrics: dict[str, float]) -> dict[str, float]:
    accuracy_key = "accuracy" if config.objective == "masked_patch_prediction" else "top1"
    result = {"test_accuracy": eval_metrics[accuracy_key], "test_loss": eval_metrics["loss"]}
    if "top5" in eval_metrics:
        result["test_top5"] = eval_metrics["top5"]
    return result


def scored_with(config: ml_collections.ConfigDict, extra: dict[str, ml_collections.ConfigDict]) -> dict:
    """What a finished run's scores depend on besides its weights (final_metrics.json's "scored_with", as JSON
    reads it back): the dataset and where it is read from, the eval split, label kind and evaluation
    preprocessing (resolution, crop, antialiasing), a masked-patch run's corruption, each extra test set's
    (dataset, split), and each few-shot task's dataset, splits, shots, seeds and l2 strength. A rerun reuses the
    scores only where this is unchanged: scores of another dataset, split, loss, crop or draw of shots would be
    reported as this config's."""
    record: dict[str, Any] = {"dataset": config.dataset, "tfds_data_dir": config.tfds_data_dir,
                              "eval_split": config.eval_split, "label_kind": config.label_kind,
                              "image_size": config.image_size, "eval_crop_fraction": config.pp.eval_crop_fraction,
                              "antialias": config.pp.antialias,
                              "extra_evals": {name: [c.dataset, c.eval_split] for name, c in extra.items()}}
    if config.objective == "masked_patch_prediction":  # its eval loss is over patches corrupted from the seed
        record["masked_patch"] = {**config.masked_patch.to_dict(), "seed": config.seed}
    if _has_fewshot(config):
        settings = config.fewshot
        record["fewshot"] = {task.name: {"dataset": task.dataset, "train_split": task.train_split,
                                         "test_split": task.test_split, "shots": list(settings.shots),
                                         "seeds": settings.seeds, "l2_reg": settings.l2_reg}
                             for task in fewshot.validate(config)}
    return json.loads(json.dumps(record))  # lists and floats as the file holds them


def _stored_result(path: epath.Path, step: int, config: ml_collections.ConfigDict,
                   extra: dict[str, ml_collections.ConfigDict], train_loss: float | None = None) -> dict | None:
    """The finished run's final_metrics.json, if it holds step `step`'s scores, scored as this config scores
    (`scored_with`); None (score again) when it is an earlier finish's (the run was extended, then stopped before
    writing its own), another run's of the same length (its `train_loss` is not the checkpoint's: the workdir's
    checkpoints were deleted and a new run killed before writing its own), was scored with another split, label
    kind, test set or few-shot setting, or records none (written before final_metrics.json recorded what it was
    scored with)."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        logging.warning("%s cannot be read (%s): scoring the run again", path, e)
        return None
    if not isinstance(result, dict):
        logging.warning("%s holds %s, not a dict of scores: scoring the run again", path, type(result).__name__)
        return None
    if result.get("step") != step:
        logging.warning("%s holds step %s's scores, not the last checkpoint's (%d): scoring it again", path,
                        result.get("step"), step)
        return None
    if train_loss is not None and result.get("train_loss") != train_loss:
        logging.warning("%s holds another run's scores (train_loss %s, the checkpoint's %s): scoring it again", path,
                        result.get("train_loss"), train_loss)
        return None
    recorded, wanted = result.get("scored_with"), scored_with(config, extra)
    if not isinstance(recorded, dict):
        logging.warning("%s does not record what it was scored with (an older version wrote it): scoring the run "
                        "again", path)
        return None
    changed = sorted(key for key in wanted.keys() | recorded.keys() if wanted.get(key) != recorded.get(key))
    if changed:
        logging.warning("%s was scored with other settings (%s there, %s now): scoring the run again", path,
                        {key: recorded.get(key) for key in changed}, {key: wanted.get(key) for key in changed})
        return None
    return result


def _final_result(config: ml_collections.ConfigDict, step: int, train_loss: float | None,
                  evaluations: Evaluations, extra_configs: dict[str, ml_collections.ConfigDict]) -> dict:
    """final_metrics.json: the eval split's metrics of the params, "extra_evals" (each test set's), under "ema"
    the same of the Polyak average, and "scored_with" (`scored_with`, of the `extra_evals.eval_configs` result
    `extra_configs`); `evaluations` is `_evaluate_weights`'s result per weight set."""
    metrics, extra = evaluations["params"]
    result = {"step": step, "train_loss": train_loss, **_test_metrics(config, metrics),
              "eval_split": config.eval_split, "scored_with": scored_with(config, extra_configs)}
    if extra:
        result["extra_evals"] = extra
    if "ema" in evaluations:
        metrics, extra = evaluations["ema"]
        result["ema"] = {**_test_metrics(config, metrics), **({"extra_evals": extra} if extra else {})}
    return result


def _metrics_text(metrics: dict[str, float], percent: bool = False) -> str:
    return ", ".join(f"{k} {100 * v:.2f}%" if percent else f"{k} {v:.4f}" for k, v in metrics.items())


def _extra_steps(extra: dict[str, ml_collections.ConfigDict], mesh: Mesh) -> ExtraSteps:
    """{name: (config, its compiled eval step)} of the `extra_evals.eval_configs` result `extra`."""
    return {name: (extra_config, make_eval_step(extra_config, mesh)) for name, extra_config in extra.items()}


def _evaluate_extra(extra_steps: ExtraSteps, params: Any, mesh: Mesh, when: str | None = None, label: str = ""
                    ) -> dict[str, dict[str, float]]:
    """{name: metrics} of each `config.extra_evals` test set, reported as they come ("eval of NAME[LABEL] WHEN:
    ...", WHEN by default "on SPLIT"); a data error names the entry, not the run's own eval split."""
    from vit_jax import data

    results = {}
    for name, (extra_config, eval_step) in extra_steps.items():
        try:
            results[name] = evaluate(extra_config, eval_step, params, mesh)
        except data.DatasetError as e:
            raise data.DatasetError(f"config.extra_evals entry '{extra_config.dataset},{extra_config.eval_split}' "
                                    f"({name}): {e}") from None
        _report(f"eval of {name}{label} {when or 'on ' + extra_config.eval_split}: {_metrics_text(results[name])}")
    return results


def _has_fewshot(config: ml_collections.ConfigDict) -> bool:
    return "fewshot" in config and bool(config.fewshot.datasets)


def _log_fewshot_weights(scored: str) -> None:
    """Say, where a Polyak average exists, that few-shot scores `scored`'s raw params and not the average (few-shot
    of the average is not implemented): its numbers are not to be read as the average's."""
    logging.info("few-shot scores the raw params of %s, not their Polyak average (few-shot of the average is not "
                 "implemented; the eval split's scores of the average are reported apart)", scored)


def _fewshot_line(step: int, results: dict[str, float]) -> str:
    return f"few-shot at step {step}: {_metrics_text(results, percent=True)}"


def _log_fewshot(writer: Any, step: int, results: dict[str, float]) -> None:
    writer.write_scalars(step, {f"fewshot/{key}": value for key, value in results.items()})
    _report(_fewshot_line(step, results))


def _summary_line(result: dict) -> str:
    loss = "n/a" if result["train_loss"] is None else f"{result['train_loss']:.4f}"
    averaged = f" | Polyak average {100 * result['ema']['test_accuracy']:.2f}%" if "ema" in result else ""
    return (f"final: step {result['step']} | train loss {loss} | "
            f"{result['eval_split']} accuracy {100 * result['test_accuracy']:.2f}%{averaged}")


def _weight_sets(state: State) -> dict[str, Any]:
    """The parameters an evaluation scores: the params, and their Polyak average where the state keeps one."""
    return {"params": state["params"],
            **({"ema": optim.whole_average(state["ema"], state["params"])} if "ema" in state else {})}


def _evaluate_weights(config: ml_collections.ConfigDict, eval_step: Callable, extra_steps: ExtraSteps,
                      weights: dict[str, Any], mesh: Mesh, when: str, extra_when: str | None = None,
                      with_extra: bool = True) -> Evaluations:
    """{weight set: (eval split metrics, {extra test set: metrics})} of `_weight_sets`, each reported as it comes
    ("eval WHEN: ...", the average's "eval (Polyak average) WHEN: ..."; the extra test sets' as
    `_evaluate_extra` with `extra_when`)."""
    results = {}
    for kind, params in weights.items():
        label = " (Polyak average)" if kind == "ema" else ""
        metrics = evaluate(config, eval_step, params, mesh)
        _report(f"eval{label} {when}: {_metrics_text(metrics)}")
        extra = _evaluate_extra(extra_steps, params, mesh, extra_when, label) if extra_steps and with_extra else {}
        results[kind] = (metrics, extra)
    return results


def _log_evaluations(writer: Any, step: int, evaluations: Evaluations) -> None:
    """TensorBoard scalars eval/*, eval_<test set>/*, and eval_ema/*, eval_ema_<test set>/* for the average."""
    for kind, (metrics, extra) in evaluations.items():
        tag = "eval_ema" if kind == "ema" else "eval"
        scalars = {f"{tag}/{key}": value for key, value in metrics.items()}
        scalars.update({f"{tag}_{name}/{key}": value for name, values in extra.items()
                        for key, value in values.items()})
        writer.write_scalars(step, scalars)


# ----------------------------------------------------------------------------------------------------------------
# The run.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume) `config` in `workdir`, evaluating and checkpointing as configured; returns final metrics.

    A workdir whose latest checkpoint is at the last step reports its result without training again.
    """
    from vit_jax import data

    checkpoints.check_writable(workdir)
    mesh = sharding.make_mesh(config)
    info = data.dataset_info(config)
    extra_evals.eval_configs(config)  # prepared, with the model's classes: before anything is written
    if _has_fewshot(config):
        fewshot.check_datasets(config)  # prepared, with both splits: before anything is written
    num_steps = optim.total_steps(config, info.num_train_examples)
    created = _missing_dirs(workdir, checkpoints.checkpoint_dir(workdir))
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or a gs:// one
    lock, ckpt = checkpoints.WorkdirLock(workdir), None
    try:
        _decided_by_process_0(lock.acquire)  # before the manager, whose start removes another run's unfinished step
        ckpt = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints, remove_partial=True)
        state, data_state, meta = restore_or_init(config, mesh, num_steps, ckpt)
        extra = extra_evals.eval_configs(config)  # again: copies with the numerics restore_or_init set
        start_step = int(meta.get("step", 0))
        if start_step < num_steps:
            optim.check_frozen_head(config, state["params"])
        final_path = epath.Path(workdir) / FINAL_METRICS
        if start_step >= num_steps:
            result = _decided_by_process_0(_stored_result, final_path, start_step, config, extra,
                                           meta.get("train_loss"))
            if result is not None:
                for name, values in result.get("extra_evals", {}).items():  # scored lines are printed as they come
                    _report(f"eval of {name}: {_metrics_text(values)}")
                for name, values in result.get("ema", {}).get("extra_evals", {}).items():
                    _report(f"eval of {name} (Polyak average): {_metrics_text(values)}")
            else:
                evaluations = _evaluate_weights(config, make_eval_step(config, mesh), _extra_steps(extra, mesh),
                                                _weight_sets(state), mesh, f"of step {start_step}")
                result = _final_result(config, start_step, meta.get("train_loss"), evaluations, extra)
                if _has_fewshot(config):
                    if "ema" in state:
                        _log_fewshot_weights(f"step {start_step}")
                    result["fewshot"] = fewshot.evaluate(config, state["params"], mesh)
                write_final_metrics(workdir, result)
            _report(f"{workdir} already holds the finished run (step {start_step}).")
            if "fewshot" in result:
                _report(_fewshot_line(start_step, result["fewshot"]))
            _report(_summary_line(result))
            return result
        return _train_loop(config, workdir, mesh, num_steps, ckpt, state, data_state, meta, extra)
    except UserError:
        # Bad input found while starting (a foreign pre-trained file, undecodable data): leave no trace. The
        # manager closes first: its background threads may still be working in the directories removed.
        try:
            if ckpt is not None:
                ckpt.close()
        finally:
            lock.release()
            _remove_if_empty(created)
        raise
    finally:
        try:
            if ckpt is not None:
                ckpt.close()
        finally:
            lock.release()


def _missing_dirs(*paths: str) -> list[str]:
    """The directories of `paths` and their parents that do not exist yet, deepest first."""
    missing: list[str] = []
    for path in paths:
        if "://" in path:
            continue
        path = os.path.abspath(path)
        while not os.path.exists(path) and path not in missing:
            missing.append(path)
            path = os.path.dirname(path)
    return sorted(missing, key=lambda p: -p.count(os.sep))


def _remove_if_empty(directories: list[str]) -> None:
    """Remove those of `directories` (deepest first) that are empty: what a failed start created, nothing else."""
    for directory in directories:
        try:
            os.rmdir(directory)
        except OSError:  # not empty (something was written) or already gone
            pass


def _train_loop(config: ml_collections.ConfigDict, workdir: str, mesh: Mesh, num_steps: int,
                ckpt: checkpoints.Checkpoints, state: State, data_state: dict | None, meta: dict,
                extra: dict[str, ml_collections.ConfigDict] | None = None) -> dict:
    """Steps from the state's step to `num_steps`: log, profile, eval, checkpoint, stop on preemption or NaN."""
    from clu import parameter_overview

    from vit_jax import data

    is_chief = jax.process_index() == 0
    start_step = int(meta.get("step", 0))
    # The data first: a dataset that cannot feed the run fails before anything is written to the workdir.
    train_iter = data.make_train_iterator(config, sharding.batch_sharding(mesh))
    writer: metric_writer.Writer | None = None
    try:
        if data_state is None:
            restarts = "was written by a different number of processes"
        elif not train_iter.set_state(data_state):
            restarts = f"is of another version of the input pipeline (state version {data_state.get('version')})"
        else:
            restarts = ""
        if restarts and start_step:  # new seeds: the same ones would replay the examples of steps 1..start_step
            train_iter.restart(start_step, restarts)
        _agree_on_stream(train_iter, start_step)
        eval_every = config_check.interval(config.eval_every, num_steps)
        checkpoint_every = config_check.interval(config.checkpoint_every, num_steps)
        fewshot_every = config.fewshot.every_steps if _has_fewshot(config) else None
        represent = fewshot.make_representation_fn(config, mesh) if fewshot_every is not None else None
        if represent is not None and "ema" in state:
            _log_fewshot_weights("this run")
        last_fewshot: dict[str, float] | None = None
        # A fresh run's baseline at initialisation, before anything is written: it also checks that every class has
        # the shots (an error here leaves no trace in the workdir).
        first_fewshot = (fewshot.evaluate(config, state["params"], mesh, represent)
                         if represent is not None and start_step == 0 else None)
        writer = metric_writer.create(workdir, events=is_chief)
        if start_step == 0:
            writer.write_hparams({k: v for k, v in _flat_config(config).items()})
        if first_fewshot is not None:
            _log_fewshot(writer, 0, first_fewshot)
        fully_addressable = all(x.is_fully_addressable for x in jax.tree.leaves(state["params"]))
        parameter_overview.log_parameter_overview(jax.device_get(state["params"]) if fully_addressable else
                                                  state["params"], include_stats=fully_addressable,
                                                  jax_logging_process=0)

        train_step = make_train_step(config, mesh, num_steps)
        eval_step = make_eval_step(config, mesh)
        extra_steps = _extra_steps(extra or {}, mesh)
        flops = step_flops(config, mesh, num_steps, train_step)
        peak = peak_flops_per_device()
        watcher = checkpoints.PreemptionWatcher()
        # gloo's CPU collectives can deadlock with many steps in flight across processes: keep them in lock step.
        block_each_step = jax.process_count() > 1 and jax.devices()[0].platform == "cpu"
    except BaseException:
        train_iter.close()  # its worker processes and reader threads: a start that fails leaks none
        if writer is not None:
            writer.close()
        raise

    pending: list[tuple[int, dict[str, Any]]] = []  # device arrays, or host floats once checked
    # The steps before `pending` since the last log line, summed: a resumed run starts with its checkpoint's, so its
    # first line averages the whole interval, as the uninterrupted run's does.
    carried = meta["interval"] if isinstance(meta.get("interval"), dict) else _interval([])
    train_loss = meta.get("train_loss")
    last_evaluations: Evaluations = {}
    profile_start = None
    timer_step, timer_start = start_step, time.perf_counter()
    step = start_step

    def _evaluate_and_log(step: int, weights: dict[str, Any], with_extra: bool) -> None:
        nonlocal last_evaluations
        last_evaluations = _evaluate_weights(config, eval_step, extra_steps, weights, mesh, f"at step {step}",
                                             f"at step {step}", with_extra=with_extra)
        _log_evaluations(writer, step, last_evaluations)

    try:
        while step < num_steps:
            batch = next(train_iter)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            if block_each_step:
                jax.block_until_ready(metrics)
            preempted = watcher.reached(step)

            logs = step % config.log_every == 0 or step == num_steps
            if logs or preempted:
                interval = _interval(_check_finite(pending), carried)
                pending = []
                carried = _interval([]) if logs else interval  # a preemption's line, off the schedule: kept
                means = {f"train/{key}": total / interval["steps"] for key, total in interval["sums"].items()}
                train_loss = means["train/loss"]
                now = time.perf_counter()
                # The first interval includes compilation: the rate is measured from the first log on.
                seconds_per_step = (now - timer_start) / max(step - timer_step, 1)
                images_per_second = config.batch_size / seconds_per_step
                writer.write_scalars(step, {**means, "train/images_per_second": images_per_second})
                _report(progress_line(step, num_steps, train_loss, images_per_second, seconds_per_step, flops, peak))
                timer_step, timer_start = step, now
                if config.profile_steps and profile_start is None and is_chief:
                    profile_start = step
                    jax.profiler.start_trace(os.path.join(workdir, "profile"))
            if profile_start is not None and step == profile_start + config.profile_steps:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                logging.info("profile of steps %d-%d written to %s", profile_start + 1, step,
                             os.path.join(workdir, "profile"))

            evaluates = step % eval_every == 0 or step == num_steps
            scores_fewshot = (represent is not None and not preempted
                              and (step == num_steps or bool(fewshot_every and step % fewshot_every == 0)))
            if (evaluates or scores_fewshot) and pending:
                # Never score a state that has diverged (NaN params: few-shot's solver would fail on them). The
                # pass waits for the steps in flight anyway; the values fetched are kept for the next log line.
                pending = _check_finite(pending)
            if evaluates and not preempted:  # preempted: after the save, below
                _, seconds = _paused(state, _evaluate_and_log, step, _weight_sets(state), True)
                timer_start += seconds  # the progress line's rate counts training time only

            if step % checkpoint_every == 0 or step == num_steps or preempted:
                pending = _check_finite(pending)  # never save a state that has diverged
                ckpt.save(step, state["params"], state["opt_state"],
                          {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(),
                           "train_loss": train_loss, "num_steps": num_steps, "config": config.to_json_best_effort(),
                           "interval": _interval(pending, carried)},  # what the next log line averages too
                          train_iter.get_state(),
                          ema=_weight_sets(state).get("ema"))
            # After the save (a failure loses no step) and never on the way out of a preemption (a long pass).
            if scores_fewshot:
                last_fewshot, seconds = _paused(state, fewshot.evaluate, config, state["params"], mesh, represent)
                _log_fewshot(writer, step, last_fewshot)
                timer_start += seconds
            if preempted:
                ckpt.wait()
                if jax.process_count() > 1:  # all saved before any exits: a launcher may kill the rest at the first
                    # exit (srun --kill-on-bad-exit, exit code 75)
                    multihost_utils.sync_global_devices("vit_jax: preemption checkpoint saved")
                _report(f"{'interrupted' if watcher.interrupted else 'preempted'}: saved a checkpoint at step "
                        f"{step}; rerun the same command to resume")
                # The params' score, within the grace period if it allows (not after a Ctrl-C: the user asked to
                # stop); the last step's full evaluation is the rerun's.
                if evaluates and step < num_steps and not watcher.interrupted:
                    _evaluate_and_log(step, {"params": state["params"]}, with_extra=False)
                writer.flush()
                return {"step": step, "train_loss": train_loss, "preempted": True,
                        "interrupted": watcher.interrupted}
        ckpt.wait()  # the last checkpoint is on disk (or its failure raised) before final_metrics.json names it
    finally:
        watcher.close()
        train_iter.close()  # its worker processes and reader threads (a notebook may start the next run)
        if profile_start is not None and step < profile_start + config.profile_steps:
            jax.profiler.stop_trace()
        writer.flush()
        writer.close()

    result = _final_result(config, step, train_loss, last_evaluations, extra or {})
    if last_fewshot is not None:
        result["fewshot"] = last_fewshot
    write_final_metrics(workdir, result)
    _report(_summary_line(result))
    return result


def _agree_on_stream(train_iter: Any, start_step: int) -> None:
    """Restart every process's data stream at `start_step` unless all resumed in the same one: each process decides
    alone whether its saved position still holds (a corrupt image skipped on one host can make a data_workers
    change continue on some and restart on others), and processes in different streams draw the shared mixup
    weights of different steps."""
    streams = checkpoints.gather_json(train_iter.stream())
    if any(stream != streams[0] for stream in streams):
        train_iter.restart(start_step, f"left the processes in different streams ([start step, batches] per "
                                       f"process: {streams})")


def _paused(state: State, run: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`run(*args)`'s result and the seconds it took once the steps in flight are done (they count as training
    time: the progress line's rate leaves out the pass alone, wherever it falls between two log steps)."""
    jax.block_until_ready(state)
    began = time.perf_counter()
    result = run(*args)
    return result, time.perf_counter() - began


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Scalar config fields as `a.b` -> value (TensorBoard hparams)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in _flat_config(value).items()})
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
    return out


EVAL_READ_ATTEMPTS = 3  # reads of the latest step by an evaluator whose steps a training run keeps deleting


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, mode: str = "eval") -> dict[str, float]:
    """--mode=eval: evaluate the latest checkpoint in `workdir` (else `config.pretrained`) on the eval split,
    and on each `config.extra_evals` test set (its metrics as "<dataset>/top1", ...).

    --mode=fewshot: few-shot linear evaluation of its features on `config.fewshot.datasets` instead; the
    checkpoint's head is not read, and `config.dataset` need not be prepared. It scores the raw params: a
    checkpoint's Polyak average is not read (an INFO line says so).
    """
    from vit_jax import data

    if mode not in ("eval", "fewshot"):
        raise ValueError(f"mode={mode!r}: expected 'eval' or 'fewshot'")
    if mode == "fewshot" and not _has_fewshot(config):
        raise UserError("--mode=fewshot needs datasets to evaluate on: set --config.fewshot.datasets, e.g. "
                        "--config.fewshot.datasets=oxford_iiit_pet,train,test (dataset,train_split,test_split)")
    mesh = sharding.make_mesh(config)
    extra = {}
    if mode == "eval":  # the eval split only: ImageNet ReaL and ImageNet-v2 have no other
        data.dataset_info(config, train=False)
        extra = extra_evals.eval_configs(config)  # checked before a checkpoint is read
    else:  # prepared, with both splits, before a checkpoint is read
        fewshot.check_datasets(config)
    num_steps = _default_num_steps(config)  # only the parameters are read: the schedule's length does not matter
    created = _missing_dirs(workdir, checkpoints.checkpoint_dir(workdir))
    ckpt = checkpoints.Checkpoints(workdir, keep=config.keep_checkpoints)
    try:
        latest = _decided_by_process_0(ckpt.latest_step)
        if latest is None and not config.pretrained:
            raise UserError(f"--mode={mode} found no checkpoint in {ckpt.directory} and config.pretrained is empty: "
                            "train first, or pass --config.pretrained=PATH")
        for attempt in range(EVAL_READ_ATTEMPTS):  # an evaluator beside the training run: keep-N deletes steps
            try:
                state, _, meta = restore_or_init(config, mesh, num_steps, ckpt, params_only=True,
                                                 require_head=mode == "eval", read_ema=mode == "eval")
                break
            except checkpoints.CheckpointReadError:
                newer = None if latest is None else _decided_by_process_0(ckpt.newer_if_removed, latest)
                if newer is None or attempt == EVAL_READ_ATTEMPTS - 1:
                    raise
                logging.warning("step %d was removed while it was read (a training run writing %s saved step %d "
                                "and keeps fewer): reading step %d", latest, ckpt.directory, newer, newer)
                latest = newer
        # Only to say so: few-shot does not read the average (process 0 logs, from its own view of the files).
        if mode == "fewshot" and "step" in meta and jax.process_index() == 0 and ckpt.has_ema(meta["step"]):
            _log_fewshot_weights(f"step {meta['step']} (the checkpoint holds an average: it is not read)")
    except UserError:
        try:
            ckpt.close()  # first: its background threads may still be working in the directories removed
        finally:
            _remove_if_empty(created)  # evaluating writes nothing, not even the directories a failed start made
        raise
    finally:
        ckpt.close()
    _remove_if_empty(created)  # evaluating writes nothing: not even the directories opening the manager made
    if mode == "fewshot":
        metrics = fewshot.evaluate(config, state["params"], mesh)
        source = f"step {meta['step']}" if "step" in meta else config.pretrained
        _report(f"few-shot of {source}: {_metrics_text(metrics, percent=True)}")
        return metrics
    # Each extra test set's configs copied again, with the restored numerics.
    extra_steps = _extra_steps(extra_evals.eval_configs(config), mesh) if extra else {}
    evaluations = _evaluate_weights(config, make_eval_step(config, mesh), extra_steps, _weight_sets(state), mesh,
                                    f"of step {meta.get('step', 0)} on {config.eval_split}")
    metrics = {}
    for kind, (values, extra_values) in evaluations.items():  # the average's as "ema/top1", "ema/<name>/top1", ...
        prefix = "ema/" if kind == "ema" else ""
        metrics.update({f"{prefix}{key}": value for key, value in values.items()})
        metrics.update({f"{prefix}{name}/{key}": value for name, test_set in extra_values.items()
                        for key, value in test_set.items()})
    return metrics
