"""`vit_jax.analysis`: rollout, attention distance, position similarity and filter PCA against hand computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.metrics.pairwise import cosine_similarity

from configs import common
from vit_jax import analysis
from vit_jax.models.vit import build_model, stack_blocks


def tiny_model_config(**overrides):
    config = common.model_config("Ti/16")
    config.update(dict(variant="custom", hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, patch_size=4,
                       dropout_rate=0.0))
    config.update(overrides)
    return config


def random_params(model_config, image_size=16, num_classes=5, seed=0):
    """The model's param tree filled with noise (not its init), so that attention is far from uniform."""
    model = build_model(model_config, num_classes)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = nn.unbox(jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32), shapes)


# --- attention rollout -------------------------------------------------------------------------------------

def test_rollout_of_self_attention_is_identity():
    tokens = 5
    identity = np.broadcast_to(np.eye(tokens), (3, 4, tokens, tokens))  # batch 3, 4 heads
    rollout = analysis.attention_rollout([identity, identity, identity])
    np.testing.assert_allclose(rollout, np.broadcast_to(np.eye(tokens), (3, tokens, tokens)), atol=1e-12)


def test_rollout_matches_hand_computation_and_multiplies_last_layer_on_the_left():
    # Layer 1: heads I and the swap average to all-0.5; + I, renormalised -> [[.75, .25], [.25, .75]].
    layer1 = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # Layer 2: every token attends to token 0; + I, renormalised -> [[1, 0], [.5, .5]].
    layer2 = np.array([[[1.0, 0.0], [1.0, 0.0]]] * 2)
    expected = np.array([[1.0, 0.0], [0.5, 0.5]]) @ np.array([[0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_allclose(expected, [[0.75, 0.25], [0.5, 0.5]])
    np.testing.assert_allclose(analysis.attention_rollout([layer1, layer2]), expected, atol=1e-12)


def test_rollout_rows_stay_distributions():
    rng = np.random.default_rng(0)
    layers = [rng.dirichlet(np.ones(7), size=(2, 3, 7)) for _ in range(4)]
    rollout = analysis.attention_rollout(layers)
    assert rollout.shape == (2, 7, 7)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-12)


def test_rollout_mask_of_uniform_attention_is_uniform():
    tokens = 1 + 9  # class token + a 3x3 grid
    uniform = np.full((1, 2, tokens, tokens), 1.0 / tokens)
    mask = analysis.rollout_mask(analysis.attention_rollout([uniform] * 3), num_prefix=1)
    assert mask.shape == (1, 3, 3)
    np.testing.assert_allclose(mask, 1.0, atol=1e-12)


def test_rollout_mask_reads_the_class_token_row_in_grid_order():
    rollout = np.zeros((5, 5))
    rollout[0, 1:] = [0.1, 0.2, 0.3, 0.4]  # class token over patches (0,0), (0,1), (1,0), (1,1)
    rollout[1:, 1] = 9.0  # patch rows must not leak into a token-classifier map
    np.testing.assert_allclose(analysis.rollout_mask(rollout, 1), [[0.25, 0.5], [0.75, 1.0]])
    # GAP (no class token): the mean over every token's row.
    gap = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 2.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 2.0, 0.0]])
    np.testing.assert_allclose(analysis.rollout_mask(gap, 0), [[0.5, 0.0], [0.5, 1.0]])


def test_rollout_mask_rejects_non_square_grid():
    with pytest.raises(ValueError, match="6 patches"):
        analysis.rollout_mask(np.eye(7), 1)


def test_upsample_mask_keeps_constant_and_size():
    out = analysis.upsample_mask(np.full((2, 2), 0.5), (32, 48))
    assert out.shape == (32, 48)
    np.testing.assert_allclose(out, 0.5, atol=1e-6)


# --- mean attention distance ----------------------------------------------------------------------------------

def test_patch_distances_on_a_small_grid():
    d = analysis.patch_distances((2, 3), 16)
    assert d.shape == (6, 6)
    assert d[0, 5] == pytest.approx(16 * np.sqrt(1 + 4))  # (0,0) -> (1,2)
    assert d[1, 4] == pytest.approx(16.0)  # (0,1) -> (1,1)
    np.testing.assert_allclose(d, d.T)


def test_uniform_attention_on_2x2_grid_has_hand_computed_distance():
    # Each patch sees itself (0), two neighbours (16 px) and the diagonal (16 sqrt 2): mean 8 + 4 sqrt 2.
    uniform = np.full((1, 1, 5, 5), 0.2)  # class token + 4 patches; the class token's share is renormalised away
    distance = analysis.attention_distance(uniform, patch_size=16, num_prefix=1)
    assert distance.shape == (1, 1)
    assert distance[0, 0] == pytest.approx(8 + 4 * np.sqrt(2))


def test_attention_distance_per_head_and_image():
    grid, patch = 3, 16
    to_corner = np.zeros((9, 9))
    to_corner[:, 0] = 1.0  # every patch attends to patch (0, 0)
    attention = np.stack([np.stack([np.eye(9), to_corner]), np.stack([to_corner, to_corner])])  # (2, 2, 9, 9)
    corner = np.mean([patch * np.hypot(r, c) for r in range(grid) for c in range(grid)])
    distance = analysis.attention_distance(attention, patch, num_prefix=0)
    np.testing.assert_allclose(distance, [[0.0, corner], [corner, corner]])


def test_a_query_that_reads_only_the_class_token_is_left_out_not_nan():
    attention = np.full((1, 1, 5, 5), 0.2)
    attention[0, 0, 1] = [1.0, 0.0, 0.0, 0.0, 0.0]  # patch 0 reads the class token alone (underflowed softmax)
    distance = analysis.attention_distance(attention, patch_size=16, num_prefix=1)
    assert distance[0, 0] == pytest.approx(8 + 4 * np.sqrt(2))  # the other three queries' uniform mean
    only_class = np.zeros((1, 1, 5, 5))
    only_class[..., 0] = 1.0
    np.testing.assert_array_equal(analysis.attention_distance(only_class, 16, 1), [[0.0]])


# --- position embedding similarity ----------------------------------------------------------------------------

def test_position_similarity_is_cosine_without_the_class_token():
    rng = np.random.default_rng(1)
    pos = rng.normal(size=(1, 1 + 16, 8))
    pos[0, 0] = 1e6  # the class token slot must not enter
    sim = analysis.position_embedding_similarity(pos, num_prefix=1)
    assert sim.shape == (4, 4, 4, 4)
    flat = sim.reshape(16, 16)
    np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-12)
    np.testing.assert_allclose(flat, flat.T, atol=1e-12)
    np.testing.assert_allclose(flat, cosine_similarity(pos[0, 1:]), atol=1e-12)
    # Tile (i, j) is patch (i, j)'s map: patch (1, 2) is flat index 6.
    np.testing.assert_allclose(sim[1, 2], flat[6].reshape(4, 4))


# --- embedding filter PCA -------------------------------------------------------------------------------------

def test_filter_components_match_sklearn_and_covariance_eigenvectors():
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(4, 4, 3, 64)) * np.linspace(0.1, 2.0, 48).reshape(4, 4, 3, 1)
    components, ratios = analysis.embedding_filter_components(kernel, num_components=10)
    assert components.shape == (10, 4, 4, 3)
    samples = kernel.reshape(48, 64).T
    pca = PCA(n_components=10, svd_solver="full").fit(samples)
    flat = components.reshape(10, 48)
    signs = np.sign((flat * pca.components_).sum(-1))
    np.testing.assert_allclose(flat, signs[:, None] * pca.components_, atol=1e-8)
    np.testing.assert_allclose(ratios, pca.explained_variance_ratio_, rtol=1e-8)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(samples, rowvar=False))
    top = eigenvectors[:, ::-1][:, :10].T
    np.testing.assert_allclose(np.abs((flat * top).sum(-1)), 1.0, atol=1e-8)
    # Sign convention: the largest-magnitude entry of each component is positive.
    assert np.all(flat[np.arange(10), np.abs(flat).argmax(1)] > 0)


def test_filter_components_capped_by_filter_count_and_reject_non_rgb():
    components, ratios = analysis.embedding_filter_components(np.ones((2, 2, 3, 5)) + np.arange(5), 28)
    assert components.shape[0] == 5 and ratios.shape == (5,)
    with pytest.raises(ValueError, match="RGB"):
        analysis.embedding_filter_components(np.zeros((1, 1, 64, 32)))


# --- attention capture from a model ---------------------------------------------------------------------------

def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_captured_first_layer_attention_matches_numpy_forward():
    config = tiny_model_config()
    params = random_params(config)
    images = np.asarray(jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1, maxval=1))
    attentions = analysis.capture_attention(config, params, images)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 17, 17)
    # Layer 0 by hand: patchify, embed, class token, position embeddings, LayerNorm, q.k / sqrt(d), softmax.
    patches = images.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
    x = patches @ params["embedding"]["kernel"].reshape(48, 32) + params["embedding"]["bias"]
    x = np.concatenate([np.broadcast_to(params["cls"], (2, 1, 32)), x], axis=1)
    x = x + params["Transformer"]["posembed_input"]["pos_embedding"]
    block = params["Transformer"]["encoderblock_0"]
    y = _layer_norm(x, block["LayerNorm_0"]["scale"], block["LayerNorm_0"]["bias"])
    attn = block["MultiHeadDotProductAttention_1"]
    q = np.einsum("btd,dhk->bthk", y, attn["query"]["kernel"]) + attn["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", y, attn["key"]["kernel"]) + attn["key"]["bias"]
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(16)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(attentions[0], expected, rtol=1e-4, atol=1e-5)


def test_capture_reads_scan_layout_and_gap_models():
    config = tiny_model_config(classifier="gap")
    params = random_params(config)
    images = jax.random.normal(jax.random.key(4), (1, 16, 16, 3))
    per_block = analysis.capture_attention(config, params, images)
    stacked = analysis.capture_attention(tiny_model_config(classifier="gap", scan=True),
                                         stack_blocks(params, 2), images)
    assert per_block[0].shape == (1, 2, 16, 16)
    for a, b in zip(per_block, stacked):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_capture_refuses_axial_models():
    config = tiny_model_config(classifier="gap", axial=True)
    with pytest.raises(ValueError, match="axial"):
        analysis.capture_attention(config, {}, np.zeros((1, 16, 16, 3)))


def test_summarizer_reduces_a_non_square_grid_from_the_params_init_returns():
    """8x16 images of 4-pixel patches: a 2x4 grid (not square), with flax's boxed params straight from init."""
    config = tiny_model_config()
    images = np.asarray(jax.random.uniform(jax.random.key(5), (2, 8, 16, 3), minval=-1, maxval=1))
    params = build_model(config, 5).init(jax.random.key(6), images)["params"]
    assert isinstance(params["embedding"]["kernel"], nn.LogicallyPartitioned)
    rollout, distances = analysis.attention_summarizer(config, params)(images)
    attentions = analysis.capture_attention(config, params, images)
    np.testing.assert_allclose(rollout, analysis.attention_rollout(attentions), rtol=1e-5, atol=1e-6)
    # Mean attention distance by hand, patch centres of the 2x4 grid in pixels, class token left out.
    centres = np.array([(4.0 * r, 4.0 * c) for r in range(2) for c in range(4)])
    pixels = np.sqrt(((centres[:, None] - centres[None]) ** 2).sum(-1))
    for layer, attention in enumerate(attentions):
        patch = np.asarray(attention, np.float64)[..., 1:, 1:]
        expected = ((patch / patch.sum(-1, keepdims=True)) * pixels).sum(-1).mean(-1)
        np.testing.assert_allclose(distances[:, layer], expected, rtol=1e-5)
    assert analysis.rollout_mask(rollout, 1, (2, 4)).shape == (2, 2, 4)
    with pytest.raises(ValueError, match="3x3 patch grid holds 9 patches, not 8"):
        analysis.attention_distance(attentions[0], 4, 1, (3, 3))
    similarity = analysis.position_embedding_similarity(params["Transformer"]["posembed_input"]["pos_embedding"], 1,
                                                        (2, 4))
    assert similarity.shape == (2, 4, 2, 4)
