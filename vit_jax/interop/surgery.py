"""Checkpoint surgery for fine-tuning: resize position embeddings, replace the head, drop `pre_logits`, swap the
masked-patch-prediction head for a classifier's.

`adapt_to_model` applies whichever of these a target model needs and says what it did; everything else must
then fit the model exactly (`check_matches`). All functions work on canonical flat dicts of numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.interop.common import (
    HEAD_KEYS,
    MASKED_PATCH_KEYS,
    POSEMB_KEY,
    PRE_LOGITS_KEYS,
    CheckpointError,
    Flat,
    check_matches,
)

RESIZE_METHODS = ("bilinear", "bicubic")
_CUBIC_A = -0.75  # the Keys cubic kernel of torch's and PIL's bicubic


class UnusableHeadError(CheckpointError):
    """A checkpoint's head that cannot serve the model as it is (`adapt_to_model`'s `require_head`); `reason` says
    why ("the checkpoint's head has 10 classes"), for callers that word the error their own way."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Linear interpolation with corners aligned: output i samples input i * (n_in - 1) / (n_out - 1).

    This is `scipy.ndimage.zoom(order=1)`, which the vision_transformer and big_vision code use for the grid.
    """
    matrix = np.zeros((n_out, n_in))
    coords = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    low = np.clip(np.floor(coords).astype(int), 0, n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = coords - low
    for i in range(n_out):
        matrix[i, low[i]] += 1.0 - frac[i]
        matrix[i, high[i]] += frac[i]
    return matrix


def _cubic_weight(distance: np.ndarray) -> np.ndarray:
    x = np.abs(distance)
    near = ((_CUBIC_A + 2) * x - (_CUBIC_A + 3)) * x * x + 1
    far = ((_CUBIC_A * x - 5 * _CUBIC_A) * x + 8 * _CUBIC_A) * x - 4 * _CUBIC_A
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Bicubic (a = -0.75) with half-pixel centres and clamped borders: `torch.nn.functional.interpolate(
    mode="bicubic", align_corners=False)`, timm's `resample_abs_pos_embed(..., antialias=False)`. (timm's
    default, antialias=True, switches torch to another kernel, PIL's a = -0.5, enlarging a grid too.)"""
    matrix = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            matrix[i, min(max(tap, 0), n_in - 1)] += _cubic_weight(np.asarray(src - tap))
    return matrix


def resize_grid(grid: np.ndarray, new_shape: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize an (h, w, channels) grid to `new_shape` by separable 2-D interpolation (float64 inside)."""
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize method must be one of {RESIZE_METHODS}, got {method!r}")
    make = _linear_matrix if method == "bilinear" else _cubic_matrix
    rows = make(grid.shape[0], new_shape[0])
    cols = make(grid.shape[1], new_shape[1])
    return np.einsum("oi,ijc,pj->opc", rows, grid.astype(np.float64), cols)


def resize_posemb(posemb: np.ndarray, new_grid: int | tuple[int, int], *, num_prefix_tokens: int = 1,
                  method: str = "bilinear") -> np.ndarray:
    """(1, prefix + g*g, D) position embeddings -> (1, prefix + h*w, D) for a new patch grid.

    The first `num_prefix_tokens` entries (the class token's) are kept apart, bit for bit; the rest are
    reshaped to their square grid and interpolated (bilinear as the original code and
    big_vision, or torch's bicubic without antialiasing).
    Resizing to the same grid returns the input unchanged.
    """
    new_shape = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid_tokens = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    side = math.isqrt(grid_tokens.shape[0])
    if side * side != grid_tokens.shape[0]:
        raise CheckpointError(f"position embeddings of {posemb.shape[1]} tokens ({num_prefix_tokens} prefix) are "
                              "not a square grid; cannot resize them")
    if (side, side) == new_shape:
        return posemb
    grid = resize_grid(grid_tokens.reshape(side, side, -1), new_shape, method)
    resized = grid.reshape(1, new_shape[0] * new_shape[1], -1).astype(posemb.dtype)
    return np.concatenate([prefix, resized], axis=1)


def fold_input_transform(flat: Flat, scale: np.ndarray, shift: np.ndarray, source: str) -> Flat:
    """`flat` whose patch embedding takes our [-1, 1] input u and computes what the source's computed on its own
    input, `scale * u + shift` per channel (e.g. ImageNet's mean and std): the patch embedding is a linear map of
    each patch with no padding, so the scales fold into its kernel's input channels and the shifts into its bias,
    exactly (in float64). A flat without a patch embedding is returned as it is (the shape check names what is
    missing)."""
    if "embedding/kernel" not in flat or "embedding/bias" not in flat:
        return flat
    kernel, bias = np.asarray(flat["embedding/kernel"]), np.asarray(flat["embedding/bias"])
    if kernel.ndim != 4 or kernel.shape[2] != len(scale) or bias.shape != kernel.shape[-1:]:
        raise CheckpointError(f"{source}: patch embedding kernel {kernel.shape} / bias {bias.shape}: expected "
                              f"(patch, patch, {len(scale)}, width) / (width,) to take its input normalisation")
    wide = kernel.astype(np.float64)
    return {**flat, "embedding/kernel": (wide * np.asarray(scale)[:, None]).astype(kernel.dtype),
            "embedding/bias": (bias.astype(np.float64) + np.einsum("hwcd,c->d", wide, shift)).astype(bias.dtype)}


def new_head(in_features: int, num_classes: int, bias_init: float = 0.0) -> Flat:
    """A fresh head: zero kernel (the fine-tuning recipe) and a constant bias."""
    return {"head/kernel": np.zeros((in_features, num_classes), np.float32),
            "head/bias": np.full((num_classes,), bias_init, np.float32)}


def new_pre_logits(in_features: int, size: int, seed: int = 0) -> Flat:
    """A fresh pre-logits layer initialised as the model does (LeCun normal kernel, zero bias), from `seed`."""
    kernel = jax.nn.initializers.lecun_normal()(jax.random.key(seed), (in_features, size), jnp.float32)
    return {"pre_logits/kernel": np.asarray(kernel), "pre_logits/bias": np.zeros((size,), np.float32)}


def new_masked_patch_head(hidden_size: int, num_colour_classes: int, seed: int = 0) -> Flat:
    """A fresh masked-patch-prediction head as the model initialises it: mask embedding N(0, 0.02), zero Dense."""
    mask = 0.02 * jax.random.normal(jax.random.key(seed), (1, 1, hidden_size), jnp.float32)
    return {"mask_embedding": np.asarray(mask),
            "masked_patch_head/kernel": np.zeros((hidden_size, num_colour_classes), np.float32),
            "masked_patch_head/bias": np.zeros((num_colour_classes,), np.float32)}


def _drop(flat: Flat, keys: tuple[str, ...]) -> list[str]:
    return [key for key in keys if flat.pop(key, None) is not None]


def adapt_to_model(flat: Flat, expected: Mapping[str, tuple], *, head_bias_init: float = 0.0,
                   resize_method: str = "bilinear", reset_head: bool = False, require_head: bool = False,
                   source: str = "checkpoint") -> tuple[Flat, list[str]]:
    """Make a checkpoint fit a target model: swap task heads, drop unwanted pre_logits, resize the posemb.

    Task heads: a masked-patch-prediction checkpoint's `mask_embedding` / `masked_patch_head` are dropped for a
    classifier, which gets a new zero head (and a fresh pre_logits if it has one); a classifier checkpoint
    loaded into the pre-training model loses `head` / `pre_logits` and gets a fresh masked-patch head. A head
    for another class count becomes a new zero head; with `reset_head`, so does one of the right shape
    (fine-tuning starts from a zero head, as in the paper and big_vision, whatever the checkpoint's class
    count). `require_head` (evaluation, prediction) refuses instead a checkpoint whose own head cannot serve: a
    new zero head would score chance. Returns the adapted params and one line per change made. Raises
    CheckpointError listing every key that still does not fit (missing, unexpected, wrong shape) — never a partial
    load.
    """
    flat = dict(flat)
    actions: list[str] = []
    head_stale = ""
    advice = "evaluate a checkpoint trained for these classes, or fine-tune this one first (--mode=train)"
    if MASKED_PATCH_KEYS[1] in flat and MASKED_PATCH_KEYS[1] not in expected:
        classes = flat[MASKED_PATCH_KEYS[1]].shape[-1]
        dropped = _drop(flat, MASKED_PATCH_KEYS)
        actions.append(f"dropped the masked-patch-prediction head ({', '.join(dropped)}; {classes} colour classes): "
                       "the model is a classifier")
    if PRE_LOGITS_KEYS[0] in flat and PRE_LOGITS_KEYS[0] not in expected:
        size = flat[PRE_LOGITS_KEYS[0]].shape[-1]
        _drop(flat, PRE_LOGITS_KEYS)
        reason = ("the model has representation_size=0" if HEAD_KEYS[0] in expected
                  else "the model is the masked-patch-prediction model")
        actions.append(f"dropped pre_logits ({size} units): {reason}")
        head_stale = "its input was the dropped pre_logits"
        advice = f"set model.representation_size={size} to keep them"
    if HEAD_KEYS[0] in flat and HEAD_KEYS[0] not in expected:
        classes = flat[HEAD_KEYS[0]].shape[-1]
        _drop(flat, HEAD_KEYS)
        actions.append(f"dropped the {classes}-class head: the model is the masked-patch-prediction model")

    if PRE_LOGITS_KEYS[0] in expected and PRE_LOGITS_KEYS[0] not in flat and PRE_LOGITS_KEYS[1] not in flat:
        in_features, size = expected[PRE_LOGITS_KEYS[0]]
        flat.update(new_pre_logits(in_features, size))
        actions.append(f"new pre_logits ({size} units, LeCun-normal init): the checkpoint has none")
        head_stale = "its input is the new pre_logits"
        advice = "set model.representation_size=0 (the checkpoint has no pre_logits)"

    if HEAD_KEYS[0] in expected:
        want = expected[HEAD_KEYS[0]]
        have = flat.get(HEAD_KEYS[0])
        if have is None and HEAD_KEYS[1] not in flat:
            head_stale = "the checkpoint has no classification head"
        elif have is not None and not head_stale and have.shape[0] != want[0]:
            pass  # a head of another input width: a model of another width, which check_matches names
        elif have is not None and not head_stale and tuple(have.shape) != tuple(want):
            head_stale = f"the checkpoint's head has {have.shape[-1]} classes"
        elif have is not None and not head_stale and reset_head:
            head_stale = "fine-tuning starts from a new head; the checkpoint's has the same class count"
        if head_stale and require_head:
            raise UnusableHeadError(f"{source}: cannot be evaluated as a {want[1]}-class classifier: {head_stale}, "
                                    f"and a new head would score chance; {advice}", head_stale)
        if head_stale:
            flat.update(new_head(want[0], want[1], head_bias_init))
            actions.append(f"new zero-initialised head with {want[1]} classes ({head_stale})")

    if MASKED_PATCH_KEYS[1] in expected and all(key not in flat for key in MASKED_PATCH_KEYS):
        hidden, classes = expected[MASKED_PATCH_KEYS[1]]
        if require_head:
            raise CheckpointError(f"{source}: cannot be evaluated for masked patch prediction: it has no "
                                  f"masked_patch_head or mask_embedding, and new ones would score chance (loss "
                                  f"ln {classes} = {math.log(classes):.2f}); evaluate a masked-patch-prediction "
                                  "checkpoint, or train from this one first (--mode=train)")
        flat.update(new_masked_patch_head(hidden, classes))
        actions.append(f"new masked-patch-prediction head ({classes} colour classes) and mask embedding: "
                       "the checkpoint has none")

    posemb, want = flat.get(POSEMB_KEY), expected.get(POSEMB_KEY)
    if posemb is not None and want is not None and tuple(posemb.shape) != tuple(want) and posemb.ndim == 3 \
            and posemb.shape[-1] == want[-1]:
        prefix = 1 if "cls" in flat else 0
        if prefix == (1 if "cls" in expected else 0):
            old_side = math.isqrt(posemb.shape[1] - prefix)
            new_side = math.isqrt(want[1] - prefix)
            if new_side * new_side != want[1] - prefix:
                raise CheckpointError(f"{source}: the model's {want[1]} position embeddings are not a square grid")
            try:
                flat[POSEMB_KEY] = resize_posemb(posemb, new_side, num_prefix_tokens=prefix, method=resize_method)
            except CheckpointError as e:
                raise CheckpointError(f"{source}: {e}") from e
            actions.append(f"resized position embeddings from a {old_side}x{old_side} to a {new_side}x{new_side} "
                           f"patch grid ({resize_method}, class token kept apart)")
    check_matches(flat, expected, source)
    return flat, actions
