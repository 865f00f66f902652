"""The training step: identical on 1 and 8 devices, gradient accumulation = one big batch, eval counts, NaN stop."""

import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.train_helpers import synthetic_batch, tiny_config, to_device
from vit_jax import checkpoints, sharding, train
from vit_jax.models.vit import build_model, unstack_blocks


def _run_steps(config, devices, num_steps=4):
    """`num_steps` steps on one fixed batch (so the loss must fall): losses, final params (host) and state."""
    mesh = sharding.make_mesh(config, devices)
    state = train.init_state(config, mesh, config.total_steps)
    step = train.make_train_step(config, mesh, config.total_steps)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, to_device(synthetic_batch(config, 0), sharding.batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), state


# Momentum SGD: updates are linear in the gradients, so layouts that only reorder float sums agree to round-off.
# (Adam divides by sqrt(v): for gradients that are zero in exact arithmetic, such as the attention key bias's,
# it blows round-off up to lr-sized steps, and no two summation orders agree.)
SGD = {"optimizer.name": "sgd", "optimizer.lr": 0.1, "optimizer.weight_decay": 0.0}


@pytest.fixture(scope="module")
def one_device_run():
    return _run_steps(tiny_config(**SGD, **{"mesh.data": 1, "optimizer.ema_decay": 0.5}), jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(4, 2, 1), (2, 2, 2)])
def test_step_on_8_devices_matches_1_device(one_device_run, mesh_shape):
    data, fsdp, model = mesh_shape
    config = tiny_config(**SGD, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.model": model,
                                   "optimizer.ema_decay": 0.5})
    losses, params, state = _run_steps(config, jax.devices())
    ref_losses, ref_params, ref_state = one_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]  # it learns: the comparison is not between two untouched inits
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)
    # The layout really is sharded: FSDP splits the embed axis, the model axis splits attention heads.
    query = state["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    expected = ("fsdp", "model" if model > 1 else None, None)
    assert tuple(query.sharding.spec) == expected
    # The optimizer state (momentum) is sharded like its params.
    momenta = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if "encoderblock_0" in jax.tree_util.keystr(path) and "query" in jax.tree_util.keystr(path)
               and leaf.ndim == 3]
    assert momenta and all(m.sharding.spec == query.sharding.spec for m in momenta)
    # So is the Polyak average, and it is the same average.
    average = state["ema"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
    assert average.sharding.spec == query.sharding.spec
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), jax.device_get(state["ema"]),
                 jax.device_get(ref_state["ema"]))


def test_gradient_accumulation_equals_one_big_batch(one_device_run):
    config = tiny_config(**SGD, **{"accum_steps": 4, "mesh.data": 2, "mesh.fsdp": 2})
    losses, params, _ = _run_steps(config, jax.devices()[:4])
    ref_losses, ref_params, _ = one_device_run
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)


def test_accumulated_step_matches_an_independent_optax_reference():
    """Params after one accumulated step against plain optax momentum SGD on the unsharded model."""
    config = tiny_config(**SGD, **{"accum_steps": 2, "mesh.data": 1, "optimizer.warmup_steps": 0})
    _, params, _ = _run_steps(config, jax.devices()[:1], num_steps=1)
    model = build_model(config.model, config.num_classes)
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    init = jax.device_get(train.init_state(config, mesh, config.total_steps)["params"])
    batch = synthetic_batch(config, 0)

    @jax.jit
    def reference_step(p):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch["image"])
            return optax.softmax_cross_entropy(logits, batch["label"]).mean()

        grads = jax.grad(loss_fn)(p)
        scale = jnp.minimum(1.0, 1.0 / optax.global_norm(grads))  # clip the global norm at 1
        return jax.tree.map(lambda w, g: w - 0.1 * scale * g, p, grads)  # lr 0.1, empty momentum at step 0

    expected = reference_step(init)
    assert not np.allclose(params["head"]["kernel"], init["head"]["kernel"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, expected)


def test_eval_step_counts_each_real_example_once():
    config = tiny_config(**{"mesh.data": 8, "eval_batch_size": 16})
    mesh = sharding.make_mesh(config, jax.devices())
    params = train.init_state(config, mesh, config.total_steps)["params"]
    # A random head: the zero-initialised one gives every class the same logit, and top-1/top-5 nothing to rank.
    head = jax.random.normal(jax.random.key(3), params["head"]["kernel"].shape) * 0.5
    params = {**params, "head": {**params["head"], "kernel": jax.device_put(head, params["head"]["kernel"].sharding)}}
    batch = synthetic_batch(config, 5)
    logits = np.asarray(build_model(config.model, config.num_classes).apply({"params": jax.device_get(params)},
                                                                            batch["image"]))
    # Labels by rank: rows 0-3 the top class, 4-7 the third, 8-10 the last; rows 11-15, padding, the top class.
    ranked = np.argsort(-logits, axis=-1)
    truth = np.concatenate([ranked[:4, 0], ranked[4:8, 2], ranked[8:11, -1], ranked[11:, 0]])
    batch["label"] = np.eye(config.num_classes, dtype=np.float32)[truth]
    mask = np.array([1.0] * 11 + [0.0] * 5, np.float32)
    device_batch = to_device({**batch, "mask": mask}, sharding.batch_sharding(mesh))
    sums = jax.device_get(train.make_eval_step(config, mesh)(params, device_batch))
    real = mask > 0
    losses = np.asarray(optax.softmax_cross_entropy(jnp.asarray(logits), batch["label"]))
    assert sums["count"] == 11
    assert (sums["top1"], sums["top5"]) == (4, 8)  # counting the padding would give (9, 13)
    np.testing.assert_allclose(sums["loss"], losses[real].sum(), rtol=1e-5)
    few = tiny_config(**{"mesh.data": 8, "eval_batch_size": 16, "num_classes": 5})
    few_params = train.init_state(few, mesh, few.total_steps)["params"]
    few_batch = to_device({**synthetic_batch(few, 5), "mask": mask}, sharding.batch_sharding(mesh))
    assert set(jax.device_get(train.make_eval_step(few, mesh)(few_params, few_batch))) == {
        "loss", "top1", "count"}  # top-5 of 5 classes is always right: not reported


def _sigmoid_cross_entropy_float64(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(batch,) sum over classes of -z log sigmoid(x) - (1 - z) log(1 - sigmoid(x)), in the stable form."""
    x, z = logits.astype(np.float64), labels.astype(np.float64)
    return (np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))).sum(axis=-1)


def test_multi_label_eval_counts_positive_guesses_and_sigmoid_loss_of_real_rows_only(monkeypatch):
    """label_kind="multi": top1 = the argmax class is a positive, top5 = one of the 5 largest is, loss = summed
    sigmoid cross-entropy; `evaluate` averages the sums of two batches over their 24 real rows with a label (a
    row without any counts for nothing, as in big_vision and ImageNet ReaL). The padding rows carry images and
    all-positive labels (a hit and a loss if they were counted), not the pipeline's zeros."""
    config = tiny_config(**{"mesh.data": 8, "eval_batch_size": 16, "label_kind": "multi"})
    mesh = sharding.make_mesh(config, jax.devices())
    params = jax.device_get(train.init_state(config, mesh, config.total_steps)["params"])
    rng = np.random.RandomState(7)
    # The head is zero-initialised (all logits equal, every argmax class 0): random, so the ranking means something.
    params["head"] = {"kernel": rng.normal(0, 1, params["head"]["kernel"].shape).astype(np.float32),
                      "bias": rng.normal(0, 1, params["head"]["bias"].shape).astype(np.float32)}
    images = rng.uniform(-1, 1, (32, 16, 16, 3)).astype(np.float32)
    labels = (rng.uniform(size=(32, 10)) < 0.3).astype(np.float32)
    labels[3] = 0.0  # no positive at all: not scored (it would be a miss for top1 and top5, and a loss)
    labels[5] = 1.0  # every class positive: a hit for both
    mask = np.ones(32, np.float32)
    mask[25:] = 0.0  # the second batch: 9 real rows, then 7 of padding
    labels[25:] = 1.0
    logits = np.asarray(jax.jit(build_model(config.model, config.num_classes).apply)({"params": params}, images),
                        np.float64)
    real = (mask > 0) & (labels.max(axis=-1) > 0)
    assert real.sum() == 24
    ranked = np.argsort(-logits, axis=-1)
    top1_hits = labels[np.arange(32), ranked[:, 0]] > 0
    top5_hits = (np.take_along_axis(labels, ranked[:, :5], axis=-1) > 0).any(-1)
    losses = _sigmoid_cross_entropy_float64(logits, labels)
    assert 0 < top1_hits[real].sum() < top5_hits[real].sum() < 24  # neither test is trivially all or nothing

    eval_step = train.make_eval_step(config, mesh)
    batches = [to_device({"image": images[s], "label": labels[s], "mask": mask[s]}, sharding.batch_sharding(mesh))
               for s in (slice(0, 16), slice(16, 32))]
    for batch, rows in zip(batches, (slice(0, 16), slice(16, 32))):
        sums = jax.device_get(eval_step(params, batch))
        kept = real[rows]
        assert set(sums) == {"loss", "top1", "top5", "count"}
        assert sums["count"] == kept.sum()
        assert sums["top1"] == top1_hits[rows][kept].sum() and sums["top5"] == top5_hits[rows][kept].sum()
        np.testing.assert_allclose(sums["loss"], losses[rows][kept].sum(), rtol=1e-5)

    from vit_jax import data
    monkeypatch.setattr(data, "make_eval_iterator", lambda config, batch_sharding, keys: iter(batches))
    metrics = train.evaluate(config, eval_step, params, mesh)
    assert set(metrics) == {"loss", "top1", "top5"}
    np.testing.assert_allclose(metrics["loss"], losses[real].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["top1"], top1_hits[real].mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["top5"], top5_hits[real].mean(), rtol=1e-6)


def test_nonfinite_loss_names_the_first_bad_step():
    pending = [(7, {"loss": jnp.float32(0.5)}), (8, {"loss": jnp.float32(np.nan)}), (9, {"loss": jnp.float32(np.inf)})]
    with pytest.raises(train.NonFiniteLossError, match="at step 8"):
        train._check_finite(pending)
    assert [s for s, _ in train._check_finite(pending[:1])] == [7]
    # A finite loss whose gradients are not: the params that step leaves are NaN.
    with pytest.raises(train.NonFiniteLossError, match="the gradient norm is inf at step 7"):
        train._check_finite([(7, {"loss": jnp.float32(0.5), "grad_norm": jnp.float32(np.inf)})])
    fetched = train._check_finite([(7, {"loss": jnp.float32(0.5), "grad_norm": jnp.float32(2.0)})])
    assert train._check_finite(fetched) == fetched == [(7, {"loss": 0.5, "grad_norm": 2.0})]  # host values again


def test_abstract_state_carries_the_shardings_the_step_is_compiled_for():
    config = tiny_config(**SGD, **{"mesh.data": 4, "mesh.fsdp": 2, "optimizer.ema_decay": 0.5})  # step_on_8's step
    mesh = sharding.make_mesh(config, jax.devices())
    state = train.abstract_state(config, mesh)
    compiled = train.make_train_step(config, mesh).lower(state, train.abstract_batch(config, mesh)).compile()
    (state_shardings, batch_shardings), _ = compiled.input_shardings
    for abstract, compiled_sharding in zip(jax.tree.leaves(state), jax.tree.leaves(state_shardings)):
        assert abstract.sharding.is_equivalent_to(compiled_sharding, len(abstract.shape))
    assert batch_shardings["image"].spec == sharding.batch_sharding(mesh).spec


def test_a_fresh_state_draws_the_blocks_as_the_scanned_model_does_and_lays_them_out_as_the_plain_ones():
    """A plain model's blocks are drawn as its scanned twin's (XLA compiles one block's initialisers) and split into
    `encoderblock_{i}`: the params of a scan=True run's fresh state, each block its own draw, sharded on an FSDP
    mesh as the plain model's params are."""
    config = tiny_config(**{"model.num_layers": 3, "mesh.data": 4, "mesh.fsdp": 2})
    mesh = sharding.make_mesh(config, jax.devices())
    plain = train.init_state(config, mesh, config.total_steps)
    scan_config = tiny_config(**{"model.num_layers": 3, "model.scan": True})
    scanned = train.init_state(scan_config, sharding.make_mesh(scan_config, jax.devices()[:1]), 10)
    expected = unstack_blocks(jax.device_get(scanned["params"]))
    got = jax.device_get(plain["params"])
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    kernels = [got["Transformer"][f"encoderblock_{i}"]["MlpBlock_3"]["Dense_0"]["kernel"] for i in range(3)]
    assert not np.array_equal(kernels[0], kernels[1]) and not np.array_equal(kernels[1], kernels[2])
    wanted = train.state_shardings(config, mesh, config.total_steps)["params"]
    for leaf, want in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(wanted)):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(plain["params"]))


def test_step_flops_counts_every_block_and_micro_batch_near_3x_the_analytic_forward():
    """XLA counts a loop body once: scanned blocks and accumulation scans must still count the whole step, and a
    training step costs about 3 forward passes (forward + two backward matmuls each)."""
    from vit_jax.summary import layer_table

    def flops(**overrides):
        # Batch 128: the once-per-step optimizer update, which step_flops counts once per micro-batch, stays small.
        config = tiny_config(**{"mesh.data": 1, "batch_size": 128, **overrides})
        return train.step_flops(config, sharding.make_mesh(config, jax.devices()[:1]), config.total_steps), config

    plain, config = flops()
    accumulated, _ = flops(**{"accum_steps": 4, "model.scan": True})
    assert accumulated == pytest.approx(plain, rel=0.01)
    analytic = 3 * sum(row.flops for row in layer_table(config)) * config.batch_size
    assert plain == pytest.approx(analytic, rel=0.10)
    assert accumulated == pytest.approx(analytic, rel=0.10)


def test_the_runs_step_is_traced_once_when_its_flops_are_counted_from_it():
    """step_flops lowers the run's own jitted step (no scan, no accumulation): its first call reuses that trace and
    lowering (a second trace was ~1.5 s of every run's start) and counts the same FLOPs as a step of its own."""
    config = tiny_config(**{"mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    state = jax.tree.map(lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding),
                         train.abstract_state(config, mesh, config.total_steps))  # as the run's, without an init
    with mock.patch.object(train, "_loss_fn", wraps=train._loss_fn) as loss_fn:
        step = train.make_train_step(config, mesh, config.total_steps)
        flops = train.step_flops(config, mesh, config.total_steps, step)
        step(state, to_device(synthetic_batch(config, 0), sharding.batch_sharding(mesh)))
    assert loss_fn.call_count == 1
    assert flops == train.step_flops(config, mesh, config.total_steps) > 0


def test_progress_line_mfu_eta_and_throughput():
    assert jax.device_count() == 8  # tests/conftest.py: MFU divides by the peak of all 8 devices
    # 2e12 FLOP in 1 s on 8 devices of 1e12 FLOP/s peak: 25%; 100 steps left at 1 s/step: 1m40s.
    assert train.progress_line(400, 500, 0.21, 850.0, 1.0, 2e12, 1e12) == (
        "step 400/500 | loss 0.2100 | 850 img/s | ETA 1m40s | 2 TFLOP/s | MFU 25.0%")
    # 3700 steps at 0.5 s: 1850 s (under an hour: minutes and seconds); 3e12 FLOP in 0.5 s = 6 TFLOP/s of
    # 8 x 2e12: 37.5%.
    assert train.progress_line(300, 4000, 1.23456, 12345.6, 0.5, 3e12, 2e12) == (
        "step 300/4000 | loss 1.2346 | 12,346 img/s | ETA 30m50s | 6 TFLOP/s | MFU 37.5%")
    # 7322 s: over an hour, hours and minutes; an unknown device peak gives no MFU.
    assert train.progress_line(0, 7322, 2.5, 8.0, 1.0, 1.5e12, None) == (
        "step 0/7322 | loss 2.5000 | 8 img/s | ETA 2h02m | 1.5 TFLOP/s | MFU n/a")
    assert train.peak_flops_per_device() is None  # a CPU has no entry in PEAK_FLOPS


def _main(*args, timeout=900):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # VIT_JAX_HUGEPAGES=0: no huge-page re-exec of each command (vit_jax.hugepages, tested in test_hugepages.py).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root, "VIT_JAX_HUGEPAGES": "0"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "vit_jax.main", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_demo_reaches_95_percent_and_a_rerun_reports_without_training(tmp_path):
    import json

    workdir = tmp_path / "demo"
    data = f"--config.tfds_data_dir={tmp_path / 'tfds'}"
    result = _main("--config=configs/demo.py", f"--workdir={workdir}", data)
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["step"] == 1500 and final["test_accuracy"] >= 0.95
    assert "test accuracy" in result.stdout.splitlines()[-1]
    assert list((workdir / "checkpoints").iterdir()) and list(workdir.glob("events.out.tfevents.*"))
    again = _main("--config=configs/demo.py", f"--workdir={workdir}", data, timeout=300)
    assert again.returncode == 0 and "already holds the finished run" in again.stdout
    assert "step 100/" not in again.stdout


def test_pin_pretrained_takes_process_0s_step_and_refuses_disagreement(tmp_path):
    from vit_jax.interop import CheckpointError

    workdir = tmp_path / "pretrain"
    for step in (3, 5):
        (workdir / "checkpoints" / str(step) / "params").mkdir(parents=True)
    latest, earlier = str(workdir / "checkpoints" / "5"), str(workdir / "checkpoints" / "3")
    assert train.pin_pretrained(str(workdir)) == latest  # one process: nothing gathered
    sent = []
    assert train.pin_pretrained(str(workdir), lambda x: sent.append(int(x)) or np.array([x, 5])) == latest
    assert sent == [5]
    assert train.pin_pretrained(str(workdir), lambda x: np.array([3, x])) == earlier  # process 0 saw 3 as latest
    with pytest.raises(CheckpointError, match=r"pretrain is not a workdir \(used as it is\) for process 0, step 5 "
                                              r"for process 1: every process must see the same checkpoint"):
        train.pin_pretrained(str(workdir), lambda x: np.array([-1, x]))
    npz = tmp_path / "vit.npz"
    npz.write_bytes(b"")
    assert train.pin_pretrained(str(npz), lambda x: np.array([x, x])) == str(npz)


def test_pin_pretrained_gathers_before_raising_so_no_process_waits_for_one_that_cannot_read_the_path(tmp_path):
    from vit_jax.interop import CheckpointError, remote

    unfinished = tmp_path / "pretrain"
    (unfinished / "checkpoints").mkdir(parents=True)  # e.g. the workdir on this host, not yet synced
    sent = []
    with pytest.raises(CheckpointError, match="holds no finished checkpoint yet"):  # its own error, after the gather
        train.pin_pretrained(str(unfinished), lambda x: sent.append(int(x)) or np.array([x, 5]))
    assert len(sent) == 1
    denied = PermissionError(13, "Permission denied")  # not a CheckpointError: raised after the gather all the same
    with pytest.raises(PermissionError), mock.patch.object(remote, "pinned_step", side_effect=denied):
        train.pin_pretrained(str(unfinished), lambda x: sent.append(int(x)) or np.array([x, 5]))
    assert sent == [-2, -2]
    # A process that could read it (step 5) stops too, naming the process that could not.
    (unfinished / "checkpoints" / "5" / "params").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"pretrain is step 5 for process 0, unreadable \(see that process's "
                                              r"log\) for process 1: every process must see the same checkpoint"):
        train.pin_pretrained(str(unfinished), lambda x: np.array([x, -2]))


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_linear_probe_updates_the_head_alone_and_never_computes_the_backbones_gradients(accum_steps):
    probe = tiny_config(**{"optimizer.freeze": "(?!head/).*", "mesh.data": 1, "accum_steps": accum_steps})
    mesh = sharding.make_mesh(probe, jax.devices()[:1])
    state = train.init_state(probe, mesh, probe.total_steps)
    before = jax.device_get(state["params"])
    step = train.make_train_step(probe, mesh, probe.total_steps)
    for seed in range(2):
        state, metrics = step(state, to_device(synthetic_batch(probe, seed), sharding.batch_sharding(mesh)))
    after = jax.device_get(state["params"])
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        moved = bool(np.any(old != new))
        assert moved == jax.tree_util.keystr(path).startswith("['head']"), jax.tree_util.keystr(path)

    def compiled_flops(config):
        lowered = train.make_train_step(config, mesh, config.total_steps).lower(
            train.abstract_state(config, mesh, config.total_steps), train.abstract_batch(config, mesh))
        cost = lowered.compile().cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["flops"])

    # Forward ~1/3 of forward + backward: XLA drops the frozen gradients (and the backward pass below the head).
    full = tiny_config(**{"mesh.data": 1, "accum_steps": accum_steps})
    assert compiled_flops(probe) < 0.5 * compiled_flops(full)
    # The progress line's TFLOP/s and MFU count that smaller step, not a full one.
    assert train.step_flops(probe, mesh, None) < 0.5 * train.step_flops(full, mesh, None)
    if accum_steps == 1:  # (a compiled scan's body is counted once)
        assert train.step_flops(probe, mesh, None) == pytest.approx(compiled_flops(probe), rel=0.02)


def test_evaluating_a_fresh_model_builds_its_params_alone(tmp_path):
    """No checkpoint and no pre-trained weights, params_only: the seed's params, no optimizer state, no average."""
    from vit_jax import checkpoints

    config = tiny_config(**{"optimizer.ema_decay": 0.9, "mesh.data": 1})
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    ckpt = checkpoints.Checkpoints(str(tmp_path / "run"), keep=1)
    try:
        state, data_state, meta = train.restore_or_init(config, mesh, config.total_steps, ckpt, params_only=True)
    finally:
        ckpt.close()
    assert set(state) == {"step", "params", "opt_state", "rng"} and state["opt_state"] is None
    assert data_state is None and meta == {} and int(state["step"]) == 0
    full = train.init_state(config, mesh, config.total_steps)  # what training would start from
    for got, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(full["params"])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(state["rng"]), np.asarray(full["rng"]))


def _digits_run_config(tmp_path, **overrides):
    from vit_jax import config_check

    config = tiny_config(**{"dataset": "digits", "train_split": "train", "eval_split": "test",
                            "tfds_data_dir": str(tmp_path / "tfds"), "pp.inception_crop": False,
                            "optimizer.warmup_steps": 1, "eval_batch_size": 128, **overrides})
    config_check.validate(config, 8)
    return config


def test_the_rate_leaves_out_an_evaluation_between_two_log_steps(tmp_path, monkeypatch):
    """A fake clock: 1 s per train step, 1000 s per evaluation; every progress line must read 1 s per step, also
    the one after an evaluation that fell between two log steps (step 2 and 6 of log steps 4 and 8)."""
    from types import SimpleNamespace

    from vit_jax.data import pipeline

    clock = [0.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    next_batch, evaluate = pipeline.TrainIterator.__next__, train._evaluate_weights

    def slow_batch(self):  # one per step
        clock[0] += 1.0
        return next_batch(self)

    def slow_evaluation(*args, **kwargs):
        clock[0] += 1000.0
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", slow_batch)
    monkeypatch.setattr(train, "_evaluate_weights", slow_evaluation)
    lines = []
    monkeypatch.setattr(train, "progress_line", lambda step, num_steps, loss, rate, seconds, *a: lines.append(
        (step, seconds)) or "")
    config = _digits_run_config(tmp_path, total_steps=8, log_every=4, eval_every=2, checkpoint_every=1000)
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert lines == [(4, 1.0), (8, 1.0)]


def test_a_preemption_on_an_evaluation_step_saves_before_it_evaluates(tmp_path, monkeypatch):
    """The grace period goes to the checkpoint: the params' evaluation of that step comes after the save."""
    import os

    from vit_jax import checkpoints

    class PreemptedAtStep2(checkpoints.PreemptionWatcher):
        def reached(self, step):
            return step == 2

    workdir = str(tmp_path / "run")
    evaluated = []
    evaluate = train._evaluate_weights

    def recording(config, eval_step, extra_steps, weights, *args, **kwargs):
        evaluated.append((sorted(weights), os.path.isdir(os.path.join(workdir, "checkpoints", "2"))))
        return evaluate(config, eval_step, extra_steps, weights, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "PreemptionWatcher", PreemptedAtStep2)
    monkeypatch.setattr(train, "_evaluate_weights", recording)
    config = _digits_run_config(tmp_path, **{"total_steps": 4, "eval_every": 2, "checkpoint_every": 1000,
                                             "optimizer.ema_decay": 0.5})
    result = train.train_and_evaluate(config, workdir)
    assert result["preempted"] and result["step"] == 2
    assert evaluated == [(["params"], True)]  # once, the params alone, the checkpoint already on disk


def test_a_run_preempted_between_log_steps_logs_the_whole_interval_after_resuming(tmp_path, monkeypatch):
    """Logs at steps 4 and 6; preempted at step 5 (its own line, steps 5 alone) and resumed: the step-6 line and
    final_metrics.json's train_loss average steps 5 and 6, as the uninterrupted run's (they read step 6 alone)."""
    from vit_jax import checkpoints

    class PreemptedAtStep5(checkpoints.PreemptionWatcher):
        def reached(self, step):
            return step == 5

    config = _digits_run_config(tmp_path, **{"total_steps": 8, "log_every": 4, "eval_every": 1000,
                                             "checkpoint_every": 1000})
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    with monkeypatch.context() as patch:
        patch.setattr(checkpoints, "PreemptionWatcher", PreemptedAtStep5)
        assert train.train_and_evaluate(config, str(tmp_path / "cut"))["preempted"]
    resumed = train.train_and_evaluate(config, str(tmp_path / "cut"))
    assert resumed["step"] == whole["step"] == 8
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)


def test_a_finished_workdir_scores_again_what_its_final_metrics_lack(tmp_path, caplog):
    """final_metrics.json of an earlier finish (the run extended, then stopped before writing its own), one
    without a test set the config now adds, one cut short, or one of another eval split, is not returned as the
    finished run's result: the run is scored again. (A finished run's average, extra test sets and few-shot
    scored again, under the default flags of a multi-label run: test_extra_evals.py.)"""
    import json
    import logging
    import os

    workdir = str(tmp_path / "run")
    config = _digits_run_config(tmp_path, total_steps=2, eval_every=2, checkpoint_every=2)
    first = train.train_and_evaluate(config, workdir)
    path = os.path.join(workdir, train.FINAL_METRICS)
    with open(path) as f:
        stored = json.load(f)
    with open(path, "w") as f:
        json.dump({**stored, "step": 1, "test_accuracy": -1.0}, f)  # an earlier finish's file
    with caplog.at_level(logging.WARNING):
        again = train.train_and_evaluate(config, workdir)
    assert "holds step 1's scores, not the last checkpoint's (2): scoring it again" in caplog.text
    assert again["step"] == 2 and again["test_accuracy"] == pytest.approx(first["test_accuracy"])
    extended = _digits_run_config(tmp_path, total_steps=2, eval_every=2, checkpoint_every=2,
                                  extra_evals=("digits,train",))
    scored = train.train_and_evaluate(extended, workdir)
    assert set(scored["extra_evals"]) == {"digits"} and scored["test_accuracy"] == pytest.approx(again["test_accuracy"])
    with open(path) as f:
        current = json.load(f)
    assert current["extra_evals"] == scored["extra_evals"]
    with open(path, "w") as f:  # another run's of the same length and settings (its checkpoints deleted since)
        json.dump({**current, "train_loss": current["train_loss"] + 0.5, "test_accuracy": -1.0}, f)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        own = train.train_and_evaluate(extended, workdir)
    assert "holds another run's scores" in caplog.text
    assert own["test_accuracy"] == pytest.approx(scored["test_accuracy"])

    with open(path, "w") as f:
        f.write('{"step": 2, "test_acc')  # cut short (a kill or a full disk mid-write, before writes were atomic)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rescored = train.train_and_evaluate(extended, workdir)
    assert "cannot be read" in caplog.text and rescored["test_accuracy"] == pytest.approx(scored["test_accuracy"])
    assert train.FINAL_METRICS in os.listdir(workdir) and not any(".partial" in n for n in os.listdir(workdir))
    # Another eval split (the one scoring setting changed; which ones count: test_final_metrics_scored_with_other_
    # settings_are_not_reused), under another optimizer's config: a finished run is only scored (its optimizer
    # state is neither read nor checked against the config), on the train split now: --mode=eval's numbers of it.
    sgd = _digits_run_config(tmp_path, total_steps=2, eval_every=2, checkpoint_every=2, eval_split="train",
                             extra_evals=("digits,train",), **{"optimizer.name": "sgd"})
    on_train = train.train_and_evaluate(sgd, workdir)
    expected = train.evaluate_checkpoint(_digits_run_config(tmp_path, total_steps=2, eval_split="train"), workdir)
    assert on_train["eval_split"] == "train"
    assert on_train["test_accuracy"] == pytest.approx(expected["top1"])
    assert on_train["test_loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert on_train["test_loss"] == pytest.approx(scored["extra_evals"]["digits"]["loss"], rel=1e-6)
    # Not the test split's scores (after 2 steps both losses are near ln 10: 4e-4 apart, relatively).
    assert on_train["test_loss"] != pytest.approx(scored["test_loss"], rel=1e-5)


def _scoring_config(**overrides):
    """A config with an extra test set and a few-shot task, and its extra test sets' configs (no data read)."""
    import copy

    config = tiny_config(**{"eval_split": "test", "extra_evals": ("digits,validation",),
                            "fewshot.datasets": ("digits,train[:100],test",), "fewshot.shots": (1, 5),
                            "fewshot.seeds": 2, "fewshot.l2_reg": 1024.0, **overrides})
    extra = {}
    for entry in config.extra_evals:
        dataset, split = entry.split(",")
        extra[dataset] = copy.deepcopy(config)
        extra[dataset].dataset, extra[dataset].eval_split = dataset, split
    return config, extra


@pytest.mark.parametrize("change", [
    {"eval_split": "validation"}, {"label_kind": "multi"}, {"extra_evals": ("digits,test",)},
    {"fewshot.datasets": ("digits,train[:200],test",)}, {"fewshot.datasets": ("digits,train[:100],validation",)},
    {"fewshot.shots": (1,)}, {"fewshot.seeds": 3}, {"fewshot.l2_reg": 1.0}, {"fewshot.datasets": ()},
    {"pp.eval_crop_fraction": 0.875}, {"pp.antialias": True}, {"image_size": 32},
    {"dataset": "image_folder"}, {"tfds_data_dir": "/elsewhere"},
])
def test_final_metrics_scored_with_other_settings_are_not_reused(tmp_path, change):
    """final_metrics.json of the same step is reused only if it was scored as this config scores: the dataset
    and its directory (another dataset's scores were reported as this one's), the eval split, the label kind (the
    loss), the evaluation preprocessing, each extra test set's split and each few-shot task's splits, shots, seeds
    and l2."""
    config, extra = _scoring_config()
    stored = {"step": 5, "test_accuracy": 0.5, "scored_with": train.scored_with(config, extra)}
    train.write_final_metrics(str(tmp_path), stored)
    path = train.epath.Path(tmp_path) / train.FINAL_METRICS
    assert train._stored_result(path, 5, config, extra) == stored  # unchanged: read back
    assert train._stored_result(path, 5, *_scoring_config(**change)) is None
    # Scored again with the other settings: the first scores are kept beside (they were replaced, and lost).
    rescored = {"step": 5, "test_accuracy": 0.7, "scored_with": train.scored_with(*_scoring_config(**change))}
    for _ in range(2):  # the second time with the same settings: replaced, nothing more kept
        train.write_final_metrics(str(tmp_path), rescored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_metrics.1.json", train.FINAL_METRICS]
    assert json.loads((tmp_path / "final_metrics.1.json").read_text()) == stored
    assert json.loads(path.read_text()) == rescored


def test_a_masked_patch_runs_scores_depend_on_its_corruption_and_the_seed_that_draws_it():
    """Its eval loss is over patches corrupted as config.masked_patch says, drawn from config.seed; a classifier's
    scores depend on neither."""
    mpp = {"objective": "masked_patch_prediction", "fewshot.datasets": ()}
    config, extra = _scoring_config(**mpp)
    for change in ({"seed": 1}, {"masked_patch.corrupt_fraction": 0.25}):
        assert train.scored_with(*_scoring_config(**mpp, **change)) != train.scored_with(config, extra)
    assert train.scored_with(*_scoring_config(seed=1)) == train.scored_with(*_scoring_config())


def test_final_metrics_that_record_no_scoring_settings_are_scored_again(tmp_path, caplog):
    """A file an older version wrote, without "scored_with": scored again, with a warning, not an error."""
    import logging

    config, extra = _scoring_config()
    train.write_final_metrics(str(tmp_path), {"step": 5, "test_accuracy": 0.5, "eval_split": "test"})
    with caplog.at_level(logging.WARNING):
        assert train._stored_result(train.epath.Path(tmp_path) / train.FINAL_METRICS, 5, config, extra) is None
    assert "does not record what it was scored with" in caplog.text


@pytest.mark.parametrize("scores", ["eval", "fewshot"])
def test_a_step_that_leaves_nan_params_stops_the_run_before_they_are_scored(tmp_path, monkeypatch, scores):
    """Step 2's update leaves NaN params (its loss still finite, its gradient norm not), on an evaluation or
    few-shot step that is neither a log nor a checkpoint step: the run stops there, naming the step, before any
    evaluation or few-shot pass scores those params."""
    from vit_jax import fewshot

    make_train_step = train.make_train_step

    def diverging_at_step_2(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)

        def run(state, batch):
            state, metrics = step_fn(state, batch)
            if int(state["step"]) == 2:
                state = {**state, "params": jax.tree.map(lambda p: p * np.nan, state["params"])}
                metrics = {**metrics, "grad_norm": metrics["grad_norm"] * np.nan}
            return state, metrics

        run.lower = step_fn.lower  # step_flops lowers it
        return run

    scored = []
    evaluate_weights, evaluate_fewshot = train._evaluate_weights, fewshot.evaluate
    monkeypatch.setattr(train, "make_train_step", diverging_at_step_2)
    monkeypatch.setattr(train, "_evaluate_weights", lambda *a, **k: scored.append("eval") or evaluate_weights(*a, **k))
    monkeypatch.setattr(fewshot, "evaluate", lambda *a, **k: scored.append("fewshot") or evaluate_fewshot(*a, **k))
    overrides = ({"eval_every": 2} if scores == "eval" else
                 {"fewshot.datasets": ("digits,train[:100],test[:50]",), "fewshot.shots": (1,), "fewshot.seeds": 1,
                  "fewshot.every_steps": 2})
    config = _digits_run_config(tmp_path, total_steps=8, log_every=8, checkpoint_every=1000, **overrides)
    from vit_jax.data import pipeline

    closed, close = [], pipeline.TrainIterator.close
    monkeypatch.setattr(pipeline.TrainIterator, "close", lambda self: closed.append(self) or close(self))
    with pytest.raises(train.NonFiniteLossError, match="the gradient norm is nan at step 2"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert scored == ([] if scores == "eval" else ["fewshot"])  # few-shot's baseline at step 0 only
    assert len(closed) == 1  # the stopped run's input workers and reader threads are stopped with it


def test_pin_pretrained_stops_every_process_when_a_local_path_is_missing_on_some(tmp_path):
    """A local file on some hosts only (TPU VM workers each have their own disk): the processes that have it
    stopped too, rather than waiting in the first collective for the ones that exited."""
    from vit_jax.interop import CheckpointError

    npz = tmp_path / "vit.npz"
    npz.write_bytes(b"")
    sent = []
    with pytest.raises(CheckpointError, match=r"config.pretrained=.*vit.npz does not exist on process 1 \(it does "
                                              r"on 0\): every process reads the weights itself"):
        train.pin_pretrained(str(npz), lambda x: sent.append(int(x)) or np.array([x, -3]))
    assert sent == [-1]  # here: not a workdir, used as it is
    missing = tmp_path / "elsewhere.npz"
    with pytest.raises(CheckpointError, match=r"elsewhere.npz does not exist on processes 0, 1: "):
        train.pin_pretrained(str(missing), lambda x: sent.append(int(x)) or np.array([x, x]))
    assert sent[-1] == -3


@pytest.mark.parametrize("streams, restarts", [([[0, 6], [0, 6]], False), ([[0, 6], [6, 6]], True),
                                               ([[4, 6], [4, 5]], True)])
def test_processes_that_resumed_in_different_data_streams_all_restart_at_the_run_step(monkeypatch, streams, restarts):
    """One host's saved position may not hold where the others' do: every process then restarts at the step the
    run resumes at, so all draw the same mixup weights again."""
    class Stream:
        restarted = None

        def stream(self):
            return streams[0]

        def restart(self, step, reason):
            self.restarted = (step, reason)

    monkeypatch.setattr(checkpoints, "gather_json", lambda value: streams)
    stream = Stream()
    train._agree_on_stream(stream, 6)
    assert (stream.restarted is not None) == restarts
    if restarts:
        assert stream.restarted[0] == 6 and str(streams) in stream.restarted[1]


def test_a_run_that_fails_before_its_first_step_closes_its_input_iterator(tmp_path, monkeypatch):
    """A failure between opening the data and the loop (here the step's construction; in practice missing few-shot
    shots or a bad data state) leaves no grain workers or reader threads behind (a notebook runs on), nor an open
    TensorBoard event file."""
    from vit_jax import metric_writer
    from vit_jax.data import pipeline

    closed, close = [], pipeline.TrainIterator.close
    monkeypatch.setattr(pipeline.TrainIterator, "close", lambda self: closed.append(self) or close(self))
    writers, close_writer = [], metric_writer.MetricWriter.close
    monkeypatch.setattr(metric_writer.MetricWriter, "close", lambda self: writers.append(self) or close_writer(self))

    def broken(*args, **kwargs):
        raise RuntimeError("no step today")

    monkeypatch.setattr(train, "make_train_step", broken)
    with pytest.raises(RuntimeError, match="no step today"):
        train.train_and_evaluate(_digits_run_config(tmp_path, total_steps=2), str(tmp_path / "run"))
    assert len(closed) == 1
    assert len(writers) == 1 and writers[0]._file.closed


def test_an_evaluator_beside_a_training_run_reads_the_newer_step_when_its_step_is_deleted(tmp_path, monkeypatch,
                                                                                         caplog):
    """--mode=eval while a training run saves step 3 and its keep-N deletes step 2, which the evaluator was reading
    (stood in for by a rename): it reads step 3 instead of calling the checkpoint damaged; a step that fails to read
    and is still there is an error."""
    import logging
    import os

    from vit_jax import checkpoints

    workdir = str(tmp_path / "run")
    config = _digits_run_config(tmp_path, total_steps=2, eval_every=2, checkpoint_every=2)
    finished = train.train_and_evaluate(config, workdir)
    restore, calls = checkpoints.Checkpoints.restore, []

    def deleted_while_read(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 1:
            os.rename(os.path.join(self.directory, "2"), os.path.join(self.directory, "3"))
            raise checkpoints.CheckpointReadError(f"{self.directory}/2 cannot be read (FileNotFoundError)")
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints.Checkpoints, "restore", deleted_while_read)
    with caplog.at_level(logging.WARNING):
        metrics = train.evaluate_checkpoint(config, workdir)
    assert calls == [2, 3] and "step 2 was removed while it was read" in caplog.text
    assert metrics["top1"] == pytest.approx(finished["test_accuracy"])

    def damaged(self, step, *args, **kwargs):
        raise checkpoints.CheckpointReadError(f"{self.directory}/{step} cannot be read (damaged)")

    monkeypatch.setattr(checkpoints.Checkpoints, "restore", damaged)
    with pytest.raises(checkpoints.CheckpointReadError, match="3 cannot be read"):
        train.evaluate_checkpoint(config, workdir)
