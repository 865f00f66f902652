"""The optax optimizer, learning-rate schedule, step count and losses of a run config.

Pre-training (`optimizer.name="adam"`): Adam (b1 0.9, b2 0.999) with decoupled weight decay in the paper's
convention (optax.adamw: the decay is scaled by the learning-rate schedule), on kernels only. Fine-tuning
(`"sgd"`): SGD with momentum 0.9 (plus L2 weight decay on kernels when `weight_decay > 0`). Both clip the
global gradient norm first (1.0), and follow a linear warmup to `lr` then a linear or cosine decay to 0.
Fine-tuning controls, as big_vision's and timm's: `optimizer.freeze` (a regex over parameter paths such as
"Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel") leaves the parameters it matches as they are (no update, no
weight decay, no optimizer state, and their gradients are never computed: a linear probe costs a forward pass);
`optimizer.layer_decay` < 1 scales the learning rate of block i of L (encoderblock_{i-1}) by
layer_decay^(L + 1 - i) (embeddings layer_decay^(L + 1), the final norm and the head 1), as BEiT / timm's
layer-wise decay.
Polyak averaging (`optimizer.ema_decay` > 0) keeps an exponential moving average of the trained parameters beside
them (a frozen parameter is its own average).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax.config_check import ConfigError


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int | None = None) -> int:
    """Optimizer steps of the run: `config.total_steps`, or `num_epochs` x train examples / batch size (rounded up).

    The one place durations become steps.
    """
    if config.total_steps > 0:
        return int(config.total_steps)
    if not num_train_examples:
        raise ConfigError(f"config.total_steps={config.total_steps!r} asks for num_epochs={config.num_epochs!r} "
                          "of the training split, whose size is unknown here; set config.total_steps")
    return max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size))


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, num_steps: int,
                           by_epochs: bool = False) -> optax.Schedule:
    """Linear warmup from 0 to `optimizer.lr` over `warmup_steps`, then linear or cosine decay to 0 at `num_steps`.

    `by_epochs`: the run is measured in `config.num_epochs` (`config.total_steps` is 0), so a warmup too long for
    it says to raise num_epochs rather than total_steps.
    The linear decay ends at 0, where the original code's (vision_transformer's `create_learning_rate_schedule`,
    `linear_end=1e-5`) ends at 1e-5: after warmup the two differ by 1e-5 x the decay's progress, at most 1e-5."""
    warmup = optimizer.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"config.optimizer.warmup_steps={warmup!r} is invalid: expected an integer >= 0")
    if warmup >= num_steps:
        length = "config.num_epochs" if by_epochs else "config.total_steps"
        raise ConfigError(f"config.optimizer.warmup_steps={warmup} is invalid: it must be less than the run's "
                          f"{num_steps} total steps (lower it, or raise {length})")
    decay_steps = num_steps - warmup
    if optimizer.schedule == "cosine":
        decay = optax.cosine_decay_schedule(optimizer.lr, decay_steps)
    elif optimizer.schedule == "linear":
        decay = optax.linear_schedule(optimizer.lr, 0.0, decay_steps)
    else:
        raise ConfigError(f"config.optimizer.schedule={optimizer.schedule!r} is invalid: expected 'linear' or 'cosine'")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, optimizer.lr, warmup), decay], [warmup])


def _kernels_only(params: Any) -> Any:
    """Weight-decay mask: every leaf named "kernel" (dense and convolution kernels, as big_vision's `.*/kernel`);
    not biases, LayerNorm / GroupNorm scales, position embeddings, the class token or the mask embedding.

    By name, not by rank: a scanned model stacks every block's parameters (a LayerNorm scale becomes 2-D), and
    attention's query/key/value biases are (heads, head_dim); by rank both were decayed.
    """
    def is_kernel(path: tuple, _: Any) -> bool:
        last = path[-1] if path else None
        return getattr(last, "key", getattr(last, "name", None)) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


# Top-level parameters below the first block (layer 0 of `layer_multipliers`): patch embedding, class token, the
# masked-patch objective's mask embedding, a hybrid's ResNet stem and stages (the position embedding is under
# Transformer/, handled by name).
EMBEDDING_PARAMS = ("embedding", "cls", "mask_embedding", "conv_root", "gn_root", "block1", "block2", "block3",
                    "block4")


def param_path(path: tuple) -> str:
    """A parameter's path as "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" (big_vision's names).

    Dict keys, attribute names and sequence indices all become plain names, so an optimizer state's leaf reads as
    it is stored in a checkpoint (optax's named tuples are saved as dicts): "0/mu/head/kernel".
    """
    def name(key: Any) -> str:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                return str(getattr(key, attribute))
        return str(key)

    return "/".join(name(key) for key in path)


def frozen(config: ml_collections.ConfigDict, params: Any) -> Any:
    """Tree of bools: the parameters `optimizer.freeze` matches (all False without a pattern).

    A pattern that matches no parameter, or every one, is a ConfigError listing some of the paths.
    """
    pattern = config.optimizer.freeze
    if not pattern:
        return jax.tree.map(lambda _: False, params)
    matcher = re.compile(pattern)  # validated by config_check
    mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(matcher.fullmatch(param_path(path))), params)
    flags = jax.tree.leaves(mask)
    if flags and (not any(flags) or all(flags)):  # (optax may init on a tree with no leaves)
        paths = [param_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
        tops = sorted({path.split("/")[0] for path in paths})
        what = "no parameter" if not any(flags) else "every parameter: nothing would train"
        head = next((name for name in ("head", "masked_patch_head") if name in tops), tops[-1])
        raise ConfigError(f"config.optimizer.freeze={pattern!r} matches {what}; it is matched against whole paths "
                          f"such as {head}/kernel or Transformer/encoder_norm/scale, under {', '.join(tops)}; e.g. "
                          f"'(?!{head}/).*' trains {head} alone")
    return mask


def check_frozen_head(config: ml_collections.ConfigDict, params: Any) -> None:
    """Refuse an `optimizer.freeze` that freezes an all-zero head kernel (a new head, as fine-tuning and training
    from scratch start with): the logits then do not depend on the features, so no gradient reaches any parameter
    but the head's bias, and the run would end at chance level without an error."""
    if not config.optimizer.freeze:
        return
    mask = frozen(config, params)
    for head in ("head", "masked_patch_head"):
        if head in params and mask[head]["kernel"] and not bool(jnp.any(params[head]["kernel"] != 0)):
            raise ConfigError(
                f"config.optimizer.freeze={config.optimizer.freeze!r} freezes {head}/kernel, which is all zeros (a new "
                "head): no gradient would reach any other parameter, and the run would stay at chance; leave the head "
                f"out of the pattern: '(?!{head}/)(?:{config.optimizer.freeze})' freezes the same but the head")


def zero_frozen(config: ml_collections.ConfigDict, grads: Any) -> Any:
    """`grads` with zeros for the frozen parameters (so XLA never computes theirs)."""
    if not config.optimizer.freeze:
        return grads
    return jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen(config, grads))


def layer_multipliers(config: ml_collections.ConfigDict, params: Any) -> Any:
    """Tree of learning-rate multipliers for `optimizer.layer_decay` (floats; for a scanned model's stacked
    blocks an array over the layer axis, shaped to broadcast): d^(L + 1 - layer), where the embeddings (patch,
    class token, position, a hybrid's ResNet) are layer 0, block i is layer i + 1, the rest (final norm,
    pre_logits, head) layer L + 1."""
    decay, num_layers = config.optimizer.layer_decay, config.model.num_layers

    def multiplier(path: tuple, leaf: Any) -> Any:
        name = param_path(path)
        if name.startswith("Transformer/encoderblock/"):  # scanned: (num_layers, ...)
            layers = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
            return jnp.power(jnp.float32(decay), num_layers + 1 - layers).reshape((-1,) + (1,) * (leaf.ndim - 1))
        block = re.match(r"Transformer/encoderblock_(\d+)/", name)
        if block:
            layer = int(block.group(1)) + 1
        elif name.startswith("Transformer/posembed_input/") or name.split("/")[0] in EMBEDDING_PARAMS:
            layer = 0
        else:
            layer = num_layers + 1
        return float(decay ** (num_layers + 1 - layer))

    return jax.tree_util.tree_map_with_path(multiplier, params)


def _scaled_by_layer(tx: optax.GradientTransformation, config: ml_collections.ConfigDict
                     ) -> optax.GradientTransformation:
    """`tx` with each update times its `layer_multipliers`, and `tx`'s own state (so a run resumes from a
    checkpoint written with another `layer_decay`)."""
    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return jax.tree.map(lambda u, m: u * m, updates, layer_multipliers(config, updates)), state

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """clip(global norm) -> Adam(W) or momentum SGD, with the warmup + decay schedule over `num_steps`; then the
    layer-wise decay of the learning rate, and frozen parameters left out of all of it."""
    opt = config.optimizer
    schedule = learning_rate_schedule(opt, num_steps, by_epochs=not config.total_steps > 0)  # as total_steps()
    parts = []
    if opt.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.name == "adam":
        parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=_kernels_only))
    elif opt.name == "sgd":
        if opt.weight_decay > 0:
            parts.append(optax.add_decayed_weights(opt.weight_decay, mask=_kernels_only))
        parts.append(optax.sgd(schedule, momentum=opt.momentum))
    else:
        raise ConfigError(f"config.optimizer.name={opt.name!r} is invalid: expected 'adam' or 'sgd'")
    tx = optax.chain(*parts)
    if opt.layer_decay != 1.0:
        tx = _scaled_by_layer(tx, config)
    if not opt.freeze:
        return tx
    # The frozen parameters get no update and no state; clipping sees the trainable gradients only.
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "trained", frozen(config, params))  # noqa: E731
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def smooth_labels(labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Label smoothing: `label_smoothing` of each target moves to the uniform 1 / classes, for single-label and
    multi-label targets alike (timm's BinaryCrossEntropy): with 18k sigmoid classes, moving every target towards
    0.5 instead would make 0.05 of each negative a positive, ~900 per image, drowning the real labels."""
    if not label_smoothing:
        return labels
    return labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]


def per_example_loss(logits: jax.Array, labels: jax.Array, label_kind: str) -> jax.Array:
    """(batch,) losses: softmax cross-entropy for "single", sigmoid cross-entropy summed over classes for "multi".

    "single" reads each row of `labels` as a distribution: a multi-hot row (a softmax model scored on a set of
    right answers, as ImageNet ReaL) spreads its mass evenly over them; an all-zero row (unlabelled) has loss 0.
    Such rows are evaluation's padding (masked out there, and never smoothed); the train loss sees none: train
    batches are never padded (whole batches only) and a single-label training example is one-hot (mixup: a mix of
    two), so `smooth_labels` never turns one into a uniform target. ("multi": an all-zero row is an image with no
    positive class, a real example, smoothed like any other.)
    """
    logits = logits.astype(jnp.float32)
    if label_kind == "single":
        total = labels.sum(axis=-1, keepdims=True)
        return optax.softmax_cross_entropy(logits, labels / jnp.where(total > 0, total, 1.0))
    if label_kind == "multi":
        return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)
    raise ConfigError(f"config.label_kind={label_kind!r} is invalid: expected 'single' or 'multi'")


def uses_ema(config: ml_collections.ConfigDict) -> bool:
    """Whether the run keeps a Polyak average of its parameters (`optimizer.ema_decay` > 0)."""
    return config.optimizer.ema_decay > 0


def ema_weight(decay: float, step: jax.Array) -> jax.Array:
    """Weight of the newest parameters in the average after `step` (>= 1) updates: (1 - d) / (1 - d^step).

    The bias-corrected moving average (as Adam's moments): after k steps the average is
    sum_j d^(k-j) (1 - d) p_j / (1 - d^k), so the parameters it started from have no weight (step 1 gives 1:
    the average is the first step's parameters) and no warm-up of the decay is needed.
    """
    decay = jnp.float32(decay)  # one rounding of it on both sides: exactly 1 at step 1
    return (1.0 - decay) / (1.0 - jnp.power(decay, jnp.asarray(step, jnp.float32)))


def update_ema(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """The Polyak average after `step` updates, `params` being the parameters that step produced (None where
    the average holds none: a frozen parameter, see `trained_only`)."""
    weight = ema_weight(decay, step)  # as (1 - w) a + w p: exactly the params at step 1, whatever a was

    def update(p: jax.Array, a: jax.Array | None) -> jax.Array | None:
        return None if a is None else (1.0 - weight).astype(a.dtype) * a + weight.astype(a.dtype) * p

    return jax.tree.map(update, params, ema)


def trained_only(config: ml_collections.ConfigDict, tree: Any) -> Any:
    """A params-shaped `tree` (values, shapes, shardings) with None for the parameters `optimizer.freeze` matches.

    What the Polyak average holds: a frozen parameter's average is the parameter itself, so the average keeps no
    copy of it (a linear probe's average is its head alone). `whole_average` puts the parameters back.
    """
    if not config.optimizer.freeze:
        return tree
    return jax.tree.map(lambda x, f: None if f else x, tree, frozen(config, tree))


def whole_average(ema: Any, params: Any) -> Any:
    """The Polyak average as a whole params tree: its own leaves, and `params`' where it holds None (frozen)."""
    return jax.tree.map(lambda p, a: p if a is None else a, params, ema)
