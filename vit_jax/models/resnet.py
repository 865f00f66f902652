"""BiT ResNet trunk for the hybrid models (R50+ViT-B/16, R26+ViT-S/32).

Weight-standardised convolutions and GroupNorm(32), the stem and bottleneck units of the original
hybrid checkpoints, with their parameter names: `conv_root`, `gn_root`, `block{s}/unit{u}/{conv1..3,
gn1..3, conv_proj, gn_proj}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Logical axes of a conv kernel (h, w, in, out): the output channels may be sharded (FSDP).
CONV_AXES = (None, None, None, "conv_out")


def weight_standardize(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Standardise a conv kernel over its (h, w, in) axes: (w - mean) / (std + eps), as BiT does."""
    kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    return kernel / (jnp.std(kernel, axis=(0, 1, 2), keepdims=True) + eps)


_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, *args: Any, preferred_element_type: Any = None,
                         **kwargs: Any) -> jax.Array:
    """`lax.conv_general_dilated` accumulating bf16/f16 convolutions in float32, then rounding to their dtype.

    The convolution counterpart of `vit_jax.models.vit.dot_general`: TPUs and GPUs accumulate a bf16
    convolution in float32 anyway (numerics unchanged there), and XLA:CPU's bf16 x bf16 -> f32 kernels are
    its fast bf16 path. float32 / float64 (or an explicit `preferred_element_type`) pass through unchanged.
    """
    dtype = jnp.result_type(lhs, rhs)
    if dtype not in _LOW_PRECISION or preferred_element_type is not None:
        return jax.lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=preferred_element_type,
                                            **kwargs)
    out = jax.lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=jnp.float32, **kwargs)
    return out.astype(dtype)


class StdConv(nn.Conv):
    """A bias-free convolution whose kernel is weight-standardised at every use (float32-accumulated in bf16)."""

    use_bias: bool = False
    kernel_init: Any = nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES)
    conv_general_dilated: Any = conv_general_dilated

    def param(self, name: str, *args, **kwargs):
        param = super().param(name, *args, **kwargs)
        if name == "kernel":
            param = weight_standardize(nn.unbox(param))
        return param


def _group_norm(name: str, zero_scale: bool = False) -> nn.GroupNorm:
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.GroupNorm(
        num_groups=32, epsilon=1e-6, name=name,
        scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


class BottleneckUnit(nn.Module):
    """1x1 -> 3x3 (carrying the stride) -> 1x1 with 4x expansion, projection shortcut when shapes change."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        strides = (self.strides, self.strides)
        residual = x
        if x.shape[-1] != self.features * 4 or self.strides != 1:
            residual = StdConv(self.features * 4, (1, 1), strides, dtype=self.dtype, name="conv_proj")(x)
            residual = _group_norm("gn_proj")(residual)
        y = StdConv(self.features, (1, 1), dtype=self.dtype, name="conv1")(x)
        y = nn.relu(_group_norm("gn1")(y))
        y = StdConv(self.features, (3, 3), strides, dtype=self.dtype, name="conv2")(y)
        y = nn.relu(_group_norm("gn2")(y))
        y = StdConv(self.features * 4, (1, 1), dtype=self.dtype, name="conv3")(y)
        y = _group_norm("gn3", zero_scale=True)(y)
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`num_units` bottleneck units; the first one carries the stage's stride."""

    num_units: int
    features: int
    first_stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for u in range(self.num_units):
            stride = self.first_stride if u == 0 else 1
            x = BottleneckUnit(self.features, stride, self.dtype, name=f"unit{u + 1}")(x)
        return x


def resnet_trunk(x: jax.Array, layers: Sequence[int], width: int = 64, dtype: Any = jnp.float32) -> jax.Array:
    """Stem (7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool) and the stages: reduces the image 4 * 2^(S-1)x.

    Call it from inside a parent's `@nn.compact` method: its modules are created in the parent's scope,
    so `conv_root`, `gn_root` and `block{s}` sit at the top of the hybrid's tree beside `embedding`, as in
    the original checkpoints.
    """
    x = StdConv(width, (7, 7), (2, 2), dtype=dtype, name="conv_root")(x)
    x = nn.relu(_group_norm("gn_root")(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    for s, num_units in enumerate(layers):
        x = ResNetStage(num_units, width * 2**s, 1 if s == 0 else 2, dtype, name=f"block{s + 1}")(x)
    return x
