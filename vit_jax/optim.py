"""The optax optimizer, learning-rate schedule, step count and losses of a run config.

Pre-training (`optimizer.name="adam"`): Adam (b1 0.9, b2 0.999) with decoupled weight decay in the paper's
convention (optax.adamw: the decay is scaled by the learning-rate schedule), on kernels only. Fine-tuning
(`"sgd"`): SGD with momentum 0.9 (plus L2 weight decay on kernels when `weight_decay > 0`). Both clip the
global gradient norm first (1.0), and follow a linear warmup to `lr` then a linear or cosine decay to 0.
Polyak averaging (`optimizer.ema_decay` > 0) keeps an exponential moving average of the parameters beside them.
"""

from __future__ import annotations

import math
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


def learning_rate_schedule(optimizer: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optimizer.lr` over `warmup_steps`, then linear or cosine decay to 0 at `num_steps`."""
    warmup = optimizer.warmup_steps
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"config.optimizer.warmup_steps={warmup!r} is invalid: expected an integer >= 0")
    if warmup >= num_steps:
        raise ConfigError(f"config.optimizer.warmup_steps={warmup} is invalid: it must be less than the run's "
                          f"{num_steps} total steps (lower it, or raise config.total_steps)")
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


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """clip(global norm) -> Adam(W) or momentum SGD, with the warmup + decay schedule over `num_steps`."""
    opt = config.optimizer
    schedule = learning_rate_schedule(opt, num_steps)
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
    return optax.chain(*parts)


def smooth_labels(labels: jax.Array, label_smoothing: float, label_kind: str) -> jax.Array:
    """Label smoothing: single-label targets move `label_smoothing` of their mass to the uniform distribution;
    multi-label (independent sigmoid) targets move towards 0.5 by the same fraction."""
    if not label_smoothing:
        return labels
    uniform = 1.0 / labels.shape[-1] if label_kind == "single" else 0.5
    return labels * (1.0 - label_smoothing) + label_smoothing * uniform


def per_example_loss(logits: jax.Array, labels: jax.Array, label_kind: str) -> jax.Array:
    """(batch,) losses: softmax cross-entropy for "single", sigmoid cross-entropy summed over classes for "multi"."""
    logits = logits.astype(jnp.float32)
    if label_kind == "single":
        return optax.softmax_cross_entropy(logits, labels)
    if label_kind == "multi":
        return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)
    raise ConfigError(f"config.label_kind={label_kind!r} is invalid: expected 'single' or 'multi'")


def ema_weight(decay: float, step: jax.Array) -> jax.Array:
    """Weight of the newest parameters in the average after `step` (>= 1) updates: (1 - d) / (1 - d^step).

    The bias-corrected moving average (as Adam's moments): after k steps the average is
    sum_j d^(k-j) (1 - d) p_j / (1 - d^k), so the parameters it started from have no weight (step 1 gives 1:
    the average is the first step's parameters) and no warm-up of the decay is needed.
    """
    decay = jnp.float32(decay)  # one rounding of it on both sides: exactly 1 at step 1
    return (1.0 - decay) / (1.0 - jnp.power(decay, jnp.asarray(step, jnp.float32)))


def update_ema(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """The Polyak average after `step` updates, `params` being the parameters that step produced."""
    weight = ema_weight(decay, step)  # as (1 - w) a + w p: exactly the params at step 1, whatever a was
    return jax.tree.map(lambda a, p: (1.0 - weight).astype(a.dtype) * a + weight.astype(a.dtype) * p, ema, params)
