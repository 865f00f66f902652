"""Optimizer, schedule, step count and losses against hand-computed references."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tests.train_helpers import tiny_config
from vit_jax import optim
from vit_jax.config_check import ConfigError


def test_total_steps_from_steps_or_epochs():
    assert optim.total_steps(tiny_config(total_steps=123), 10_000) == 123
    config = tiny_config(total_steps=0, num_epochs=3, batch_size=64)
    assert optim.total_steps(config, 1000) == 47  # ceil(3 * 1000 / 64)
    with pytest.raises(ConfigError, match="total_steps"):
        optim.total_steps(config, None)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_warms_up_linearly_then_decays_to_zero(kind):
    config = tiny_config(**{"optimizer.lr": 0.5, "optimizer.warmup_steps": 10, "optimizer.schedule": kind})
    schedule = optim.learning_rate_schedule(config.optimizer, 110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.25)
    assert float(schedule(10)) == pytest.approx(0.5)
    assert float(schedule(60)) == pytest.approx(0.25, abs=1e-6)  # halfway: linear and cosine agree
    expected_75 = 0.125 if kind == "linear" else 0.5 * 0.5 * (1 + np.cos(np.pi * 0.75))
    assert float(schedule(85)) == pytest.approx(expected_75, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


def test_warmup_longer_than_the_run_is_a_config_error():
    config = tiny_config(**{"optimizer.warmup_steps": 10_000})
    with pytest.raises(ConfigError, match="warmup_steps=10000"):
        optim.make_optimizer(config, 500)


@pytest.mark.parametrize("length, field", [({"total_steps": 500}, "total_steps"),
                                           ({"total_steps": 0, "num_epochs": 2}, "num_epochs")])
def test_warmup_longer_than_the_run_says_to_raise_the_field_that_measures_it(length, field):
    """A run measured in epochs (total_steps 0) is lengthened by num_epochs: total_steps would switch it to steps."""
    config = tiny_config(**{"optimizer.warmup_steps": 10_000, **length})
    with pytest.raises(ConfigError, match=rf"^config.optimizer.warmup_steps=10000 is invalid: it must be less than "
                                          rf"the run's 500 total steps \(lower it, or raise config.{field}\)$"):
        optim.make_optimizer(config, 500)


def test_adam_step_is_clipped_adamw_with_decay_on_kernels_only():
    config = tiny_config(**{"optimizer.name": "adam", "optimizer.lr": 0.1, "optimizer.warmup_steps": 0,
                            "optimizer.weight_decay": 0.5, "optimizer.grad_clip_norm": 1.0})
    tx = optim.make_optimizer(config, 100)
    params = {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([1.0, -1.0])}
    grads = {"kernel": jnp.array([[3.0, 0.0], [0.0, 4.0]]), "bias": jnp.array([0.0, 0.0])}  # norm 5 -> x0.2
    updates, _ = tx.update(grads, tx.init(params), params)
    lr, eps = 0.1, 1e-8
    clipped = np.array([[0.6, 0.0], [0.0, 0.8]])
    # Adam's first step: m_hat = g, v_hat = g^2 -> g / (|g| + eps); then decoupled decay lr * wd * w on kernels.
    adam = clipped / (np.abs(clipped) + eps)
    expected_kernel = -lr * (adam + 0.5 * np.array(params["kernel"]))
    np.testing.assert_allclose(updates["kernel"], expected_kernel, rtol=1e-5)
    np.testing.assert_allclose(updates["bias"], 0.0, atol=1e-12)  # zero grads, no decay on biases


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_reaches_kernels_only_by_name_also_when_scanned(scan):
    """A scanned model's stacked LayerNorm scales and attention's (heads, head_dim) biases are not kernels."""
    import jax

    from vit_jax import sharding, train

    config = tiny_config(**{"model.scan": scan, "mesh.data": 1})
    params = train.init_state(config, sharding.make_mesh(config, jax.devices()[:1]), 10)["params"]
    decayed = {jax.tree_util.keystr(path) for path, on in jax.tree_util.tree_flatten_with_path(
        optim._kernels_only(params))[0] if on}
    names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert decayed == {name for name in names if name.endswith("['kernel']")}
    block = "['encoderblock']" if scan else "['encoderblock_0']"
    assert f"['Transformer']{block}['MultiHeadDotProductAttention_1']['query']['kernel']" in decayed
    for kept in (f"['Transformer']{block}['LayerNorm_0']['scale']",
                 f"['Transformer']{block}['MultiHeadDotProductAttention_1']['query']['bias']",
                 "['Transformer']['posembed_input']['pos_embedding']", "['cls']"):
        assert kept in names and kept not in decayed


def test_sgd_uses_momentum():
    config = tiny_config(**{"optimizer.name": "sgd", "optimizer.lr": 1.0, "optimizer.warmup_steps": 0,
                            "optimizer.weight_decay": 0.0, "optimizer.grad_clip_norm": 0.0, "optimizer.momentum": 0.9})
    tx = optim.make_optimizer(config, 1000)
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([1.0, 2.0])}
    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(first["w"], [-1.0, -2.0], rtol=1e-3)
    np.testing.assert_allclose(second["w"], [-1.9, -3.8], rtol=1e-3)  # g + 0.9 g, lr ~1 (cosine barely moved)


def _by_name(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_sgd_weight_decay_is_l2_on_kernels_only_through_momentum():
    """SGD with weight_decay: the first step is -lr * (g + wd * w) on kernels and -lr * g on every other leaf
    (biases, LayerNorm, position embeddings, the class token); the second carries the decayed gradient in momentum.
    Reference in float64 numpy."""
    lr, wd, mu, num_steps = 0.1, 0.25, 0.9, 100
    config = tiny_config(**{"optimizer.name": "sgd", "optimizer.lr": lr, "optimizer.warmup_steps": 0,
                            "optimizer.schedule": "linear", "optimizer.weight_decay": wd,
                            "optimizer.grad_clip_norm": 0.0, "optimizer.momentum": mu})
    tx = optim.make_optimizer(config, num_steps)
    shapes = {"embedding": {"kernel": (2, 2, 3, 4), "bias": (4,)}, "cls": (1, 1, 4),
              "Transformer": {"posembed_input": {"pos_embedding": (1, 5, 4)}, "encoderblock_0": {
                  "LayerNorm_0": {"scale": (4,), "bias": (4,)},
                  "MultiHeadDotProductAttention_1": {"query": {"kernel": (4, 2, 2), "bias": (2, 2)}},
                  "MlpBlock_3": {"Dense_0": {"kernel": (4, 8), "bias": (8,)}}}},
              "head": {"kernel": (4, 3), "bias": (3,)}}
    rng = np.random.RandomState(0)
    params, grads, grads_2 = (jax.tree.map(lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.float32),
                                           shapes, is_leaf=lambda x: isinstance(x, tuple)) for _ in range(3))

    state = tx.init(params)
    first, state = tx.update(grads, state, params)
    second, _ = tx.update(grads_2, state, optax.apply_updates(params, first))

    w0, g1, g2, got1, got2 = (_by_name(jax.tree.map(lambda a: np.asarray(a, np.float64), t))
                              for t in (params, grads, grads_2, first, second))
    kernels = {name for name in w0 if name.endswith("['kernel']")}
    assert len(kernels) == 4 and len(w0) == 12  # both kinds of leaf are in the tree
    lr_2 = lr * (1 - 1 / num_steps)  # the linear decay at step 1 (at step 0 it is exactly lr: no warmup)
    for name, w in w0.items():
        decay = wd if name in kernels else 0.0
        d1 = g1[name] + decay * w  # L2: the decay joins the gradient before momentum (from a zero buffer)
        np.testing.assert_allclose(got1[name], -lr * d1, rtol=1e-6, atol=1e-8, err_msg=name)
        w1 = w - lr * d1
        expected2 = -lr_2 * (g2[name] + decay * w1 + mu * d1)
        np.testing.assert_allclose(got2[name], expected2, rtol=1e-5, atol=1e-7, err_msg=name)


def test_losses_match_their_formulas():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    labels = jnp.array([[0.0, 1.0, 0.0]])
    log_probs = np.log(np.exp(logits) / np.exp(logits).sum())
    np.testing.assert_allclose(optim.per_example_loss(logits, labels, "single"), [-log_probs[0, 1]], rtol=1e-6)
    smoothed = optim.smooth_labels(labels, 0.3)
    np.testing.assert_allclose(smoothed, [[0.1, 0.8, 0.1]], rtol=1e-6)
    multi = jnp.array([[1.0, 1.0, 0.0]])
    p = 1 / (1 + np.exp(-np.asarray(logits[0])))
    expected = -(np.log(p[0]) + np.log(p[1]) + np.log(1 - p[2]))
    np.testing.assert_allclose(optim.per_example_loss(logits, multi, "multi"), [expected], rtol=1e-5)
    # Multi-label: towards 1 / classes as well (timm's BinaryCrossEntropy: off = s / C, on = 1 - s + s / C).
    np.testing.assert_allclose(optim.smooth_labels(multi, 0.3), [[0.8, 0.8, 0.1]], rtol=1e-6)
    with pytest.raises(ConfigError, match="label_kind"):
        optim.per_example_loss(logits, labels, "ranking")


def test_softmax_loss_of_a_set_of_right_classes_weighs_them_evenly():
    """A softmax model scored on ImageNet ReaL's label sets: the cross-entropy against the set as a uniform
    distribution (one right class: the usual loss; none, as an unlabelled image: 0, not NaN)."""
    logits = jnp.array([[2.0, 0.0, -1.0, 0.5], [1.0, 3.0, 0.0, 0.0], [0.3, 0.2, 0.1, 0.0]])
    sets = jnp.array([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    x = np.asarray(logits, np.float64)
    log_probs = x - np.log(np.exp(x).sum(-1, keepdims=True))
    expected = [-(log_probs[0, 0] + log_probs[0, 2] + log_probs[0, 3]) / 3, -log_probs[1, 1], 0.0]
    np.testing.assert_allclose(optim.per_example_loss(logits, sets, "single"), expected, rtol=1e-6)


def test_update_ema_is_the_bias_corrected_moving_average_in_float64():
    """After k updates: sum_j d^(k-j) (1 - d) p_j / (1 - d^k), whatever the average started from."""
    decay, rng = 0.9, np.random.RandomState(0)
    trajectory = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(30)]
    ema = jnp.full((3, 4), 123.0)  # the start has no weight
    for k, params in enumerate(trajectory, start=1):
        ema = optim.update_ema(ema, jnp.asarray(params), decay, jnp.int32(k))
        weights = np.array([decay ** (k - j) * (1 - decay) for j in range(1, k + 1)]) / (1 - decay ** k)
        expected = sum(w * p.astype(np.float64) for w, p in zip(weights, trajectory[:k]))
        np.testing.assert_allclose(np.asarray(ema), expected, rtol=2e-5, atol=2e-6, err_msg=f"step {k}")
    assert float(optim.ema_weight(0.9999, jnp.int32(1))) == 1.0
    assert float(optim.ema_weight(0.9999, jnp.int32(10 ** 6))) == pytest.approx(1e-4, rel=1e-3)


def _model_params(config, seed: int = 0) -> dict:
    import flax.linen as nn

    from vit_jax.models.vit import build_model

    model = build_model(config.model, config.num_classes)
    images = jnp.zeros((1, config.image_size, config.image_size, 3))
    init = jax.jit(lambda rng: model.init(rng, images, train=False)["params"])  # jitted: eager init is slow
    return nn.unbox(init(jax.random.PRNGKey(seed)))


def _random_like(tree, seed: int):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def test_param_path_names_params_and_optimizer_state_leaves_as_checkpoints_store_them():
    params = {"Transformer": {"encoder_norm": {"scale": jnp.ones(2)}}, "head": {"kernel": jnp.zeros((2, 3))}}
    assert [optim.param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)] == [
        "Transformer/encoder_norm/scale", "head/kernel"]
    state = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)).init(params)  # tuple > namedtuple > dict
    assert [optim.param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)] == [
        "1/0/count", "1/0/mu/Transformer/encoder_norm/scale", "1/0/mu/head/kernel",
        "1/0/nu/Transformer/encoder_norm/scale", "1/0/nu/head/kernel"]


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_scales_each_layers_adam_update_by_decay_to_its_depth(scan):
    """Two blocks, decay 0.5: embeddings (patch, class token, position) 0.125, block 0 0.25, block 1 0.5, final norm
    and head 1; the update with decay is the update without it times that, decoupled weight decay included."""
    base = {"optimizer.lr": 0.1, "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.3, "model.scan": scan}
    params = _model_params(tiny_config(**base))
    grads = _random_like(params, 1)
    plain = optim.make_optimizer(tiny_config(**base), 10)
    decayed = optim.make_optimizer(tiny_config(**base, **{"optimizer.layer_decay": 0.5}), 10)
    want, _ = jax.jit(plain.update)(grads, plain.init(params), params)  # jitted: eager optax is slow here
    got, _ = jax.jit(decayed.update)(grads, decayed.init(params), params)
    expected = {"embedding/kernel": 0.125, "cls": 0.125, "Transformer/posembed_input/pos_embedding": 0.125,
                "Transformer/encoder_norm/scale": 1.0, "head/kernel": 1.0}
    blocks = ["Transformer/encoderblock/MlpBlock_3/Dense_0/kernel"] if scan else [
        "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"]
    seen = set()
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        name = optim.param_path(path)
        if name in expected:
            np.testing.assert_allclose(g, expected[name] * w, rtol=1e-6, err_msg=name)
            seen.add(name)
        elif name in blocks and scan:
            np.testing.assert_allclose(g[0], 0.25 * w[0], rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(g[1], 0.5 * w[1], rtol=1e-6, err_msg=name)
            seen.add(name)
        elif name in blocks:
            np.testing.assert_allclose(g, (0.25 if "encoderblock_0/" in name else 0.5) * w, rtol=1e-6, err_msg=name)
            seen.add(name)
    assert seen == set(expected) | set(blocks)


def test_frozen_parameters_get_no_update_no_state_and_clipping_sees_the_rest_only():
    """A linear probe ('(?!head/).*'): the head's update is clipped AdamW of the head's gradients alone."""
    base = {"optimizer.lr": 0.1, "optimizer.warmup_steps": 0, "optimizer.weight_decay": 0.3,
            "optimizer.grad_clip_norm": 0.5}
    config = tiny_config(**base, **{"optimizer.freeze": "(?!head/).*"})
    params = _model_params(config)
    grads = _random_like(params, 2)
    tx = optim.make_optimizer(config, 10)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    head_tx = optim.make_optimizer(tiny_config(**base), 10)
    head_updates, _ = jax.jit(head_tx.update)(grads["head"], head_tx.init(params["head"]), params["head"])
    for key in ("kernel", "bias"):
        np.testing.assert_allclose(updates["head"][key], head_updates[key], rtol=1e-6)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        if not optim.param_path(path).startswith("head/"):
            assert not np.any(np.asarray(update)), optim.param_path(path)
    # Adam's two moments for the head's two leaves only (plus counts), not for the frozen backbone.
    moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
    assert sorted(x.shape for x in moments) == sorted([params["head"]["kernel"].shape,
                                                       params["head"]["bias"].shape] * 2)


@pytest.mark.parametrize("pattern, message", [
    ("headd/.*", r"matches no parameter; it is matched against whole paths such as head/kernel or "
                 r"Transformer/encoder_norm/scale, under Transformer, cls, embedding, head; e.g. '\(\?!head/\)\.\*' "
                 r"trains head alone"),
    (".*", r"matches every parameter: nothing would train"),
])
def test_a_freeze_pattern_that_matches_nothing_or_everything_is_a_config_error(pattern, message):
    config = tiny_config(**{"optimizer.freeze": pattern})
    tx = optim.make_optimizer(config, 10)
    with pytest.raises(ConfigError, match=rf"config.optimizer.freeze='{re.escape(pattern)}' {message}"):
        tx.init(_model_params(config))


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.layer_decay", 0.0, r"expected a factor in \(0, 1\]"),
    ("optimizer.layer_decay", 1.5, r"expected a factor in \(0, 1\]"),
    ("optimizer.freeze", "head/(", r"expected a regular expression over parameter paths \(missing \)"),
    ("optimizer.freeze", "Transformer/encoderblock_[01]/.*", r"with model.scan the blocks are one stacked "
                                                              r"Transformer/encoderblock/"),
])
def test_bad_fine_tuning_controls_are_config_errors(field, value, message):
    from vit_jax import config_check

    with pytest.raises(ConfigError, match=rf"config.{field}=.*{message}"):
        config_check.validate(tiny_config(**{field: value, "model.scan": True}), 8)


def test_layer_multipliers_place_a_hybrids_resnet_and_the_mask_embedding_below_the_blocks():
    """By name, on a tree shaped like a hybrid's (ResNet stem and stages at the top) with pre_logits and the
    masked-patch objective's parameters: 12 blocks, decay 0.5."""
    config = tiny_config(**{"optimizer.layer_decay": 0.5, "model.num_layers": 12})
    leaf = jnp.zeros((2,))
    tree = {"conv_root": {"kernel": leaf}, "gn_root": {"scale": leaf},
            "block3": {"unit1": {"conv1": {"kernel": leaf}}}, "embedding": {"kernel": leaf}, "mask_embedding": leaf,
            "cls": leaf, "Transformer": {"posembed_input": {"pos_embedding": leaf},
                                         "encoderblock_11": {"LayerNorm_0": {"scale": leaf}},
                                         "encoder_norm": {"scale": leaf}},
            "pre_logits": {"kernel": leaf}, "masked_patch_head": {"kernel": leaf}, "head": {"kernel": leaf}}
    got = {optim.param_path(path): m for path, m in
           jax.tree_util.tree_leaves_with_path(optim.layer_multipliers(config, tree))}
    bottom = 0.5 ** 13
    assert got == {"conv_root/kernel": bottom, "gn_root/scale": bottom, "block3/unit1/conv1/kernel": bottom,
                   "embedding/kernel": bottom, "mask_embedding": bottom, "cls": bottom,
                   "Transformer/posembed_input/pos_embedding": bottom,
                   "Transformer/encoderblock_11/LayerNorm_0/scale": 0.5,
                   "Transformer/encoder_norm/scale": 1.0, "pre_logits/kernel": 1.0, "masked_patch_head/kernel": 1.0,
                   "head/kernel": 1.0}


def test_layer_decay_leaves_the_optimizer_state_as_it_is():
    """A run resumes from a checkpoint written with another decay: the state's tree is the same."""
    params = _model_params(tiny_config())
    states = [optim.make_optimizer(tiny_config(**{"optimizer.layer_decay": decay}), 10).init(params)
              for decay in (1.0, 0.75)]
    assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])


@pytest.mark.parametrize("head", ["head", "masked_patch_head"])
def test_freezing_a_zero_head_is_refused_as_nothing_would_train(head):
    """A zero head kernel (new) frozen: the body gets no gradient. A trained (nonzero) head may be frozen, and a
    pattern that leaves the zero head out is fine."""
    params = {head: {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(3, np.float32)},
              "Transformer": {"encoderblock_0": {"kernel": np.ones((4, 4), np.float32)},
                              "encoderblock_11": {"kernel": np.ones((4, 4), np.float32)}}}
    config = ml_collections.ConfigDict({"optimizer": {"freeze": "(?!Transformer/encoderblock_11/).*"}})
    with pytest.raises(ConfigError, match=rf"freezes {head}/kernel, which is all zeros") as refused:
        optim.check_frozen_head(config, params)
    advised = re.search(r"out of the pattern: '(.*)' freezes", str(refused.value)).group(1)
    config.optimizer.freeze = advised  # the advice works: the same frozen, the head not
    assert optim.frozen(config, params)["Transformer"] == {"encoderblock_0": {"kernel": True},
                                                           "encoderblock_11": {"kernel": False}}
    optim.check_frozen_head(config, params)
    config.optimizer.freeze = "(?!Transformer/encoderblock_11/).*"
    params[head]["kernel"][0, 0] = 0.5  # a head that was trained (or kept from a checkpoint)
    optim.check_frozen_head(config, params)
    params[head]["kernel"][0, 0] = 0.0
    config.optimizer.freeze = f"(?!Transformer/encoderblock_11/|{head}/).*"
    optim.check_frozen_head(config, params)
