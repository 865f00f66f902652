"""Axial-ViT blocks (ViT paper, appendix D.3): row self-attention + MLP, then column self-attention + MLP.

An axial encoder block is two pre-LN Transformer blocks over the patch grid: the first attends only among
the patches of the same row, the second only among the patches of the same column, so two hops connect any
two patches. Attention then costs O(T (H + W)) instead of O(T^2) for T = H x W patches, but each axial block
carries two MLPs and two sets of attention projections: Axial-ViT has about twice ViT's block parameters
and, below roughly 1,100 px at patch 16, *more* FLOPs than the ViT it replaces (the paper: "better than
their ViT-B counterpart in terms of performance, but it comes at the cost of more compute").
`vit_jax.summary` counts both.

Class token: axial models have none and classify by global average pooling (`classifier="gap"`), as the
Axial-ResNet / Axial-DeepLab classifiers do; `VisionTransformer` raises on `axial=True` with
`classifier="token"`. The class token has no row or column: letting it attend globally would put an O(T)
full-attention path back into every block and still leave open whether patches attend to it, and appending
it to every row and column would make it a one-hop shortcut between all patches, which no patch has. GAP
keeps every block purely axial, needs no such choice, and gives the same tokens to masked patch prediction.

Tree: `Transformer/encoderblock_{i}/{row,column}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3}`: each half is named like a ViT encoder block. Activations stay (batch, tokens, embed) between
the halves (so drop-path drops whole examples and the logical layout constraints apply); only attention
sees the grid, regrouped as (batch x rows, columns, embed) or (batch x columns, rows, embed).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax

from vit_jax.models.layers import Dropout
from vit_jax.models.vit import EncoderBlock, MlpBlock, MultiHeadDotProductAttention, _constrain, _init

Array = jax.Array
AXES = ("row", "column")


def to_lines(x: Array, grid_shape: tuple[int, int], axis: str) -> Array:
    """(batch, H*W, embed) in row-major grid order -> (batch*H, W, embed) rows or (batch*W, H, embed) columns."""
    batch, tokens, features = x.shape
    height, width = grid_shape
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens do not form the {height}x{width} patch grid (a class token in an axial "
                         "model? use classifier='gap')")
    x = x.reshape(batch, height, width, features)
    if axis == "row":
        return x.reshape(batch * height, width, features)
    if axis == "column":
        return x.transpose(0, 2, 1, 3).reshape(batch * width, height, features)
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


def from_lines(x: Array, grid_shape: tuple[int, int], axis: str) -> Array:
    """Inverse of `to_lines`: rows or columns back to (batch, H*W, embed) in row-major grid order."""
    height, width = grid_shape
    features = x.shape[-1]
    if axis == "row":
        return x.reshape(-1, height * width, features)
    if axis == "column":
        return x.reshape(-1, width, height, features).transpose(0, 2, 1, 3).reshape(-1, height * width, features)
    raise ValueError(f"axis must be one of {AXES}, got {axis!r}")


class AxialSubBlock(EncoderBlock):
    """One half of an axial block: x + Attn_axis(LN(x)), then x + MLP(LN(x)); attention within rows or columns."""

    grid_shape: tuple[int, int] = (1, 1)
    axis: str = "row"

    @nn.compact
    def __call__(self, x: Array, drop_rate: Array | float = 0.0) -> Array:
        norm = functools.partial(
            nn.LayerNorm, epsilon=self.layernorm_epsilon, dtype=self.dtype,
            scale_init=_init(nn.initializers.ones, ("embed",)), bias_init=_init(nn.initializers.zeros, ("embed",)))
        y = norm(name="LayerNorm_0")(x)
        y = MultiHeadDotProductAttention(
            self.num_heads, self.attention_dropout_rate, self.dtype, self.deterministic, self.capture_attention,
            name="MultiHeadDotProductAttention_1")(to_lines(y, self.grid_shape, self.axis))
        y = from_lines(y, self.grid_shape, self.axis)
        y = Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
        x = _constrain(x + self._drop_path(y.astype(x.dtype), drop_rate))  # the residual stream keeps its dtype
        y = norm(name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu_approximate, self.dtype, self.deterministic,
                     name="MlpBlock_3")(y)
        return _constrain(x + self._drop_path(y.astype(x.dtype), drop_rate))


class AxialEncoderBlock(EncoderBlock):
    """An Axial-ViT block on (batch, H*W, embed) tokens: a `row` half, then a `column` half."""

    grid_shape: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x: Array, drop_rate: Array | float = 0.0) -> Array:
        half = functools.partial(
            AxialSubBlock, num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, use_stochastic_depth=self.use_stochastic_depth,
            gelu_approximate=self.gelu_approximate, layernorm_epsilon=self.layernorm_epsilon, dtype=self.dtype,
            deterministic=self.deterministic, capture_attention=self.capture_attention,
            grid_shape=tuple(self.grid_shape))
        x = half(axis="row", name="row")(x, drop_rate)
        return half(axis="column", name="column")(x, drop_rate)


class ScannedAxialEncoderBlock(AxialEncoderBlock):
    """AxialEncoderBlock in nn.scan's (carry, x) -> (carry, y) form; the per-layer drop rate is scanned."""

    def __call__(self, x: Array, drop_rate: Array) -> tuple[Array, None]:  # type: ignore[override]
        return super().__call__(x, drop_rate), None


def attention_flops(tokens: int, grid_shape: tuple[int, int], hidden_size: int) -> float:
    """Forward FLOPs of one axial block's attention scores and weighted sums (both halves), per image."""
    height, width = grid_shape
    return 2.0 * (2 * tokens * width * hidden_size + 2 * tokens * height * hidden_size)


def block_flops(grid_shape: tuple[int, int], hidden_size: int, mlp_dim: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the matmuls of one axial block, per image."""
    tokens = grid_shape[0] * grid_shape[1]
    dense = 2.0 * (4 * tokens * hidden_size * hidden_size + 2 * tokens * hidden_size * mlp_dim)
    return 2 * dense + attention_flops(tokens, grid_shape, hidden_size)
