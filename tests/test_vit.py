"""The ViT modules: parameter counts, shapes, numerics against a float64 reference, bf16, remat and scan."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import common
from vit_jax.models.variants import parse_variant, resnet_stride
from vit_jax.models.vit import build_model, stack_blocks, unstack_blocks

# Published counts (224px, 1000-class head, no pre-logits); REFERENCE.md and the original repo's tests.
PINNED = {
    "Ti/16": 5_717_416, "S/16": 22_050_664, "S/32": 22_878_952, "B/8": 86_576_872, "B/16": 86_567_656,
    "B/32": 88_224_232, "L/16": 304_326_632, "L/32": 306_535_400, "H/14": 632_045_800,
    "R50+B/16": 98_659_112, "R26+S/32": 36_431_912, "R50+L/32": 328_994_856, "R26+B/32": 101_383_976,
}


def formula_params(variant: str, num_classes: int = 1000, image_size: int = 224, classifier: str = "token") -> int:
    """Parameter count written out by hand from the architecture, independent of the Flax code."""
    v = parse_variant(variant)
    d, m = v.hidden_size, v.mlp_dim
    count, c_in, patch = 0, 3, v.patch_size
    if v.resnet_layers:
        width = 64
        count += 7 * 7 * 3 * width + 2 * width  # conv_root + gn_root
        c_in = width
        for s, units in enumerate(v.resnet_layers):
            f = width * 2**s
            for u in range(units):
                count += c_in * f + 2 * f + 9 * f * f + 2 * f + f * 4 * f + 2 * 4 * f
                if u == 0:
                    count += c_in * 4 * f + 2 * 4 * f  # projection shortcut
                c_in = 4 * f
        patch = v.patch_size // resnet_stride(v.resnet_layers)
    tokens = (image_size // v.patch_size) ** 2 + (classifier == "token")
    count += patch * patch * c_in * d + d  # embedding
    count += d * (classifier == "token") + tokens * d  # cls + position embeddings
    block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    count += v.num_layers * block + 2 * d + d * num_classes + num_classes
    return count


def count_params(model_config, num_classes=1000, image_size=224):
    model = build_model(model_config, num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))


@pytest.mark.parametrize("variant", sorted(PINNED))
def test_param_count_matches_formula_and_publication(variant):
    assert formula_params(variant) == PINNED[variant]
    assert count_params(common.model_config(variant)) == PINNED[variant]


def test_gap_drops_class_token_and_its_position():
    config = common.model_config("B/16")
    config.classifier = "gap"
    assert count_params(config) == formula_params("B/16", classifier="gap") == 86_566_120


def test_original_checkpoint_names():
    config = common.model_config("R26+S/32")
    config.representation_size = 384
    model = build_model(config, 10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    names = set(traverse_util.flatten_dict(nn.unbox(shapes["params"]), sep="/"))
    for name in ["embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding",
                 "Transformer/encoderblock_11/MultiHeadDotProductAttention_1/query/kernel",
                 "Transformer/encoderblock_0/MlpBlock_3/Dense_1/bias", "Transformer/encoderblock_0/LayerNorm_2/scale",
                 "Transformer/encoder_norm/scale", "pre_logits/kernel", "head/kernel", "conv_root/kernel",
                 "gn_root/scale", "block4/unit2/conv3/kernel", "block1/unit1/conv_proj/kernel",
                 "block1/unit1/gn_proj/bias"]:
        assert name in names, name
    q = traverse_util.flatten_dict(nn.unbox(shapes["params"]), sep="/")[
        "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
    assert q.shape == (384, 6, 64)


def tiny_config(**overrides):
    config = common.model_config("Ti/16")
    config.update(dict(variant="custom", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=4,
                       dropout_rate=0.0))
    config.update(overrides)
    return config


def init_random(model, image_size, seed=0):
    """Noise of the shapes `model.init` gives (eval_shape: nothing compiled), so the zero head and cls do not hide
    errors."""
    images = jnp.zeros((1, image_size, image_size, 3))
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(seed), images))["params"])
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(np.float32), shapes)


@pytest.mark.parametrize("image_size", [224, 384])
@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_forward_shapes(image_size, classifier):
    config = common.model_config("Ti/16")
    config.classifier = classifier
    model = build_model(config, 7)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, image_size, image_size, 3))))
    pos = nn.unbox(variables["params"])["Transformer"]["posembed_input"]["pos_embedding"]
    assert pos.shape == (1, (image_size // 16) ** 2 + (classifier == "token"), 192)
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, image_size, image_size, 3))), variables)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _attention_branch(x, blk, eps=1e-6):
    """An encoder block's first residual branch, Attn(LN(x)), in float64 numpy (`blk`: the block's params)."""
    y = _layer_norm(x, blk["LayerNorm_0"]["scale"], blk["LayerNorm_0"]["bias"], eps)
    att = blk["MultiHeadDotProductAttention_1"]
    q, k, v = (np.einsum("btd,dhk->bthk", y, att[n]["kernel"]) + att[n]["bias"] for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhqt,bthk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", y, att["out"]["kernel"]) + att["out"]["bias"]


def _mlp_branch(x, blk, eps=1e-6):
    """An encoder block's second residual branch, MLP(LN(x)), in float64 numpy."""
    y = _layer_norm(x, blk["LayerNorm_2"]["scale"], blk["LayerNorm_2"]["bias"], eps)
    mlp = blk["MlpBlock_3"]
    y = _gelu_tanh(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    return y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


def reference_stream(params, images, classifier, patch, eps=1e-6):
    """The ViT's residual stream in float64 numpy: the tokens after the position embeddings, then after each block."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(images, np.float64)
    b, h, w, c = x.shape
    gh, gw = h // patch, w // patch
    patches = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    kernel = p["embedding"]["kernel"].reshape(-1, p["embedding"]["kernel"].shape[-1])
    x = patches @ kernel + p["embedding"]["bias"]
    if classifier == "token":
        x = np.concatenate([np.broadcast_to(p["cls"], (b, 1, x.shape[-1])), x], axis=1)
    t = p["Transformer"]
    x = x + t["posembed_input"]["pos_embedding"]
    stream = [x]
    i = 0
    while f"encoderblock_{i}" in t:
        blk = t[f"encoderblock_{i}"]
        x = x + _attention_branch(x, blk, eps)
        x = x + _mlp_branch(x, blk, eps)
        stream.append(x)
        i += 1
    return stream


def reference_vit(params, images, classifier, patch, num_heads, eps=1e-6):
    """The ViT forward pass in float64 numpy, written from the paper's equations."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    t = p["Transformer"]
    x = reference_stream(params, images, classifier, patch, eps)[-1]
    x = _layer_norm(x, t["encoder_norm"]["scale"], t["encoder_norm"]["bias"], eps)
    x = x[:, 0] if classifier == "token" else x.mean(1)
    return x @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_forward_matches_float64_reference(classifier):
    config = tiny_config(classifier=classifier)
    model = build_model(config, 5)
    params = init_random(model, 16)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((3, 16, 16, 3)), jnp.float32)
    logits = jax.jit(model.apply)({"params": params}, images)
    expected = reference_vit(params, images, classifier, patch=4, num_heads=2)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_gradients_match_float64_finite_differences(classifier):
    """The float32 gradient (on CPU: softmax's own VJP, heads-first attention) along random directions, against
    central differences of the float64 reference forward."""
    config = tiny_config(classifier=classifier)
    model = build_model(config, 5)
    params = init_random(model, 16)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((3, 16, 16, 3)), jnp.float32)
    weights = np.asarray(jax.random.normal(jax.random.key(4), (3, 5)), np.float64)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, images) * weights)))(params)
    leaves, treedef = jax.tree.flatten(params)
    eps = 1e-5
    for seed in range(3):
        dir_rng = np.random.default_rng(10 + seed)
        direction = [dir_rng.standard_normal(leaf.shape) for leaf in leaves]
        if seed == 2:  # only the attention kernels: the heads-first matmuls and softmax alone
            paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            direction = [d if "MultiHeadDotProductAttention" in path and "kernel" in path else 0 * d
                         for path, d in zip(paths, direction)]

        def loss(sign, direction=direction):
            moved = jax.tree.unflatten(treedef, [np.asarray(leaf, np.float64) + sign * eps * d
                                                 for leaf, d in zip(leaves, direction)])
            return np.sum(reference_vit(moved, images, classifier, patch=4, num_heads=2) * weights)

        expected = (loss(1) - loss(-1)) / (2 * eps)
        got = sum(np.vdot(np.asarray(g, np.float64), d) for g, d in zip(jax.tree.leaves(grads), direction))
        np.testing.assert_allclose(got, expected, rtol=1e-5)

def test_bfloat16_compute_keeps_float32_params_and_logits():
    model32 = build_model(tiny_config(), 5)
    model16 = build_model(tiny_config(dtype="bfloat16"), 5)
    params = init_random(model32, 16)
    variables16 = nn.unbox(jax.eval_shape(model16.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables16))
    images = jnp.asarray(np.random.default_rng(3).standard_normal((4, 16, 16, 3)), jnp.float32)
    out32 = jax.jit(model32.apply)({"params": params}, images)
    out16 = jax.jit(model16.apply)({"params": params}, images)
    assert out16.dtype == jnp.float32
    scale = float(jnp.abs(out32).max())
    assert float(jnp.abs(out16 - out32).max()) < 0.05 * scale
    assert float(jnp.abs(out16 - out32).max()) > 0  # bf16 really computed in bf16


@pytest.mark.parametrize("representation_size", [0, 24])
def test_bfloat16_compute_pools_and_classifies_in_float32(representation_size):
    """As the paper's code: encoder_norm, pooling, pre_logits and the head run in float32 (bf16 would round logits
    near a head bias of -10 to steps of 0.06): the logits are those of the encoder's float32 output in float64."""
    model = build_model(tiny_config(dtype="bfloat16", representation_size=representation_size), 5)
    params = init_random(model, 16)
    params["head"]["bias"] = params["head"]["bias"] - 10.0
    images = jnp.asarray(np.random.default_rng(3).standard_normal((4, 16, 16, 3)), jnp.float32)
    logits, state = jax.jit(lambda p: model.apply({"params": p}, images, mutable=["intermediates"]))(params)
    encoded = state["intermediates"]["encoded"][0]  # the encoder's output, after encoder_norm
    x = np.asarray(encoded, np.float64)[:, 0]
    if representation_size:
        x = np.tanh(x @ np.asarray(params["pre_logits"]["kernel"], np.float64) + params["pre_logits"]["bias"])
    expected = x @ np.asarray(params["head"]["kernel"], np.float64) + np.asarray(params["head"]["bias"], np.float64)
    assert encoded.dtype == jnp.float32 and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


def test_remat_and_scan_match_plain_model():
    plain = build_model(tiny_config(), 5)
    params = init_random(plain, 16)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)), jnp.float32)
    expected = jax.jit(plain.apply)({"params": params}, images)
    remat = build_model(tiny_config(remat=True), 5)
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, images), expected, rtol=1e-5, atol=1e-5)
    stacked = stack_blocks(params, 2)
    for flags in (dict(scan=True), dict(scan=True, remat=True)):
        scanned = build_model(tiny_config(**flags), 5)
        shapes = nn.unbox(jax.eval_shape(lambda m=scanned: m.init(jax.random.key(0), images))["params"])
        assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, stacked)
        np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, images), expected, rtol=1e-5,
                                   atol=1e-5)
    roundtrip = unstack_blocks(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), roundtrip, params))


def test_remat_gradients_match_plain():
    images = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)), jnp.float32)
    plain = build_model(tiny_config(), 5)
    params = init_random(plain, 16)

    def grads(model, p):
        return jax.jit(jax.grad(lambda q: model.apply({"params": q}, images).sum()))(p)

    g_plain = grads(plain, params)
    g_remat = grads(build_model(tiny_config(remat=True), 5), params)
    g_scan = unstack_blocks(grads(build_model(tiny_config(scan=True, remat=True), 5), stack_blocks(params, 2)))
    for g in (g_remat, g_scan):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_plain)


def test_stochastic_depth_and_dropout_only_in_training():
    model = build_model(tiny_config(stochastic_depth=0.5, dropout_rate=0.1), 5)
    params = init_random(model, 16)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((8, 16, 16, 3)), jnp.float32)
    apply = jax.jit(model.apply, static_argnames="train")
    eval_a = apply({"params": params}, images)
    eval_b = apply({"params": params}, images)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = [apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(s)}) for s in (0, 1)]
    assert not np.allclose(train[0], train[1])
    assert not np.allclose(train[0], eval_a)


def _noise_params(module, x, scale=0.5, **kwargs):
    """Noise of the shapes `module.init(..., x, **kwargs)` gives (in training it needs a dropout rng to init)."""
    shapes = jax.eval_shape(
        lambda: module.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, x[:1], **kwargs))
    rng = np.random.RandomState(1)  # numpy: no small jax program to compile per leaf shape
    return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(np.float32),
                        nn.unbox(shapes["params"]))


def _kept_branches(x, out, blk, keep, atol=1e-4):
    """(batch, 2) 0/1: which of an EncoderBlock's residual branches (attention, MLP) each example kept, found as
    the one of the four keep/drop combinations, computed in float64 (a kept branch rescaled by 1 / keep), that the
    block's output `out` equals. Asserts that exactly one combination matches every example: a branch kept for
    some tokens of an example and dropped for others, or kept without the rescaling, matches none."""
    x, out = np.asarray(x, np.float64), np.asarray(out, np.float64)
    blk = jax.tree.map(lambda a: np.asarray(a, np.float64), blk)
    attention = _attention_branch(x, blk) / keep
    combos, candidates = [], []
    for a in (0, 1):
        mid = x + a * attention
        mlp = _mlp_branch(mid, blk) / keep
        for m in (0, 1):
            combos.append((a, m))
            candidates.append(mid + m * mlp)
    errors = np.stack([np.abs(out - c).max(axis=(1, 2)) for c in candidates], axis=1)  # (batch, 4)
    ranked = np.sort(errors, axis=1)
    assert ranked[:, 0].max() < atol  # every example is one of the four
    assert ranked[:, 1].min() > 100 * atol  # and only one: the test can tell them apart
    return np.array(combos)[errors.argmin(axis=1)]


def test_stochastic_depth_drops_whole_branches_per_example_at_its_rate():
    """Drop-path on a plain EncoderBlock: per example, each residual branch is kept whole (x + branch / keep) or
    dropped whole (nothing added), the attention and MLP branches independently, each dropped at the rate."""
    from vit_jax.models.vit import EncoderBlock

    rate, n = 0.5, 4096
    block = EncoderBlock(num_heads=2, mlp_dim=16, use_stochastic_depth=True, deterministic=False)
    x = jax.random.normal(jax.random.key(2), (n, 4, 8))
    params = _noise_params(block, x)
    out = jax.jit(lambda p: block.apply({"params": p}, x, rate, rngs={"dropout": jax.random.key(3)}))(params)
    kept = _kept_branches(x, out, params, keep=1 - rate)
    sigma = np.sqrt(rate * (1 - rate) / n)
    dropped = 1 - kept.mean(axis=0)  # (attention, MLP)
    assert np.all(np.abs(dropped - rate) < 5 * sigma), dropped
    both = kept.sum(axis=1) == 0  # independent draws: both dropped at rate^2
    assert abs(both.mean() - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / n), both.mean()
    np.testing.assert_array_equal(np.asarray(out)[both], np.asarray(x)[both])  # exactly the input


@pytest.mark.parametrize("scan", [False, True])
def test_encoder_stochastic_depth_grows_linearly_from_zero_at_the_first_block(scan):
    """Encoder(stochastic_depth=0.5) over 3 blocks drops at 0, 0.25, 0.5: measured block by block from each
    block's captured input and output (with scan the rates are a scanned array, the blocks' rngs split)."""
    from vit_jax.models.vit import Encoder

    n, rates = 4096, (0.0, 0.25, 0.5)
    encoder = Encoder(num_layers=3, num_heads=2, mlp_dim=16, stochastic_depth=0.5, scan=scan)
    x = jax.random.normal(jax.random.key(2), (n, 4, 8))
    params = _noise_params(encoder, x, train=True)
    _, state = jax.jit(lambda p: encoder.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)},
                                               capture_intermediates=True, mutable=["intermediates"]))(params)
    captured = jax.device_get(state["intermediates"])
    if scan:
        outputs = list(captured["encoderblock"]["__call__"][0])  # stacked over depth
        blocks = [jax.tree.map(lambda a, i=i: a[i], params["encoderblock"]) for i in range(3)]
    else:
        outputs = [captured[f"encoderblock_{i}"]["__call__"][0] for i in range(3)]
        blocks = [params[f"encoderblock_{i}"] for i in range(3)]
    inputs = [captured["posembed_input"]["__call__"][0], *outputs[:-1]]  # dropout_rate 0: posembed feeds block 0
    for i, rate in enumerate(rates):
        dropped = 1 - _kept_branches(inputs[i], outputs[i], blocks[i], keep=1 - rate).mean(axis=0)
        if rate == 0:
            np.testing.assert_array_equal(dropped, 0.0)  # the first block never drops
        else:
            assert np.all(np.abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)), (i, dropped)


@pytest.mark.parametrize("shape, dtype, message", [
    ((2, 30, 32, 3), jnp.float32, "images of 30x32 pixels: each side must be a positive multiple of the patch size "
                                  "16 \\(e.g. 32x32\\)"),
    ((2, 8, 8, 3), jnp.float32, "images of 8x8 pixels: .* positive multiple of the patch size 16"),
    ((2, 32, 32, 3), jnp.uint8, "images of dtype uint8: expected floats in \\[-1, 1\\]"),
    ((32, 32, 3), jnp.float32, "images of shape \\(32, 32, 3\\): expected \\(batch, height, width, channels\\)"),
])
def test_images_the_model_cannot_read_are_refused(shape, dtype, message):
    config = common.model_config("Ti/16")
    config.num_layers = 1
    model = build_model(config, 10)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), jnp.zeros(shape, dtype))


@pytest.mark.parametrize("num_classes", [0, -1, 2.0, True])
def test_a_class_count_that_is_no_positive_integer_is_refused(num_classes):
    with pytest.raises(ValueError, match=f"num_classes={num_classes!r} is invalid: expected a positive integer"):
        build_model(common.model_config("Ti/16"), num_classes)  # 0 built a model of no outputs in silence


def test_a_hybrid_patch_that_is_no_multiple_of_its_resnet_stride_is_refused():
    config = common.model_config("R50+B/16")
    config.patch_size = 24  # built a 1x1 embedding of the 16x16 trunk output: patches of 16 pixels, not 24
    with pytest.raises(ValueError, match="patch_size=24 is no multiple of the stride 16 of the ResNet trunk"):
        jax.eval_shape(lambda x: build_model(config, 10).init(jax.random.PRNGKey(0), x, train=False),
                       jnp.zeros((1, 48, 48, 3)))


def test_hybrid_forward_and_stride():
    config = tiny_config(resnet_layers=(1, 1), patch_size=8)  # trunk stride 8 -> 1x1 embedding patches
    model = build_model(config, 3)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))  # jitted: eager is ~10x slower
    params = nn.unbox(variables["params"])
    assert params["embedding"]["kernel"].shape == (1, 1, 512, 32)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 17, 32)
    logits = jax.jit(model.apply)({"params": params}, jax.random.normal(jax.random.key(1), (2, 32, 32, 3)))
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))


def test_attention_capture_returns_probabilities():
    model = build_model(tiny_config(), 5, capture_attention=True)
    params = init_random(model, 16)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16, 3)), jnp.float32)
    logits, state = jax.jit(lambda p: model.apply({"params": p}, images, mutable=["intermediates"]))(params)
    plain = jax.jit(build_model(tiny_config(), 5).apply)({"params": params}, images)
    np.testing.assert_allclose(logits, plain, rtol=1e-5, atol=1e-5)
    att = state["intermediates"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["attention"][0]
    assert att.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("image_size", [16, 18])  # 18: VALID drops the 2-pixel remainder, as the conv does
def test_patch_embedding_matmul_equals_strided_conv(image_size):
    from vit_jax.models.vit import PatchEmbedding

    images = jax.random.normal(jax.random.key(0), (2, image_size, image_size, 3))
    embed = PatchEmbedding(8, 4)
    conv = nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID")
    params = nn.unbox(embed.init(jax.random.key(1), images))
    conv_params = nn.unbox(conv.init(jax.random.key(1), images))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv_params)
    params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(2), p.shape), params)
    np.testing.assert_allclose(embed.apply(params, images), conv.apply(params, images), rtol=1e-5, atol=1e-5)


def test_bfloat16_logits_and_gradients_close_to_float32():
    """bf16 compute (float32 params, float32-accumulated matmuls) tracks float32 within a stated tolerance:
    logits within 3% of their largest magnitude, each gradient within 6% (relative L2) of float32's."""
    config = tiny_config(hidden_size=64, mlp_dim=128, num_heads=4)
    model32 = build_model(config, 10)
    model16 = build_model(tiny_config(hidden_size=64, mlp_dim=128, num_heads=4, dtype="bfloat16"), 10)
    params = init_random(model32, 32)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32, 32, 3)), jnp.float32)
    labels = jax.nn.one_hot(jnp.arange(4), 10)

    def loss(model, p):
        logits = model.apply({"params": p}, images)
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1)), logits

    (_, logits32), grads32 = jax.jit(jax.value_and_grad(lambda p: loss(model32, p), has_aux=True))(params)
    (_, logits16), grads16 = jax.jit(jax.value_and_grad(lambda p: loss(model16, p), has_aux=True))(params)
    assert logits16.dtype == jnp.float32
    scale = float(jnp.abs(logits32).max())
    assert 0 < float(jnp.abs(logits16 - logits32).max()) <= 0.03 * scale
    flat32, flat16 = traverse_util.flatten_dict(grads32), traverse_util.flatten_dict(grads16)
    for name, g32 in flat32.items():
        if name[-1] == "bias" and "key" in name:
            continue  # softmax is invariant to the key bias: its gradient is zero up to rounding
        rel = float(jnp.linalg.norm(flat16[name] - g32) / jnp.linalg.norm(g32))
        assert rel <= 0.06, (name, rel)


def _captured_stream(model, images, params=None):
    """The residual stream a model computes: the tokens after the position embeddings, then after each block
    (`capture_intermediates`; abstract, via eval_shape, without `params`), and the patch embedding's output."""
    def run(p):
        _, state = model.apply({"params": p}, images, capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]

    if params is None:
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images))
        captured = jax.eval_shape(run, nn.unbox(shapes["params"]))
    else:
        captured = jax.jit(run)(params)
    t = captured["Transformer"]
    blocks = ["encoderblock"] if "encoderblock" in t else [f"encoderblock_{i}" for i in range(len(t))
                                                           if f"encoderblock_{i}" in t]  # scan: one, stacked
    stream = [t["posembed_input"]["__call__"][0]] + [t[k]["__call__"][0] for k in blocks]
    return captured["embedding"]["__call__"][0], stream


def test_bfloat16_keeps_the_residual_stream_in_float32():
    """As vision_transformer's and big_vision's ViT: under bf16 compute only the matmuls (the LayerNorms feeding
    them, their outputs) are bf16; the patch embedding's output, the class token and position embeddings and every
    residual add stay float32. The bf16 stream rounded each block's sum: 8 blocks of width 64 ended 2.0e-2 (of the
    stream's largest magnitude) from float64, now 3.5e-3 (float32: 3e-7; what remains is the bf16 matmul inputs)."""
    num_layers = 8
    config = dict(hidden_size=64, mlp_dim=128, num_heads=4, num_layers=num_layers)
    model = build_model(tiny_config(dtype="bfloat16", **config), 5)
    images = jnp.asarray(np.random.default_rng(3).standard_normal((4, 32, 32, 3)), jnp.float32)
    params = _noise_params(model, images, scale=0.2)
    embedded, stream = _captured_stream(model, images, params)
    assert embedded.dtype == jnp.float32 and len(stream) == num_layers + 1
    assert all(x.dtype == jnp.float32 for x in stream), [x.dtype for x in stream]
    want = reference_stream(params, images, "token", patch=4)
    err = [float(np.abs(np.asarray(x, np.float64) - w).max() / np.abs(w).max()) for x, w in zip(stream, want)]
    assert err[-1] < 6e-3, err


@pytest.mark.parametrize("variant", ["scan", "hybrid", "axial", "masked_patch"])
def test_bfloat16_residual_stream_is_float32_in_every_variant(variant):
    overrides = {"scan": dict(scan=True), "hybrid": dict(resnet_layers=(1, 1), patch_size=8),
                 "axial": dict(axial=True, classifier="gap"), "masked_patch": {}}[variant]
    extra = dict(masked_patch_classes=8) if variant == "masked_patch" else {}
    model = build_model(tiny_config(dtype="bfloat16", **overrides), 5, **extra)
    embedded, stream = _captured_stream(model, jnp.zeros((2, 32, 32, 3)))
    assert embedded.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in stream), [x.dtype for x in stream]


@pytest.mark.parametrize("scan", [False, True])
def test_stochastic_depth_of_one_drops_every_branch_with_zero_not_nan_gradients(scan):
    """Rate 1 (the last block of stochastic_depth=1.0): every branch dropped, so that block is the identity, its
    params get zero gradients and all gradients are finite (y / keep under a `where` sent 0 x 1/0 = NaN into them).
    With scan the rate is traced."""
    from vit_jax.models.vit import Encoder

    encoder = Encoder(num_layers=2, num_heads=2, mlp_dim=16, stochastic_depth=1.0, scan=scan)  # rates 0, 1
    x = jax.random.normal(jax.random.key(2), (4, 4, 8))
    params = _noise_params(encoder, x, train=True)

    def loss(p, x):
        y, state = encoder.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)},
                                 capture_intermediates=True, mutable=["intermediates"])
        return jnp.sum(y ** 2), state["intermediates"]

    (_, captured), (grads, grad_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves((grads, grad_x)))
    if scan:
        outputs = captured["encoderblock"]["__call__"][0]  # stacked over depth
        last_grads = jax.tree.map(lambda g: g[1], grads["encoderblock"])
    else:
        outputs = [captured[f"encoderblock_{i}"]["__call__"][0] for i in range(2)]
        last_grads = grads["encoderblock_1"]
    np.testing.assert_array_equal(outputs[1], outputs[0])  # the last block adds nothing
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(last_grads))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))  # the first block's are not all zero


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_a_drop_path_rate_outside_zero_one_is_refused(rate):
    from vit_jax.models.vit import Encoder, EncoderBlock

    x = jnp.zeros((2, 4, 8))
    with pytest.raises(ValueError, match=re.escape(f"stochastic_depth={rate!r} is invalid: expected a rate in [0, 1]")):
        jax.eval_shape(lambda: Encoder(num_layers=2, num_heads=2, mlp_dim=16, stochastic_depth=rate).init(
            jax.random.key(0), x, train=False))  # also in evaluation, where it is unused
    block = EncoderBlock(num_heads=2, mlp_dim=16, use_stochastic_depth=True, deterministic=False)
    with pytest.raises(ValueError, match=re.escape(f"drop_rate={rate!r} is invalid: expected a rate in [0, 1]")):
        jax.eval_shape(lambda: block.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, rate))


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_params_of_another_resolution_are_refused_with_the_remedy(classifier):
    """Params initialised at 16x16 pixels (a 4x4 patch grid) applied to 32x32 images: flax's ScopeParamShapeError
    named neither grid nor what to do."""
    model = build_model(tiny_config(classifier=classifier, num_layers=1), 5)
    params = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))["params"])
    cls, prefix = (" \\+ the class token", 1) if classifier == "token" else ("", 0)
    message = (f"the position embeddings hold {16 + prefix} tokens \\(a 4x4 patch grid{cls}, 16x16 pixels\\), but "
               f"images of 32x32 pixels give {64 + prefix} \\(8x8 patches of 4 pixels{cls}\\): .*"
               f"vit_jax.interop.resize_posemb\\(pos_embedding, \\(8, 8\\), num_prefix_tokens={prefix}\\).* or feed "
               "images of 16x16 pixels \\(config.image_size=16\\)")
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 32, 32, 3))), params)
    with pytest.raises(ValueError, match="16x24 pixels give .* \\(4x6 patches"):  # non-square images too
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 16, 24, 3))), params)
    jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 16, 16, 3))), params)  # the same grid: fine


@pytest.mark.parametrize("field, value, message", [
    ("patch_size", 0, "patch_size=0 is invalid: expected a positive integer \\(the side of a square patch"),
    ("patch_size", -4, "patch_size=-4 is invalid: expected a positive integer"),
    ("num_heads", 0, "num_heads=0 is invalid: expected a positive integer dividing hidden_size=32"),
])
def test_a_patch_size_or_head_count_that_is_no_positive_integer_is_refused(field, value, message):
    model = build_model(tiny_config(**{field: value}), 5)  # 0 failed on a ZeroDivisionError
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))


def test_attention_with_no_heads_is_refused():
    from vit_jax.models.vit import MultiHeadDotProductAttention

    with pytest.raises(ValueError, match="num_heads=0 is invalid: expected a positive integer dividing the hidden "
                                         "size 8"):
        jax.eval_shape(lambda: MultiHeadDotProductAttention(num_heads=0).init(jax.random.key(0), jnp.zeros((1, 4, 8))))


def test_float64_model_keeps_attention_in_float64():
    """A float64 model's attention logits and softmax are float64 (they were forced to float32): the model matches
    the float64 reference to ~1e-13, not float32's ~1e-7."""
    config = tiny_config(num_layers=1)
    with jax.enable_x64(True):
        model = build_model(config, 5, dtype=jnp.float64, capture_attention=True)
        images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3), jnp.float64)
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), _noise_params(model, images, scale=0.5))
        _, state = jax.jit(lambda p: model.apply({"params": p}, images, mutable=["intermediates"]))(params)
        state = jax.device_get(state["intermediates"])
    attention = state["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["attention"][0]
    assert attention.dtype == np.float64
    want = reference_stream(params, images, "token", patch=4)[-1]
    t = params["Transformer"]
    want = _layer_norm(want, t["encoder_norm"]["scale"], t["encoder_norm"]["bias"], 1e-6)
    np.testing.assert_allclose(state["encoded"][0], want, rtol=0, atol=1e-11)
