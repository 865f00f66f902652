"""The data behind the ViT paper's analysis figures (Dosovitskiy et al., 2020, Figures 6, 7 and 14).

Pure functions of a model's parameters and attention maps, returning NumPy arrays that `vit_jax.visualize`
draws:

- `attention_rollout` / `rollout_mask`: attention rollout (Abnar & Zuidema, 2020), Figures 6 and 14.
- `attention_distance`: mean attention distance per head, Figure 7 (right).
- `position_embedding_similarity`: cosine similarity between position embeddings, Figure 7 (centre).
- `embedding_filter_components`: principal components of the patch-embedding filters, Figure 7 (left).

`capture_attention` runs a model once and returns its attention probabilities, layer by layer;
`attention_summarizer` returns only the rollout and the distances, reduced inside the compiled forward pass, so a
big model's attention is held one layer at a time (ViT-H/14 at 518 px: ~3.9 GB per image for all 32 layers).
The rollout and distance functions take NumPy arrays (computed in float64) or JAX arrays (computed as they are,
inside `jax.jit` too).
Attention arrays are (batch, heads, tokens, tokens): row q holds query q's weights over the keys. The first
`num_prefix_tokens` tokens (the class token, when the classifier is "token") have no place in the patch grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from PIL import Image

from vit_jax.models.vit import build_model, unstack_blocks


def num_prefix_tokens(model_config: ml_collections.ConfigDict) -> int:
    """Tokens before the patches: 1 (the class token) for classifier "token", 0 for "gap"."""
    return 1 if model_config.classifier == "token" else 0


def _as_float(array: Any) -> tuple[Any, Any]:
    """(`array` as float64 NumPy, NumPy), or a JAX array (traced inside jit too) as it is with jax.numpy."""
    return (array, jnp) if isinstance(array, jax.Array) else (np.asarray(array, np.float64), np)


def patch_grid(images_shape: Sequence[int], patch_size: int) -> tuple[int, int]:
    """(rows, columns) of the patch grid of images of shape (batch, height, width, channels)."""
    return images_shape[1] // patch_size, images_shape[2] // patch_size


def square_grid(num_patches: int) -> tuple[int, int]:
    """The (rows, columns) of a square patch grid of `num_patches` patches."""
    side = int(round(np.sqrt(num_patches)))
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    return side, side


def _grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """`grid` checked against the patch count, or the square grid of that many patches."""
    if grid is None:
        return square_grid(num_patches)
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"a {grid[0]}x{grid[1]} patch grid holds {grid[0] * grid[1]} patches, not {num_patches}")
    return tuple(grid)


def capture_attention(model_config: ml_collections.ConfigDict, params: Mapping[str, Any],
                      images: np.ndarray | jax.Array) -> list[np.ndarray]:
    """Attention probabilities of every encoder block for `images` (batch, S, S, 3) in [-1, 1].

    Returns one float32 array (batch, heads, tokens, tokens) per layer, first layer first. Params may be in
    the per-block or the scan layout. The model runs in float32 whatever `model_config.dtype` says: the
    figures are about the weights, not about throughput. For many batches, `attention_capturer` compiles once.
    """
    return attention_capturer(model_config, params)(images)


def attention_capturer(model_config: ml_collections.ConfigDict, params: Mapping[str, Any]
                       ) -> Callable[[np.ndarray | jax.Array], list[np.ndarray]]:
    """`capture_attention` with the model built and compiled once: images -> one array per layer (each batch
    size compiles once)."""
    attentions, params = _attention_forward(model_config, params)
    forward = jax.jit(attentions)

    def capture(images: np.ndarray | jax.Array) -> list[np.ndarray]:
        return [np.asarray(a) for a in forward(params, jnp.asarray(images, jnp.float32))]

    capture.forward = forward  # the jitted forward pass: one compilation per batch shape
    return capture


def attention_summarizer(model_config: ml_collections.ConfigDict, params: Mapping[str, Any]
                         ) -> Callable[[np.ndarray | jax.Array], tuple[np.ndarray, np.ndarray]]:
    """images (batch, H, W, 3) -> (`attention_rollout` (batch, tokens, tokens), `attention_distance` of every
    layer (batch, layers, heads)), both reduced inside one compiled forward pass (float32), so no more than a
    layer's attention is alive at once; the patch grid is the images' (H / patch, W / patch)."""
    attentions, params = _attention_forward(model_config, params)
    num_prefix, patch = num_prefix_tokens(model_config), model_config.patch_size

    @jax.jit
    def forward(p, x):
        layers = attentions(p, x)
        distances = [attention_distance(a, patch, num_prefix, patch_grid(x.shape, patch)) for a in layers]
        # Each layer's head average, materialised (the barrier): XLA otherwise fuses the average into the
        # rollout's products at the end and keeps every layer's attention alive until then (+1 layer each).
        means = [jax.lax.optimization_barrier(a.mean(axis=1, keepdims=True)) for a in layers]
        return attention_rollout(means), jnp.stack(distances, axis=1)

    def summarize(images: np.ndarray | jax.Array) -> tuple[np.ndarray, np.ndarray]:
        rollout, distances = forward(params, jnp.asarray(images, jnp.float32))
        return np.asarray(rollout, np.float64), np.asarray(distances, np.float64)

    summarize.forward = forward  # one compilation per batch shape
    return summarize


def _attention_forward(model_config: ml_collections.ConfigDict, params: Mapping[str, Any]
                       ) -> tuple[Callable[[Any, jax.Array], list[jax.Array]], Any]:
    """(params, images -> the attention of every layer, the params on the device): the model in float32 (the
    figures are about the weights, not throughput), per-block layout, capturing its attention."""
    if model_config.axial:
        raise ValueError("an Axial-ViT attends within rows and columns only; attention rollout and mean attention "
                         "distance are defined for full self-attention (model.axial=False)")
    params = dict(nn.unbox(params))  # as flax's init returns them, too
    if "encoderblock" in params.get("Transformer", {}):
        params = unstack_blocks(params)
    overrides: dict[str, Any] = dict(capture_attention=True, scan=False, remat=False, dtype=jnp.float32)
    if "head" in params:
        num_classes = params["head"]["kernel"].shape[-1]
    elif "masked_patch_head" in params:  # a masked-patch-prediction model: per-patch logits, no head
        num_classes = 1
        overrides["masked_patch_classes"] = params["masked_patch_head"]["kernel"].shape[-1]
    else:
        raise ValueError(f"params have neither 'head' nor 'masked_patch_head'; top-level keys: {sorted(params)}")
    model = build_model(model_config, num_classes, **overrides)

    def attentions(p, x):
        _, state = model.apply({"params": p}, x, train=False, mutable=["intermediates"])
        sown = state["intermediates"]["Transformer"]
        return [sown[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention"][0]
                for i in range(model_config.num_layers)]

    return attentions, jax.device_put(params)  # put once, not at every batch


def attention_rollout(attentions: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Attention rollout through all layers: (..., tokens, tokens) from one (..., heads, tokens, tokens) per layer.

    Per layer: average the heads, add the identity for the residual connection, renormalise each row to
    sum to one; then multiply the layers' matrices, the last layer on the left (Abnar & Zuidema, 2020, as
    in the ViT paper's Figure 6). Row q of the result says how much of each input token reaches token q.
    """
    joint = None
    for attention in attentions:
        attention, xp = _as_float(attention)
        attention = attention.mean(axis=-3)
        augmented = attention + xp.eye(attention.shape[-1], dtype=attention.dtype)
        augmented = augmented / augmented.sum(axis=-1, keepdims=True)
        joint = augmented if joint is None else augmented @ joint
    if joint is None:
        raise ValueError("attention_rollout needs the attention of at least one layer")
    return joint


def rollout_mask(rollout: np.ndarray, num_prefix: int, grid: tuple[int, int] | None = None) -> np.ndarray:
    """The rollout as a (..., rows, columns) map over the patch `grid` (default: square), scaled to a maximum of 1.

    With a class token (`num_prefix` = 1): its row, over the patch columns (what the classifier reads).
    Without one (GAP): the mean over the patches' rows, since pooling reads every patch equally.
    """
    rollout = np.asarray(rollout, np.float64)
    num_patches = rollout.shape[-1] - num_prefix
    weights = rollout[..., 0, num_prefix:] if num_prefix else rollout[..., :, num_prefix:].mean(axis=-2)
    weights = weights.reshape(weights.shape[:-1] + _grid(num_patches, grid))
    # A map that is zero everywhere (the class token read no patch) stays zero rather than dividing by zero.
    return weights / np.maximum(weights.max(axis=(-2, -1), keepdims=True), np.finfo(np.float64).tiny)


def upsample_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (rows, columns) map resized bilinearly to `size` = (height, width) pixels."""
    height, width = size
    resized = Image.fromarray(np.asarray(mask, np.float32)).resize((width, height), Image.BILINEAR)
    return np.asarray(resized, np.float32)


def patch_distances(grid_shape: tuple[int, int], patch_size: int) -> np.ndarray:
    """(patches, patches) Euclidean distances in pixels between patch centres, patches in row-major order."""
    rows, columns = np.meshgrid(np.arange(grid_shape[0]), np.arange(grid_shape[1]), indexing="ij")
    centres = np.stack([rows.ravel(), columns.ravel()], axis=-1).astype(np.float64) * patch_size
    return np.sqrt(((centres[:, None, :] - centres[None, :, :]) ** 2).sum(-1))


def attention_distance(attention: np.ndarray, patch_size: int, num_prefix: int,
                       grid: tuple[int, int] | None = None) -> np.ndarray:
    """Mean attention distance in pixels, (batch, heads), of one layer's attention (batch, heads, tokens, tokens)
    over the patch `grid` (rows, columns; default: square).

    For each patch query: the average distance to the key patches weighted by its attention to them
    (renormalised over the patches, as the class token has no place); then the mean over the queries (those that
    weigh some patch).
    The paper's Figure 7 (right) averages this over images.
    """
    attention, xp = _as_float(attention)
    patch_attention = attention[..., num_prefix:, num_prefix:]
    # A query that put all of its weight on the class token (a float32 softmax underflowing on every patch)
    # weighs no patch: it is left out of the mean rather than turning it into NaN (no query left: 0).
    total = patch_attention.sum(axis=-1)
    weighs = total > 0
    patch_attention = patch_attention / xp.where(weighs, total, 1.0)[..., None]
    distances = patch_distances(_grid(patch_attention.shape[-1], grid), patch_size)
    per_query = (patch_attention * distances.astype(patch_attention.dtype)).sum(axis=-1)
    return (per_query * weighs).sum(axis=-1) / xp.maximum(weighs.sum(axis=-1), 1)


def position_embedding_similarity(pos_embedding: np.ndarray, num_prefix: int,
                                  grid: tuple[int, int] | None = None) -> np.ndarray:
    """(rows, columns, rows, columns) cosine similarities between the patches' position embeddings on the patch
    `grid` (default: square).

    `pos_embedding` is the model's (1, tokens, embed) or (tokens, embed); the first `num_prefix` (class
    token) entries are left out. Entry [i, j] is patch i's similarity map over the grid (Figure 7, centre).
    """
    pos_embedding = np.asarray(nn.unbox(pos_embedding), np.float64)  # as flax's init returns it, too
    embeddings = pos_embedding.reshape(-1, pos_embedding.shape[-1])[num_prefix:]
    grid = _grid(embeddings.shape[0], grid)
    unit = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return (unit @ unit.T).reshape(grid + grid)


def embedding_filter_components(kernel: np.ndarray, num_components: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the patch-embedding filters: (components (k, patch, patch, 3), variance ratios (k,)).

    `kernel` is the embedding convolution's (patch, patch, 3, embed): each of the `embed` filters is one
    sample. The components are the right singular vectors of the centred samples, largest first, each
    signed so that its largest-magnitude entry is positive; k = min(num_components, filters, patch x patch x 3).
    """
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 4 or kernel.shape[2] != 3:
        raise ValueError(f"expected an RGB embedding kernel (patch, patch, 3, embed), got shape {kernel.shape}; "
                         "hybrid models embed ResNet features, not pixels")
    if num_components < 1:
        raise ValueError(f"num_components must be at least 1, got {num_components}")
    samples = kernel.reshape(-1, kernel.shape[-1]).T
    centred = samples - samples.mean(axis=0)
    _, singular_values, vt = np.linalg.svd(centred, full_matrices=False)
    k = min(num_components, vt.shape[0])
    components = vt[:k]
    largest = np.argmax(np.abs(components), axis=1)
    components = components * np.sign(components[np.arange(k), largest])[:, None]
    variance = singular_values**2
    ratios = variance[:k] / variance.sum()
    return components.reshape((k,) + kernel.shape[:3]), ratios
