"""Axial-ViT: equals full attention masked to rows then columns (float64), its parameter count, FLOPs and errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from tests.test_vit import _gelu_tanh, _layer_norm, tiny_config
from vit_jax.models import axial
from vit_jax.models.variants import parse_variant
from vit_jax.models.vit import EncoderBlock, build_model, stack_blocks, unstack_blocks
from vit_jax.summary import layer_table, summarize


def axial_config(**overrides):
    return tiny_config(classifier="gap", axial=True, **overrides)


def random_params(model, image_shape, seed=0, dtype=jnp.float32, scale=0.2):
    """Noise of the shapes `model.init` would give (nothing run eagerly), so no zero-initialised param hides errors."""
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape, dtype)))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), dtype), shapes)


def masked_block(x, blk, allowed, eps=1e-6):
    """A pre-LN Transformer block in float64 numpy whose full attention is masked to `allowed` (T, T)."""
    y = _layer_norm(x, blk["LayerNorm_0"]["scale"], blk["LayerNorm_0"]["bias"], eps)
    att = blk["MultiHeadDotProductAttention_1"]
    q, k, v = (np.einsum("btd,dhk->bthk", y, att[n]["kernel"]) + att[n]["bias"] for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum("bhqt,bthk->bqhk", weights, v)
    x = x + np.einsum("bqhk,hkd->bqd", y, att["out"]["kernel"]) + att["out"]["bias"]
    y = _layer_norm(x, blk["LayerNorm_2"]["scale"], blk["LayerNorm_2"]["bias"], eps)
    mlp = blk["MlpBlock_3"]
    y = _gelu_tanh(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
    return x + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


def reference_axial_vit(params, images, patch, eps=1e-6, global_control=False):
    """Axial-ViT (GAP) in float64 numpy: full attention over all patches, masked to same row, then same column.

    `global_control` leaves every attention unmasked: a control that the masks matter."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(images, np.float64)
    b, h, w, c = x.shape
    gh, gw = h // patch, w // patch
    patches = x.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, -1)
    x = patches @ p["embedding"]["kernel"].reshape(-1, p["embedding"]["kernel"].shape[-1]) + p["embedding"]["bias"]
    t = p["Transformer"]
    x = x + t["posembed_input"]["pos_embedding"]
    row, col = np.divmod(np.arange(gh * gw), gw)
    same_row, same_col = row[:, None] == row[None, :], col[:, None] == col[None, :]
    if global_control:
        same_row = same_col = np.ones_like(same_row)
    i = 0
    while f"encoderblock_{i}" in t:
        x = masked_block(x, t[f"encoderblock_{i}"]["row"], same_row, eps)
        x = masked_block(x, t[f"encoderblock_{i}"]["column"], same_col, eps)
        i += 1
    x = _layer_norm(x, t["encoder_norm"]["scale"], t["encoder_norm"]["bias"], eps)
    return x.mean(1) @ p["head"]["kernel"] + p["head"]["bias"]


def test_axial_equals_full_attention_masked_to_rows_then_columns_float64():
    images_shape = (2, 12, 20, 3)  # a 3 x 5 patch grid: rows and columns of different lengths
    with jax.enable_x64(True):
        model = build_model(axial_config(), 5, dtype=jnp.float64)
        params = random_params(model, images_shape, dtype=jnp.float64, scale=0.3)
        images = jax.random.normal(jax.random.key(3), images_shape, jnp.float64)
        _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"]))(params, images)
        pooled = np.asarray(state["intermediates"]["representation"][0])
    assert pooled.dtype == np.float64  # (the logits themselves are float32 by contract)
    logits = pooled @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    expected = reference_axial_vit(params, images, patch=4)
    # Off GPU attention is explicit, its logits and softmax float64 in a float64 model (they were float32: a match
    # to only ~1e-8); on GPU jax.nn.dot_product_attention keeps its softmax in float32 (~1e-7 relative). Any
    # wrong neighbourhood shows up at 1e-3 (the control below).
    tol = 1e-7 if jax.default_backend() == "gpu" else 1e-12
    np.testing.assert_allclose(logits, expected, rtol=tol, atol=tol)
    control = reference_axial_vit(params, images, patch=4, global_control=True)
    assert np.abs(control - expected).max() > 1e-3


def test_lines_roundtrip_and_layout():
    x = jnp.arange(2 * 3 * 5 * 1, dtype=jnp.float32).reshape(2, 15, 1)
    rows = axial.to_lines(x, (3, 5), "row")
    cols = axial.to_lines(x, (3, 5), "column")
    grid = np.asarray(x).reshape(2, 3, 5)
    np.testing.assert_array_equal(rows[4, :, 0], grid[1, 1, :])  # image 1, row 1
    np.testing.assert_array_equal(cols[7, :, 0], grid[1, :, 2])  # image 1, column 2
    for axis, lines in (("row", rows), ("column", cols)):
        np.testing.assert_array_equal(axial.from_lines(lines, (3, 5), axis), x)
    with pytest.raises(ValueError, match="3x4 patch grid"):
        axial.to_lines(x, (3, 4), "row")
    with pytest.raises(ValueError, match="axis must be one of"):
        axial.to_lines(x, (3, 5), "diagonal")


def axial_formula_params(variant, num_classes=1000, image_size=224):
    """Axial-ViT parameters by hand: ViT with GAP, every block doubled (a row half and a column half)."""
    v = parse_variant(variant)
    d, m, patch = v.hidden_size, v.mlp_dim, v.patch_size
    tokens = (image_size // patch) ** 2
    half = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
    return patch * patch * 3 * d + d + tokens * d + v.num_layers * 2 * half + 2 * d + d * num_classes + num_classes


@pytest.mark.parametrize("variant", ["B/16", "B/32"])
def test_axial_param_count_and_summary_flops_match_hand_count_and_xla(variant):
    config = common.get_config(variant)
    config.num_classes, config.model.axial, config.model.classifier = 1000, True, "gap"
    summary = summarize(config)
    assert summary["axial"] is True
    assert summary["params"] == axial_formula_params(variant)
    d, mlp, layers, g = config.model.hidden_size, config.model.mlp_dim, config.model.num_layers, 224 // (
        config.model.patch_size)
    t = g * g
    half = 2 * (4 * t * d * d + 2 * t * d * mlp) + 2 * 2 * t * g * d  # projections + MLP + scores/sums over g
    expected = 2 * t * config.model.patch_size ** 2 * 3 * d + layers * 2 * half + 2 * d * 1000
    assert summary["gflops_per_image"] == pytest.approx(expected / 1e9, rel=1e-9)
    assert 1.0 <= summary["xla_gflops_per_image"] / summary["gflops_per_image"] < 1.03


def test_summary_axial_attention_cheaper_but_total_as_paper_reports():
    """Row+column attention costs less than global attention at 384 and 512 px; with its extra MLP per block
    an Axial-ViT-B/16 still costs more in total there (the paper's appendix D.3), and less only at ~1,100+ px."""
    def flops(size, is_axial):
        config = common.get_config("B/16")
        config.num_classes, config.image_size, config.model.classifier = 1000, size, "gap"
        config.model.axial = is_axial
        return sum(row.flops for row in layer_table(config))

    d = 768
    for size in (384, 512):
        g = size // 16
        full_attention = 2.0 * 2 * (g * g) ** 2 * d
        assert axial.attention_flops(g * g, (g, g), d) < full_attention / 10
        assert flops(size, True) > flops(size, False)
    assert flops(1536, True) < 0.75 * flops(1536, False)


def test_axial_needs_gap_classifier():
    model = build_model(tiny_config(axial=True), 5)  # classifier "token"
    with pytest.raises(ValueError, match="axial=True needs classifier='gap'"):
        model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_axial_remat_and_scan_match_plain_and_tree_names():
    plain = build_model(axial_config(), 5)
    params = random_params(plain, (1, 16, 16, 3))
    assert set(params["Transformer"]["encoderblock_1"]) == {"row", "column"}
    assert set(params["Transformer"]["encoderblock_1"]["column"]) == {
        "LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"}
    images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
    expected = jax.jit(plain.apply)({"params": params}, images)
    remat = build_model(axial_config(remat=True), 5)
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, images), expected, rtol=1e-5, atol=1e-5)
    stacked = stack_blocks(params, 2)
    scanned = build_model(axial_config(scan=True, remat=True), 5)
    shapes = nn.unbox(jax.eval_shape(lambda: scanned.init(jax.random.key(0), images))["params"])
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), unstack_blocks(stacked), params))
    np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, images), expected, rtol=1e-5, atol=1e-5)


def test_axial_stochastic_depth_drops_whole_examples():
    """Drop-path keeps or drops a branch for a whole image, never for some rows or columns of it."""
    block = axial.AxialEncoderBlock(num_heads=2, mlp_dim=64, use_stochastic_depth=True, deterministic=False,
                                    grid_shape=(4, 4))
    x = jax.random.normal(jax.random.key(0), (64, 16, 32))
    params = jax.jit(lambda: block.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x, 0.7))()
    out = jax.jit(lambda p: block.apply(p, x, 0.7, rngs={"dropout": jax.random.key(3)}))(params)
    unchanged = np.all(np.asarray(out) == np.asarray(x), axis=-1)  # (batch, tokens)
    per_example = unchanged.all(axis=1)
    assert np.array_equal(unchanged.any(axis=1), per_example)  # never partly unchanged
    assert 0 < per_example.sum() < 64  # ~0.7**4 of the examples have all four branches dropped


def test_a_row_half_on_one_row_is_a_vit_block_dropout_included():
    """On a 1 x T grid a row attends over every token: the half is a ViT encoder block, so with the same params and
    dropout key it must give the same output in training (its attention-output dropout was `nn.Dropout`, another
    random stream than the ViT block's `layers.Dropout`, and skipped its rate check)."""
    kwargs = dict(num_heads=2, mlp_dim=64, dropout_rate=0.3, attention_dropout_rate=0.2, deterministic=False)
    row = axial.AxialSubBlock(grid_shape=(1, 16), axis="row", **kwargs)
    vit_block = EncoderBlock(**kwargs)
    x = jax.random.normal(jax.random.key(0), (4, 16, 32))
    rngs = {"params": jax.random.key(1), "dropout": jax.random.key(2)}
    params = jax.jit(lambda: vit_block.init(rngs, x))()
    expected = jax.jit(lambda p: vit_block.apply(p, x, rngs={"dropout": jax.random.key(3)}))(params)
    out = jax.jit(lambda p: row.apply(p, x, rngs={"dropout": jax.random.key(3)}))(params)
    assert not np.allclose(expected, jax.jit(lambda p: vit_block.apply(p, x, rngs={"dropout": jax.random.key(4)}))(
        params))  # dropout is on
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"rate=1.5 is invalid: expected a rate in \[0, 1\]"):
        axial.AxialSubBlock(grid_shape=(1, 16), **{**kwargs, "dropout_rate": 1.5}).init(rngs, x)
