"""Masked patch prediction: the ViT paper's self-supervised pre-training objective (section 4.6, appendix B.1.2).

Of each image's patch embeddings, `corrupt_fraction` (0.5) are corrupted, chosen uniformly without
replacement (exactly round(0.5 x patches) per image, so every image costs the same); each corrupted patch
independently becomes the learnable mask embedding (80%), the embedding of another patch of the same image
(10%; same image so a batch-sharded step needs no communication) or stays as it was (10%). The encoder's
output token of every corrupted patch predicts the patch's mean colour quantised to `colour_bits` bits per
channel: 3 bits -> 8**3 = 512 classes, class = r * 64 + g * 8 + b. Corruption happens after the patch
embedding and before the position embeddings are added, so the model knows where each prediction belongs.

The pre-training model is the classifier's `VisionTransformer` with `masked_patch_classes` set: the same
`embedding`, `cls`, `Transformer/...` tree plus `mask_embedding` and `masked_patch_head`, and no `head`.
Fine-tuning from such a checkpoint (`--config.pretrained=`) keeps the encoder, drops these two and starts a fresh
zero head (`vit_jax.interop.adapt_to_model`, which also resizes the position embeddings).

  python -m vit_jax.main --config=configs/vit_b16_mpp.py --workdir=/tmp/mpp   # the paper's optimizer for it

(`--config.objective=masked_patch_prediction` on any other config keeps that config's optimizer and schedule.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vit_jax.config_check import ConfigError
from vit_jax.models.vit import VisionTransformer, build_model

Array = jax.Array
OBJECTIVES = ("classification", "masked_patch_prediction")

# What happened to each patch (`sample_corruption`'s "kind"): left alone and not predicted, or corrupted
# (and predicted) by one of three replacements.
CLEAN, MASKED, RANDOM, KEPT = 0, 1, 2, 3


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for an unknown objective, masked-patch fractions that are not a distribution, or
    classification settings the masked-patch objective would ignore or misuse (mixup, label smoothing)."""
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"config.objective={config.objective!r} is invalid: expected one of {OBJECTIVES}")
    mp = config.masked_patch
    if not 0.0 < mp.corrupt_fraction <= 1.0:
        raise ConfigError(f"config.masked_patch.corrupt_fraction={mp.corrupt_fraction!r} is invalid: "
                          "expected a fraction in (0, 1]")
    for field in ("mask_fraction", "random_fraction"):
        if not 0.0 <= mp[field] <= 1.0:
            raise ConfigError(f"config.masked_patch.{field}={mp[field]!r} is invalid: expected a fraction in [0, 1]")
    if mp.mask_fraction + mp.random_fraction > 1.0 + 1e-9:
        raise ConfigError(f"config.masked_patch.mask_fraction + random_fraction = "
                          f"{mp.mask_fraction + mp.random_fraction!r} is invalid: they must sum to at most 1 "
                          "(the rest keep their embedding)")
    if isinstance(mp.colour_bits, bool) or not isinstance(mp.colour_bits, int) or not 1 <= mp.colour_bits <= 8:
        raise ConfigError(f"config.masked_patch.colour_bits={mp.colour_bits!r} is invalid: expected an integer "
                          "in [1, 8] (3 gives the paper's 512 colours)")
    if config.objective == "masked_patch_prediction" and config.model.resnet_layers:
        raise ConfigError(f"config.model.resnet_layers={tuple(config.model.resnet_layers)} is invalid with "
                          "objective='masked_patch_prediction': patches are corrupted after the ResNet trunk, whose "
                          "receptive field spans neighbouring patches, so the model would see the colours it is "
                          "asked for; pre-train a plain ViT (resnet_layers=())")
    if config.objective == "masked_patch_prediction" and config.pp.mixup_alpha > 0:
        raise ConfigError(f"config.pp.mixup_alpha={config.pp.mixup_alpha!r} is invalid with "
                          "objective='masked_patch_prediction': expected 0 (mixup blends two images, and the colours "
                          "to predict would be those of the blend)")
    if config.objective == "masked_patch_prediction" and config.optimizer.label_smoothing > 0:
        raise ConfigError(f"config.optimizer.label_smoothing={config.optimizer.label_smoothing!r} is invalid with "
                          "objective='masked_patch_prediction': expected 0 (it smooths class labels; the colour "
                          "targets are not smoothed)")
    num_patches = (config.image_size // config.model.patch_size) ** 2
    if config.objective == "masked_patch_prediction" and mp.random_fraction > 0 and num_patches < 2:
        raise ConfigError(f"config.masked_patch.random_fraction={mp.random_fraction!r} is invalid for "
                          f"{num_patches} patch per image (image_size={config.image_size}, "
                          f"model.patch_size={config.model.patch_size}): replacing a patch by another of the same "
                          "image needs at least 2; set it to 0 or use smaller patches")


def num_colour_classes(colour_bits: int) -> int:
    """Number of target classes for `colour_bits` bits per RGB channel (3 -> 512)."""
    return 2 ** (3 * colour_bits)


def colour_targets(images: Array, patch_size: int, colour_bits: int = 3) -> Array:
    """Quantised mean colour of every patch: (batch, H/p * W/p) int32 classes, patches in row-major order.

    `images` are (batch, H, W, 3) in [-1, 1]. Each channel's patch mean is mapped to [0, 1] and cut into
    2**colour_bits equal bins (1.0 falls in the top bin); class = sum over channels of bin x levels**(2 - c).
    """
    batch, height, width, channels = images.shape
    if channels != 3:
        raise ValueError(f"colour targets need RGB images (batch, H, W, 3), got shape {images.shape}")
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch_size={patch_size}")
    levels = 2**colour_bits
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.astype(jnp.float32).reshape(batch, grid_h, patch_size, grid_w, patch_size, 3)
    means = patches.mean(axis=(2, 4)).reshape(batch, grid_h * grid_w, 3)
    bins = jnp.clip(jnp.floor((means + 1.0) / 2.0 * levels), 0, levels - 1).astype(jnp.int32)
    return bins[..., 0] * levels * levels + bins[..., 1] * levels + bins[..., 2]


def num_corrupted(num_patches: int, corrupt_fraction: float) -> int:
    """Patches corrupted per image: round(corrupt_fraction x num_patches), half up, at least 1."""
    return max(1, int(np.floor(corrupt_fraction * num_patches + 0.5)))


def sample_corruption(rng: Array, batch: int, num_patches: int, masked_patch: ml_collections.ConfigDict
                      ) -> dict[str, Array]:
    """Draw which patches to corrupt and how: {"kind": (batch, patches) int32 CLEAN/MASKED/RANDOM/KEPT,
    "source": (batch, patches) int32, the patch of the same image whose embedding each position takes}."""
    if masked_patch.random_fraction > 0 and num_patches < 2:
        raise ValueError("replacing a patch by another of the same image needs at least 2 patches per image, got "
                         f"{num_patches}; set config.masked_patch.random_fraction=0 or use smaller patches")
    choose_rng, kind_rng, source_rng = jax.random.split(rng, 3)
    count = num_corrupted(num_patches, masked_patch.corrupt_fraction)
    # A uniformly random subset of `count` positions per image: those whose random score ranks lowest.
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(choose_rng, (batch, num_patches)), axis=1), axis=1)
    corrupted = ranks < count
    draw = jax.random.uniform(kind_rng, (batch, num_patches))
    kind = jnp.where(draw < masked_patch.mask_fraction, MASKED,
                     jnp.where(draw < masked_patch.mask_fraction + masked_patch.random_fraction, RANDOM, KEPT))
    kind = jnp.where(corrupted, kind, CLEAN).astype(jnp.int32)
    # Another position, uniform over the other num_patches - 1: draw from [0, n - 1) and skip over oneself.
    position = jnp.arange(num_patches, dtype=jnp.int32)
    other = jax.random.randint(source_rng, (batch, num_patches), 0, max(num_patches - 1, 1), dtype=jnp.int32)
    other = other + (other >= position)
    source = jnp.where(kind == RANDOM, other, position)
    return {"kind": kind, "source": source}


def sample_example_corruption(keys: Array, num_patches: int, masked_patch: ml_collections.ConfigDict
                              ) -> dict[str, Array]:
    """`sample_corruption` with one key per image (`keys`: (batch,) keys): each image's draw depends on its own key
    alone, not on the batch it is in."""
    draw = jax.vmap(lambda key: sample_corruption(key, 1, num_patches, masked_patch))(keys)
    return {name: value[:, 0] for name, value in draw.items()}


def build_pretraining_model(config: ml_collections.ConfigDict, **overrides: Any) -> VisionTransformer:
    """The masked-patch-prediction model of a run config: the classifier's encoder with a per-patch colour head."""
    check_config(config)
    classes = num_colour_classes(config.masked_patch.colour_bits)
    return build_model(config.model, config.num_classes, masked_patch_classes=classes, **overrides)


def make_model(config: ml_collections.ConfigDict) -> VisionTransformer:
    """The model the config's objective trains: the classifier, or the masked-patch-prediction pre-training model
    (no `head`; a per-patch colour head and a mask embedding instead). Checks the objective's settings first."""
    if config.objective == "masked_patch_prediction":
        return build_pretraining_model(config)
    check_config(config)
    return build_model(config.model, config.num_classes)


def masked_patch_loss(model: VisionTransformer, params: Any, images: Array, rng: Array,
                      config: ml_collections.ConfigDict, *, train: bool = True,
                      example_weights: Array | None = None, example_keys: Array | None = None
                      ) -> tuple[Array, dict[str, Array]]:
    """Mean cross-entropy of the predicted colour over the corrupted patches, and metrics.

    `model` comes from `build_pretraining_model`; `rng` draws the corruption and (with `train`) dropout;
    `example_keys` (batch,), if given, draw each image's corruption instead (evaluation: from its index in the
    split, so the score does not depend on the eval batch size or process count);
    `example_weights` (batch,) weights examples (the eval iterator's padding mask). Metrics: "loss",
    "accuracy" (top-1 over corrupted patches) and "num_predicted" (the weight the means are over, to
    combine batches).
    """
    if not model.masked_patch_classes:
        raise ValueError("masked_patch_loss needs the pre-training model (vit_jax.masked_patch."
                         "build_pretraining_model), got one with masked_patch_classes=0")
    batch = images.shape[0]
    patch_size = config.model.patch_size
    num_patches = (images.shape[1] // patch_size) * (images.shape[2] // patch_size)
    corruption_rng, dropout_rng = jax.random.split(rng)
    if example_keys is None:
        corruption = sample_corruption(corruption_rng, batch, num_patches, config.masked_patch)
    else:
        corruption = sample_example_corruption(example_keys, num_patches, config.masked_patch)
    logits = model.apply({"params": params}, images, train=train, rngs={"dropout": dropout_rng},
                         patch_source=corruption["source"], patch_mask=corruption["kind"] == MASKED)
    targets = colour_targets(images, patch_size, config.masked_patch.colour_bits)
    weights = (corruption["kind"] != CLEAN).astype(jnp.float32)
    if example_weights is not None:
        weights = weights * example_weights.astype(jnp.float32)[:, None]
    total = weights.sum()
    denominator = jnp.maximum(total, 1.0)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = (cross_entropy * weights).sum() / denominator
    accuracy = ((jnp.argmax(logits, -1) == targets) * weights).sum() / denominator
    return loss, {"loss": loss, "accuracy": accuracy, "num_predicted": total}
