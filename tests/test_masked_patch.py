"""Masked patch prediction: corruption statistics, colour targets vs numpy, the model's corruption, training."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from tests.test_vit import tiny_config
from vit_jax import masked_patch
from vit_jax.config_check import ConfigError
from vit_jax.models.vit import build_model


def run_config(**model_overrides):
    config = common.get_config("Ti/16")
    config.model = tiny_config(**model_overrides)
    config.objective = "masked_patch_prediction"
    config.image_size = 16
    return config


def random_params(model, image_shape, seed=0, scale=0.2):
    """Noise of the shapes `model.init` would give, so no zero-initialised parameter hides an error."""
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape)))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(np.float32), shapes)


def test_corruption_statistics_on_a_large_sample():
    config = common.get_config("B/16")
    batch, patches = 4000, 196
    corruption = jax.jit(lambda k: masked_patch.sample_corruption(k, batch, patches, config.masked_patch))(
        jax.random.key(0))
    kind, source = np.asarray(corruption["kind"]), np.asarray(corruption["source"])
    corrupted = kind != masked_patch.CLEAN
    np.testing.assert_array_equal(corrupted.sum(1), 98)  # exactly half of every image
    n = corrupted.sum()
    for code, p in ((masked_patch.MASKED, 0.8), (masked_patch.RANDOM, 0.1), (masked_patch.KEPT, 0.1)):
        count = (kind == code).sum()
        assert abs(count - n * p) < 5 * np.sqrt(n * p * (1 - p)), (code, count / n)
    # Every position is chosen equally often (binomial over images, 5 sigma).
    per_position = corrupted.sum(0)
    assert np.all(np.abs(per_position - batch / 2) < 5 * np.sqrt(batch / 4))
    # Random replacements come from another patch of the image, uniformly; everything else keeps its own.
    position = np.broadcast_to(np.arange(patches), kind.shape)
    random = kind == masked_patch.RANDOM
    np.testing.assert_array_equal(source[~random], position[~random])
    assert np.all(source[random] != position[random]) and source.min() >= 0 and source.max() < patches
    offsets = (source[random] - position[random]) % patches  # uniform over 1..patches-1
    counts = np.bincount(offsets, minlength=patches)[1:]
    expected = random.sum() / (patches - 1)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < patches - 2 + 5 * np.sqrt(2 * (patches - 2))


def test_corrupted_count_rounds_half_up_and_errors():
    config = common.get_config("B/16")
    kind = masked_patch.sample_corruption(jax.random.key(1), 8, 5, config.masked_patch)["kind"]
    np.testing.assert_array_equal((np.asarray(kind) != masked_patch.CLEAN).sum(1), 3)  # round(2.5) -> 3
    with pytest.raises(ValueError, match="at least 2 patches"):
        masked_patch.sample_corruption(jax.random.key(1), 8, 1, config.masked_patch)


def numpy_colour_targets(images, patch, bits=3):
    """Independent reference: loop over patches, mean colour in [0, 255], 8 equal bins per channel."""
    images = np.asarray(images, np.float64)
    b, h, w, _ = images.shape
    levels = 2**bits
    out = np.zeros((b, (h // patch) * (w // patch)), np.int64)
    for i in range(b):
        for r in range(h // patch):
            for c in range(w // patch):
                mean255 = (images[i, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] + 1) * 127.5
                rgb = mean255.reshape(-1, 3).mean(0)
                q = np.minimum((rgb * levels / 255.0).astype(int), levels - 1)
                out[i, r * (w // patch) + c] = int("".join(f"{v:0{bits}b}" for v in q), 2)
    return out


def test_colour_targets_match_numpy_and_hand_values():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 16, 24, 3)).astype(np.float32)
    images[0, :4, :4] = 1.0  # a saturated patch lands in the top bin, not one past it
    images[1, :8] = rng.choice([-1.0, 1.0], (8, 24, 3))
    got = np.asarray(masked_patch.colour_targets(jnp.asarray(images), 4))
    np.testing.assert_array_equal(got, numpy_colour_targets(images, 4))
    assert got[0, 0] == 511
    solid = np.concatenate([np.full((1, 4, 4, 3), v, np.float32) for v in
                            ([-1, -1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1], [0.0, 0.0, 0.0])], axis=2)
    np.testing.assert_array_equal(masked_patch.colour_targets(jnp.asarray(solid), 4)[0], [0, 448, 56, 7, 292])
    assert masked_patch.num_colour_classes(3) == 512
    with pytest.raises(ValueError, match="not divisible by patch_size=5"):
        masked_patch.colour_targets(jnp.asarray(images), 5)


def test_pretraining_tree_has_mask_embedding_and_patch_head_and_no_classifier_head():
    config = run_config()
    model = masked_patch.build_pretraining_model(config)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"])
    classifier = build_model(config.model, 10)
    cls_shapes = nn.unbox(jax.eval_shape(lambda: classifier.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
                                         )["params"])
    assert set(shapes) - set(cls_shapes) == {"mask_embedding", "masked_patch_head"}
    assert set(cls_shapes) - set(shapes) == {"head"}
    assert shapes["mask_embedding"].shape == (1, 1, 32)
    assert shapes["masked_patch_head"]["kernel"].shape == (32, 512)
    logits = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((2, 16, 16, 3))), shapes)
    assert logits.shape == (2, 16, 512)


def test_a_masked_patch_checkpoint_loads_into_its_pretraining_model_without_a_class_count(tmp_path):
    from vit_jax.interop import load_pretrained
    from vit_jax.interop.orbax_io import write_orbax

    config = run_config()
    model = masked_patch.build_pretraining_model(config)
    params = jax.tree.map(np.asarray, random_params(model, (1, 16, 16, 3)))
    write_orbax(params, {"step": 1, "config": {"model": config.model.to_dict()}}, str(tmp_path / "mpp"))
    # The pre-training model has no classification head: no class count to give (it asked for one).
    loaded = load_pretrained(str(tmp_path / "mpp"), config.model, masked_patch_classes=512)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_model_corruption_equals_editing_the_pixels():
    """Swapping embeddings = swapping pixel patches; the mask embedding set to the embedding of a black patch
    (the conv bias) = blacking out those patches. Checked through the whole pre-training model."""
    config = run_config()
    model = masked_patch.build_pretraining_model(config)
    params = random_params(model, (1, 16, 16, 3))
    params["mask_embedding"] = params["embedding"]["bias"].reshape(1, 1, -1)
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    apply = jax.jit(lambda x, source, mask: model.apply({"params": params}, x, patch_source=source, patch_mask=mask))
    identity = jnp.tile(jnp.arange(16), (2, 1))
    no_mask = jnp.zeros((2, 16), bool)
    plain = apply(images, identity, no_mask)
    np.testing.assert_allclose(jax.jit(lambda x: model.apply({"params": params}, x))(images), plain, atol=1e-6)

    source = identity.at[0, 3].set(10).at[1, 15].set(0)
    mask = no_mask.at[0, 5].set(True).at[1, 0].set(True)
    edited = np.asarray(images).reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 4, 4, 3)
    edited[0, 3], edited[1, 15] = edited[0, 10], edited[1, 0]
    edited[0, 5] = edited[1, 0] = 0.0
    edited = edited.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 3)
    np.testing.assert_allclose(apply(images, source, mask), apply(jnp.asarray(edited), identity, no_mask),
                               rtol=1e-5, atol=1e-5)
    assert not np.allclose(apply(images, source, mask), plain, atol=1e-3)


def test_classifier_rejects_corruption_inputs():
    model = build_model(tiny_config(), 10)
    with pytest.raises(ValueError, match="masked_patch_classes > 0"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), patch_mask=jnp.zeros((1, 16), bool))
    with pytest.raises(ValueError, match="pre-training model"):
        masked_patch.masked_patch_loss(model, {}, jnp.zeros((1, 16, 16, 3)), jax.random.key(0), run_config())


def test_loss_starts_at_log_512_ignores_padding_and_falls_with_training():
    config = run_config()
    model = masked_patch.build_pretraining_model(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
    # Smooth random images: a random colour per 2x2 block of patches, so a masked patch's colour is predictable
    # from its neighbours, plus a little noise.
    colours = jax.random.uniform(jax.random.key(1), (32, 2, 2, 3), minval=-1, maxval=1)
    images = jnp.repeat(jnp.repeat(colours, 8, axis=1), 8, axis=2)
    images = jnp.clip(images + 0.05 * jax.random.normal(jax.random.key(2), images.shape), -1, 1)

    loss0, metrics0 = jax.jit(lambda p, x: masked_patch.masked_patch_loss(model, p, x, jax.random.key(3), config))(
        params, images)
    assert float(loss0) == pytest.approx(np.log(512), rel=1e-5)  # zero head: uniform over 512 colours
    assert float(metrics0["num_predicted"]) == 32 * 8

    # Padding examples (weight 0) do not change the loss, whatever they contain.
    weights = jnp.array([1.0] * 16 + [0.0] * 16)
    noise = images.at[16:].set(jax.random.uniform(jax.random.key(4), (16, 16, 16, 3), minval=-1, maxval=1))
    params_r = random_params(model, (1, 16, 16, 3), seed=5, scale=0.1)
    evaluate = jax.jit(lambda p, x: masked_patch.masked_patch_loss(model, p, x, jax.random.key(3), config,
                                                                   train=False, example_weights=weights))
    losses = [evaluate(params_r, x) for x in (images, noise)]
    assert float(losses[0][0]) == pytest.approx(float(losses[1][0]), rel=1e-6)
    assert float(losses[0][1]["num_predicted"]) == 16 * 8

    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rng):
        grad_fn = jax.value_and_grad(lambda p: masked_patch.masked_patch_loss(model, p, images, rng, config),
                                     has_aux=True)
        (loss, metrics), grads = grad_fn(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rngs = jax.random.split(jax.random.key(6), 40)
    losses = []
    for rng in rngs:
        params, opt_state, loss = step(params, opt_state, rng)
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.7 * np.log(512), losses  # seen: ~3.9 after 40 steps


def test_loss_scores_exactly_the_corrupted_patches_and_masks_only_the_masked(monkeypatch):
    """A quarter corrupted (so clean and corrupted counts differ): the loss is the float64 cross-entropy over
    the MASKED, RANDOM and KEPT positions of a model that put the mask embedding on the MASKED ones alone."""
    config = run_config()
    config.masked_patch.corrupt_fraction = 0.25
    model = masked_patch.build_pretraining_model(config)
    params = random_params(model, (1, 16, 16, 3), seed=2, scale=0.3)
    images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
    assert masked_patch.num_corrupted(16, 0.25) == 4
    m, r, k = masked_patch.MASKED, masked_patch.RANDOM, masked_patch.KEPT
    kind = np.zeros((3, 16), np.int32)  # CLEAN
    kind[0, [0, 5, 10, 15]] = [m, r, k, m]
    kind[1, [2, 3, 8, 9]] = [k, m, m, r]
    kind[2, [1, 6, 12, 14]] = [r, k, m, m]
    source = np.broadcast_to(np.arange(16), (3, 16)).copy()
    source[kind == r] = [9, 4, 7]
    corruption = {"kind": jnp.asarray(kind), "source": jnp.asarray(source)}
    monkeypatch.setattr(masked_patch, "sample_corruption", lambda *args: corruption)

    loss, metrics = masked_patch.masked_patch_loss(model, params, images, jax.random.key(0), config, train=False)
    logits = np.asarray(model.apply({"params": params}, images, patch_source=jnp.asarray(source),
                                    patch_mask=jnp.asarray(kind == masked_patch.MASKED)), np.float64)
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    targets = numpy_colour_targets(np.asarray(images), 4)
    scored = kind != masked_patch.CLEAN
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert float(metrics["num_predicted"]) == scored.sum() == 12
    assert float(loss) == pytest.approx(nll[scored].mean(), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx((logits.argmax(-1) == targets)[scored].mean(), abs=1e-6)
    assert abs(nll[scored].mean() - nll[~scored].mean()) > 1e-3  # the clean positions would score otherwise


def test_bfloat16_compute_predicts_colours_in_float32():
    """As the classifier's head: the per-patch colour head runs in float32 on the float32 encoder output."""
    config = run_config(dtype="bfloat16")
    model = masked_patch.build_pretraining_model(config)
    params = random_params(model, (1, 16, 16, 3), seed=3)
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
    logits, state = model.apply({"params": params}, images, mutable=["intermediates"])
    encoded = np.asarray(state["intermediates"]["encoded"][0], np.float64)[:, 1:]
    head = params["masked_patch_head"]
    expected = encoded @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    assert state["intermediates"]["encoded"][0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


def test_axial_masked_patch_prediction_predicts_every_patch():
    config = run_config(classifier="gap", axial=True)
    model = masked_patch.build_pretraining_model(config)
    params = random_params(model, (1, 16, 16, 3))
    loss, metrics = jax.jit(lambda p: masked_patch.masked_patch_loss(
        model, p, jnp.zeros((2, 16, 16, 3)), jax.random.key(0), config, train=False))(params)
    assert np.isfinite(float(loss)) and float(metrics["num_predicted"]) == 2 * 8
    initial = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])
    loss0, _ = jax.jit(lambda p: masked_patch.masked_patch_loss(
        model, p, jnp.zeros((2, 16, 16, 3)), jax.random.key(0), config, train=False))(initial)
    assert float(loss0) == pytest.approx(np.log(512), rel=1e-5)  # zero head: uniform over 512 colours


@pytest.mark.parametrize("field, value, match", [
    ("objective", "mpp", "config.objective='mpp'"),
    ("masked_patch.corrupt_fraction", 0.0, "corrupt_fraction=0.0"),
    ("masked_patch.mask_fraction", 0.95, "sum to at most 1"),
    ("masked_patch.colour_bits", 9, "colour_bits=9"),
    ("image_size", 4, "random_fraction=0.1 is invalid for 1 patch per image"),  # patch 4: one 4x4 patch
    ("model.resnet_layers", (1,), r"resnet_layers=\(1,\) is invalid with objective='masked_patch_prediction'"),
    ("pp.mixup_alpha", 0.2, r"config.pp.mixup_alpha=0.2 is invalid with objective='masked_patch_prediction': "
                            "expected 0"),
    ("optimizer.label_smoothing", 0.1, "config.optimizer.label_smoothing=0.1 is invalid with "
                                       "objective='masked_patch_prediction': expected 0"),
])
def test_check_config_names_bad_fields(field, value, match):
    config = run_config()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(ConfigError, match=match):
        masked_patch.check_config(config)


def test_eval_corrupts_each_image_by_its_index_whatever_the_batch():
    """The eval score of a split is the same in one batch of 4 or two of 2 (or any process count), the same at
    every evaluation, and an image corrupted by its index (the same pixels at another index score otherwise)."""
    from vit_jax import sharding, train

    config = run_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.model = 1, 1, 1
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    model = masked_patch.build_pretraining_model(config)
    params = random_params(model, (1, 16, 16, 3))
    images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3), minval=-1.0, maxval=1.0)
    step = train.make_eval_step(config, mesh)

    def sums(rows, indices):
        batch = {"image": images[rows], "label": jnp.zeros((len(indices), 10)), "mask": jnp.ones((len(indices),)),
                 "index": jnp.asarray(indices, jnp.int32)}
        return jax.device_get(step(params, batch))

    whole = sums(slice(0, 4), [0, 1, 2, 3])
    halves = [sums(slice(0, 2), [0, 1]), sums(slice(2, 4), [2, 3])]
    for key in ("loss", "accuracy", "count"):
        assert whole[key] == pytest.approx(sum(h[key] for h in halves), rel=1e-5), key
    assert sums(slice(0, 4), [0, 1, 2, 3]) == whole  # evaluations are comparable
    assert sums(slice(0, 4), [4, 5, 6, 7])["loss"] != pytest.approx(whole["loss"], rel=1e-6)
