"""What every checkpoint format shares: flat `a/b/c` param dicts, the numerics of a weights' origin, and the
check that a converted checkpoint fits the model exactly (every missing, unexpected or wrong-shaped key listed).

The formats convert to and from one canonical layout: our own param tree without `nn.scan` (per-block
`Transformer/encoderblock_{i}`), flattened to `"Transformer/encoderblock_0/LayerNorm_0/scale"`-style keys with
float32 numpy values. That is also the layout of the original vision_transformer `.npz` files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vit_jax.errors import UserError

Flat = dict[str, np.ndarray]

POSEMB_KEY = "Transformer/posembed_input/pos_embedding"
HEAD_KEYS = ("head/kernel", "head/bias")
PRE_LOGITS_KEYS = ("pre_logits/kernel", "pre_logits/bias")
# Only in the masked-patch-prediction pre-training model (vit_jax.masked_patch), never in a classifier.
MASKED_PATCH_KEYS = ("mask_embedding", "masked_patch_head/kernel", "masked_patch_head/bias")


class CheckpointError(UserError):
    """A checkpoint that cannot become this model's params: foreign, truncated, unsafe or mismatched."""


class MissingHeadError(CheckpointError):
    """A checkpoint without a classification head (masked patch prediction) read without a class count."""


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How the weights were computed with at home: GELU flavour and LayerNorm epsilon."""

    gelu_approximate: bool
    layernorm_epsilon: float
    origin: str  # e.g. "official .npz", "timm", "HF config.json"


# The original (vision_transformer / big_vision) checkpoints: flax's tanh-approximate GELU, LayerNorm eps 1e-6.
OFFICIAL_NUMERICS = Numerics(True, 1e-6, "official .npz (tanh GELU, LayerNorm eps 1e-6)")
# timm's VisionTransformer: nn.GELU (exact) and LayerNorm(eps=1e-6).
TIMM_NUMERICS = Numerics(False, 1e-6, "timm (exact GELU, LayerNorm eps 1e-6)")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Flat:
    """Nested dict of arrays -> {"a/b/c": float32 numpy array}."""
    flat: Flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = np.asarray(value, dtype=np.float32)
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": array} -> nested dicts."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def num_layers_of(flat: Mapping[str, Any]) -> int:
    """Number of `Transformer/encoderblock_{i}` blocks in a canonical flat dict."""
    indices = {int(k.split("/")[1].rsplit("_", 1)[1]) for k in flat if k.startswith("Transformer/encoderblock_")}
    return max(indices) + 1 if indices else 0


def unstack_scanned(flat: Mapping[str, np.ndarray], prefix: str = "Transformer/encoderblock/",
                    source: str = "params") -> Flat:
    """Keys under `prefix` (arrays stacked over depth on axis 0) -> per-block `Transformer/encoderblock_{i}/`.

    A 0-d array there has no depth axis to split: a CheckpointError naming `source` and the key."""
    out: Flat = {}
    for name, value in flat.items():
        if name.startswith(prefix):
            if np.ndim(value) == 0:
                raise CheckpointError(f"{source}: {name} has shape (), expected (depth, ...): arrays under {prefix} "
                                      "are stacked over the blocks on their first axis")
            rest = name[len(prefix):]
            for i in range(value.shape[0]):
                out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
        else:
            out[name] = value
    return out


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp)` on a temp file beside `path`, then rename it over `path`: readers never see a partial
    file. If anything fails (or is interrupted), the temp file is removed and `path` is left as it was. The temp
    file is synced to disk before the rename (else a power loss can leave `path` empty), and named per call (two
    threads writing one path do not share it)."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def with_class_token_slot(posemb: np.ndarray, has_cls: bool, has_slot: bool | None = None,
                          source: str | None = None) -> np.ndarray:
    """(1, g*g, D) position embeddings of a model with a class token -> (1, 1 + g*g, D), a zero slot first.

    big_vision and timm's `no_embed_class=True` add the position embeddings to the patch tokens only, then prepend
    the class token; this model adds them after prepending it. With a zero class-token slot both compute the same.
    `has_slot` says whether the embeddings hold the class token's entry already (what a timm config.json tells);
    None reads it from the count: 1 + g*g tokens is never a perfect square, so a square count has no slot. That is
    a guess (1 + h*w tokens of a non-square grid can be square: 1 + 12*14 = 13*13), logged when `source` names
    the file. Embeddings with the slot and those of a model without a class token are returned unchanged.
    """
    tokens = posemb.shape[1] if posemb.ndim == 3 else 0
    if not has_cls or not tokens:
        return posemb
    if has_slot is None:
        has_slot = math.isqrt(tokens) ** 2 != tokens
        if not has_slot and source and tokens > 1:
            _warn_slot_guess(tokens, source)
    return posemb if has_slot else np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)


def _warn_slot_guess(tokens: int, source: str) -> None:
    """Say how a square count of position embeddings beside a class token was read, and how to say otherwise."""
    side = math.isqrt(tokens)
    logging.warning("%s: its %d position embeddings are read as a %dx%d patch grid without a class-token entry "
                    "(timm no_embed_class=True); they could also be a class-token entry and %d patches (e.g. a %dx%d "
                    "grid), which this model cannot load. If so, put the timm config.json beside the file "
                    "(model_args.no_embed_class, or img_size and patch_size)", source, tokens, side, side,
                    tokens - 1, side - 1, side + 1)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's fixed 2-D sin-cos position embeddings (`posemb_sincos_2d`, after MoCo v3), (1, h*w, width)
    float32, row-major over the grid: [sin(x w_d), cos(x w_d), sin(y w_d), cos(y w_d)] for d < width/4, with
    w_d = temperature ** -(d / (width/4 - 1)). A posemb='sincos2d' model stores none: they are rebuilt so."""
    if width % 4 or width < 8:
        raise CheckpointError(f"sin-cos position embeddings of width {width}: expected a multiple of 4, at least 8 "
                              "(four sin/cos parts of at least 2 frequencies each)")
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1))
    y, x = np.outer(y.reshape(-1), omega), np.outer(x.reshape(-1), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


def canonical_to_params(flat: Mapping[str, np.ndarray], scan: bool) -> dict[str, Any]:
    """Canonical flat dict -> our nested params tree, stacking the blocks when the model uses `nn.scan`."""
    if not scan:
        return unflatten(flat)
    stacked: dict[str, list[tuple[int, np.ndarray]]] = {}
    rest: Flat = {}
    for name, value in flat.items():
        if name.startswith("Transformer/encoderblock_"):
            _, block, sub = name.split("/", 2)
            stacked.setdefault(sub, []).append((int(block.rsplit("_", 1)[1]), value))
        else:
            rest[name] = value
    for sub, items in stacked.items():
        rest[f"Transformer/encoderblock/{sub}"] = np.stack([v for _, v in sorted(items, key=lambda t: t[0])])
    return unflatten(rest)


def params_to_canonical(params: Mapping[str, Any]) -> Flat:
    """Our params tree (plain, boxed, scanned or not) -> canonical flat dict of float32 numpy arrays."""
    flat = flatten(nn.unbox(dict(params)))
    if any(k.startswith("Transformer/encoderblock/") for k in flat):
        flat = unstack_scanned(flat)
    return flat


def expected_shapes(model_config: ml_collections.ConfigDict, num_classes: int, image_size: int,
                    masked_patch_classes: int = 0) -> dict[str, tuple]:
    """The canonical (unscanned) param shapes of the model `model_config` builds; nothing is allocated.

    `masked_patch_classes > 0`: the masked-patch-prediction pre-training model (no head, a per-patch head).
    """
    from vit_jax.models.vit import build_model  # the model module imports nothing from interop

    model = build_model(model_config, num_classes, scan=False, remat=False,
                        masked_patch_classes=masked_patch_classes)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
    return {k: tuple(v.shape) for k, v in _flatten_shapes(nn.unbox(variables["params"])).items()}


def _flatten_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten_shapes(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


_ARCHITECTURE = {  # what a canonical key's shape tells about the model: (key, which dims)
    "hidden_size": ("Transformer/encoder_norm/scale", slice(0, 1)),
    "mlp_dim": ("Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias", slice(0, 1)),
    "num_heads": ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/bias", slice(0, 1)),
    "patch": ("embedding/kernel", slice(0, 2)),
    "tokens": ("Transformer/posembed_input/pos_embedding", slice(1, 2)),
    "classes": ("head/bias", slice(0, 1)),
}


def _architecture(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """Width, depth, MLP size, heads, patch, tokens and classes that a flat key -> shape mapping shows."""
    found: dict[str, Any] = {}
    depth = {key.split("/")[1] for key in shapes if key.startswith("Transformer/encoderblock_")}
    if depth:
        found["num_layers"] = len(depth)
    for name, (key, dims) in _ARCHITECTURE.items():
        if key in shapes:
            value = tuple(shapes[key])[dims]
            found[name] = value[0] if len(value) == 1 else value
    return found


def architecture_difference(flat_shapes: Mapping[str, tuple], expected: Mapping[str, tuple]) -> str:
    """'checkpoint hidden_size 48, mlp_dim 96 vs model 32, 64' for the attributes that differ; '' if none does."""
    ours, theirs = _architecture(flat_shapes), _architecture(expected)
    names = [name for name in ours if name in theirs and ours[name] != theirs[name]]
    if not names:
        return ""
    return ("checkpoint " + ", ".join(f"{name} {ours[name]}" for name in names) + " vs model "
            + ", ".join(str(theirs[name]) for name in names))


def key_differences(found: Mapping[str, tuple], expected: Mapping[str, tuple]
                    ) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, of another shape): the sorted keys where `found` shapes differ from `expected`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k]) != tuple(expected[k]))
    return missing, unexpected, wrong


def check_matches(flat: Mapping[str, np.ndarray], expected: Mapping[str, tuple], source: str) -> None:
    """Raise CheckpointError listing every missing, unexpected and wrong-shaped key (with both shapes).

    The message opens with the architecture difference behind them when the shapes show one (width, depth, MLP
    size, heads, patch, tokens, classes), so a foreign checkpoint reads as one cause before the key list.
    """
    missing, unexpected, wrong = key_differences({k: tuple(v.shape) for k, v in flat.items()}, expected)
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s): " + ", ".join(f"{k} (model {tuple(expected[k])})"
                                                                  for k in missing))
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s): " + ", ".join(
            f"{k} (checkpoint {tuple(flat[k].shape)})" for k in unexpected))
    if wrong:
        parts.append(f"wrong shape for {len(wrong)} key(s): " + ", ".join(
            f"{k} (checkpoint {tuple(flat[k].shape)}, model {tuple(expected[k])})" for k in wrong))
    cause = architecture_difference({k: tuple(v.shape) for k, v in flat.items()}, expected)
    raise CheckpointError(f"{source} does not fit the model" + (f" ({cause})" if cause else "") + ": "
                          + "; ".join(parts))
