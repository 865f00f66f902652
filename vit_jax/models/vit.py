"""Vision Transformer (Dosovitskiy et al., 2020) with the parameter names of the original checkpoints.

Tree: `embedding` (patch conv), `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1/{query,key,value,out},
LayerNorm_2, MlpBlock_3/{Dense_0,Dense_1}}`, `Transformer/encoder_norm`, `pre_logits`, `head`;
hybrids add the BiT trunk (`conv_root`, `gn_root`, `block{s}/...`) at the top. With `scan=True` the
blocks are one `Transformer/encoderblock/...` whose arrays are stacked over depth on axis 0
(`stack_blocks` / `unstack_blocks` convert).

Two switches change the model for the paper's side experiments, both off by default (tree unchanged):
`axial=True` makes every encoder block an Axial-ViT block (`vit_jax.models.axial`); `masked_patch_classes > 0`
adds a learnable `mask_embedding` and a per-token `masked_patch_head` in place of pooling, `pre_logits` and
`head`, for masked patch prediction (`vit_jax.masked_patch`).

Numerics: with `dtype=bfloat16` (float32 params) every matmul -- Dense layers, the patch embedding (computed as
patchify + matmul, the same parameters and result as the strided conv), attention logits and values -- takes
bf16 inputs and accumulates in float32, forward and backward (`einsum`, `dot_general` below); attention logits
and softmax stay float32, logits are returned in float32.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `classes`, ...), which
`vit_jax.sharding` maps onto mesh axes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.extend.random import threefry_2x32

from vit_jax.models.resnet import resnet_trunk
from vit_jax.models.variants import resnet_stride

Array = jax.Array
_xavier = nn.initializers.xavier_uniform()


def _init(init, axes):
    return nn.with_logical_partitioning(init, axes)


def _constrain(x: Array) -> Array:
    """Pin a (batch, tokens, embed) activation's layout; a no-op outside a mesh with axis rules."""
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


# ----------------------------------------------------------------------------------------------------------------
# Low-precision matmuls: float32 accumulation.
#
# With a bfloat16 (or float16) compute dtype every matmul of the model -- the Dense / DenseGeneral layers, the
# patch embedding, attention logits and attention-weighted values -- multiplies low-precision inputs, accumulates
# in float32 (`preferred_element_type=float32`) and rounds the result once to the compute dtype. That is what
# TPU MXUs and GPU tensor cores do anyway for a bf16 dot, so on those platforms the numerics are unchanged and the
# convert folds into the dot's output; on CPU it is also the fast path: XLA:CPU runs bf16 x bf16 -> f32 at about
# twice its float32 rate, while a bf16 -> bf16 dot runs at below the float32 rate. So it applies on every platform,
# with no platform check. The backward pass (custom VJP) does the same: the cotangent stays in the compute dtype
# and both gradient matmuls accumulate in float32, instead of the mixed float32 x bf16 dots that autodiff of a
# float32-output dot would give. float32 / float64 compute takes plain `jnp.einsum` (nothing changes).
# Platform choices: attention is computed explicitly except on GPU (where `jax.nn.dot_product_attention` may pick
# a fused kernel; on CPU/TPU it is the same XLA code minus float32 accumulation of probs @ values). On CPU, batched
# or skinny bf16 matmuls multiply float32 copies (XLA:CPU has no bf16 -> f32 kernel for them; see
# `_einsum_f32acc_impl`; on TPU that upcast would cost a multi-pass f32 dot) and dropout draws a cheaper mask
# (`Dropout`). Those two use `jax.lax.platform_dependent`, decided when lowering for a platform, so a TPU step
# compiled on a CPU host (`vit_jax.plan`) is the TPU program.

_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MIN_BF16_DIM = 64  # on CPU, a bf16 matmul with a smaller M, K or N multiplies float32 copies (see below)


def _einsum_f32acc_impl(spec: str, a: Array, b: Array, keep_f32: bool = False) -> Array:
    """The einsum as one canonical (batch, M, K) x (batch, K, N) -> f32 dot_general between explicit transposes.

    XLA:CPU's library matmuls take bf16 x bf16 -> f32 in that form; a dot whose operands it would have to
    transpose itself can fall back to a generic kernel that has no bf16 -> f32 variant ("Unsupported element
    type for DotThunk"). XLA:CPU sends batched matmuls (attention's) and skinny ones (the head's: M or K = batch)
    to that kernel whatever their form, and may fold our transposes back into the dot, so on CPU those multiply
    float32 copies of the bf16 operands: the same products and float32 sums, at the float32 rate (attention's
    matmuls are ~4% of ViT-B/16's FLOPs, the head's ~0.01%).
    """
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    batch = [c for c in sa if c in sb and c in out]
    contract = [c for c in sa if c in sb and c not in out]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    size = {c: n for s, x in ((sa, a), (sb, b)) for c, n in zip(s, x.shape)}
    prod = lambda cs: int(np.prod([size[c] for c in cs], dtype=np.int64))  # noqa: E731
    a2 = jnp.transpose(a, [sa.index(c) for c in batch + free_a + contract]).reshape(
        prod(batch), prod(free_a), prod(contract))
    b2 = jnp.transpose(b, [sb.index(c) for c in batch + contract + free_b]).reshape(
        prod(batch), prod(contract), prod(free_b))
    def dot(x: Array, y: Array) -> Array:
        return jax.lax.dot_general(x, y, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)

    if batch or min(a2.shape[1], a2.shape[2], b2.shape[2]) < _MIN_BF16_DIM:
        # Chosen when lowering for a platform (so a TPU step compiled on a CPU host takes the TPU branch).
        y = jax.lax.platform_dependent(a2, b2, cpu=lambda x, y: dot(x.astype(jnp.float32), y.astype(jnp.float32)),
                                       default=dot)
    else:
        y = dot(a2, b2)
    order = batch + free_a + free_b
    y = jnp.transpose(y.reshape([size[c] for c in order]), [order.index(c) for c in out])
    return y if keep_f32 else y.astype(jnp.result_type(a, b))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _einsum_f32acc(spec: str, a: Array, b: Array, keep_f32: bool) -> Array:
    return _einsum_f32acc_impl(spec, a, b, keep_f32)


def _einsum_f32acc_fwd(spec: str, a: Array, b: Array, keep_f32: bool) -> tuple[Array, tuple[Array, Array]]:
    return _einsum_f32acc_impl(spec, a, b, keep_f32), (a, b)


def _einsum_f32acc_bwd(spec: str, keep_f32: bool, residuals: tuple[Array, Array],
                       g: Array) -> tuple[Array, Array]:
    a, b = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    g = g.astype(jnp.result_type(a, b))  # the cotangent in the compute dtype: bf16 x bf16 -> f32 dots below
    grad_a = _einsum_f32acc_impl(f"{out},{sb}->{sa}", g, b).astype(a.dtype)
    grad_b = _einsum_f32acc_impl(f"{sa},{out}->{sb}", a, g).astype(b.dtype)
    return grad_a, grad_b


_einsum_f32acc.defvjp(_einsum_f32acc_fwd, _einsum_f32acc_bwd)


def einsum(spec: str, a: Array, b: Array, keep_f32: bool = False) -> Array:
    """`jnp.einsum` of two operands; in bf16/f16 accumulating in float32 (forward and backward), then rounded.

    `spec` must be explicit ("...->...") with every index of an operand also in the other operand or the output
    (a matmul-like contraction, no index summed within one operand), so that each gradient is again an einsum.
    `keep_f32=True` returns the float32 accumulator unrounded (attention logits, which go into a float32
    softmax); for float32 / float64 operands the result has their dtype either way.
    """
    if jnp.result_type(a, b) not in _LOW_PRECISION:
        return jnp.einsum(spec, a, b)
    return _einsum_f32acc(spec, a, b, keep_f32)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, **kwargs: Any) -> Array:
    """`lax.dot_general` with float32 accumulation for bf16/f16 (see `einsum`); what the Dense layers use.

    Rewrites the contraction as an einsum spec (output: batch, lhs free, rhs free dims, as dot_general orders
    them). An explicit `precision` / `preferred_element_type`, or a float32 / float64 dot, goes to
    `lax.dot_general` unchanged.
    """
    dtype = jnp.result_type(lhs, rhs)
    if dtype not in _LOW_PRECISION or precision is not None or preferred_element_type is not None or kwargs:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type, **kwargs)
    (lc, rc), (lb, rb) = dimension_numbers
    letters = iter(_LETTERS)
    sl = [next(letters) for _ in range(lhs.ndim)]
    sr = [next(letters) for _ in range(rhs.ndim)]
    for i, j in zip(tuple(lc) + tuple(lb), tuple(rc) + tuple(rb)):
        sr[j] = sl[i]
    batch = [sl[i] for i in lb]
    free_l = [sl[i] for i in range(lhs.ndim) if i not in tuple(lc) + tuple(lb)]
    free_r = [sr[j] for j in range(rhs.ndim) if j not in tuple(rc) + tuple(rb)]
    spec = f"{''.join(sl)},{''.join(sr)}->{''.join(batch + free_l + free_r)}"
    return einsum(spec, lhs.astype(dtype), rhs.astype(dtype))


def _keep_mask(key: Array, rate: float, shape: tuple[int, ...]) -> Array:
    """A bool mask, True with probability 1 - `rate`, from 16-bit random numbers (see `Dropout`)."""
    data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    threefry = data.shape == (2,) and data.dtype == jnp.uint32 and (
        not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or "threefry" in str(jax.random.key_impl(key)))
    if not threefry:
        return jax.random.bernoulli(key, 1.0 - rate, shape)

    def cheap(data: Array) -> Array:
        size = int(np.prod(shape, dtype=np.int64))
        count = jax.lax.iota(jnp.uint32, 2 * (-(-size // 4)))  # each threefry2x32 pair gives 2 words = 4 halves
        words = threefry_2x32(data, count)
        halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:size].reshape(shape)
        return halves >= np.uint16(min(65535, round(rate * 65536)))

    # Chosen when lowering for a platform: a TPU step compiled on a CPU host (vit_jax.plan) draws as on TPU.
    return jax.lax.platform_dependent(data, cpu=cheap,
                                      default=lambda data: jax.random.bernoulli(key, 1.0 - rate, shape))


class Dropout(nn.Module):
    """Inverted dropout, `nn.Dropout(rate)(x, deterministic=...)`'s behaviour with a cheaper mask on CPU.

    `nn.Dropout` draws each element's mask from `jax.random.bernoulli`: one threefry2x32 evaluation (64 random
    bits) per element. On CPU those random numbers cost about as much as ViT-B/16's matmuls in a training step,
    so there this module spends one evaluation per four elements, 16 bits each (the rate exact to 1/65536).
    Elsewhere (TPU/GPU, where random bits are cheap and this flat draw would not shard with the batch), and
    with a non-threefry key, it draws like `nn.Dropout`. Keys come from the "dropout" rng collection.
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        mask = _keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        return jnp.where(mask, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout."""

    mlp_dim: int
    dropout_rate: float = 0.0
    gelu_approximate: bool = True
    dtype: Any = jnp.float32
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bias_init = nn.initializers.normal(stddev=1e-6)
        features = x.shape[-1]
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, dot_general=dot_general,
                     kernel_init=_init(_xavier, ("embed", "mlp")), bias_init=_init(bias_init, ("mlp",)),
                     name="Dense_0")(x)
        y = nn.gelu(y, approximate=self.gelu_approximate)
        y = nn.with_logical_constraint(y, ("activation_batch", "activation_length", "activation_mlp"))
        y = Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
        y = nn.Dense(features, dtype=self.dtype, dot_general=dot_general, kernel_init=_init(_xavier, ("mlp", "embed")),
                     bias_init=_init(bias_init, ("embed",)), name="Dense_1")(y)
        return Dropout(self.dropout_rate)(y, deterministic=self.deterministic)


class MultiHeadDotProductAttention(nn.Module):
    """Self-attention with per-head query/key/value/out kernels shaped like the original checkpoints.

    Runs through `jax.nn.dot_product_attention` (fused kernels on GPU/TPU); with attention dropout in
    training, or when the probabilities are asked for (`capture_attention`), it computes them explicitly.
    """

    num_heads: int
    attention_dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    deterministic: bool = True
    capture_attention: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = x.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"hidden size {features} is not divisible by num_heads {self.num_heads}")
        head_dim = features // self.num_heads
        proj = functools.partial(
            nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype, dot_general=dot_general,
            kernel_init=_init(_xavier, ("embed", "heads", "kv")),
            bias_init=_init(nn.initializers.zeros, ("heads", "kv")))
        query = proj(name="query")(x)
        key = proj(name="key")(x)
        value = proj(name="value")(x)
        use_dropout = self.attention_dropout_rate > 0 and not self.deterministic
        if use_dropout or self.capture_attention or jax.default_backend() != "gpu":
            # Explicit attention: probabilities asked for or dropped out, or off GPU. Off GPU
            # jax.nn.dot_product_attention is this same XLA code, except that its bf16 probs @ values dot would
            # not accumulate in float32; on GPU it may pick a fused cuDNN kernel. Logits and softmax are float32.
            scale = 1.0 / np.sqrt(head_dim).astype(np.float32)
            logits = einsum("bqhd,bkhd->bhqk", query * scale.astype(query.dtype), key, keep_f32=True)
            logits = logits.astype(jnp.float32)
            weights = jax.nn.softmax(logits, axis=-1)
            self.sow("intermediates", "attention", weights)
            weights = Dropout(self.attention_dropout_rate)(weights, deterministic=not use_dropout)
            out = einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)
        else:
            out = jax.nn.dot_product_attention(query, key, value)
        return nn.DenseGeneral(
            features, axis=(-2, -1), dtype=self.dtype, dot_general=dot_general,
            kernel_init=_init(_xavier, ("heads", "kv", "embed")),
            bias_init=_init(nn.initializers.zeros, ("embed",)), name="out")(out)


class EncoderBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)), each branch with stochastic depth."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    use_stochastic_depth: bool = False
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    dtype: Any = jnp.float32
    deterministic: bool = True
    capture_attention: bool = False

    def _drop_path(self, y: Array, rate: Array | float) -> Array:
        """Drop the whole residual branch per example with probability `rate` (rescaling the kept ones)."""
        if not self.use_stochastic_depth or self.deterministic:
            return y
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
        return jnp.where(mask, y / keep, jnp.zeros_like(y)).astype(y.dtype)

    @nn.compact
    def __call__(self, x: Array, drop_rate: Array | float = 0.0) -> Array:
        norm = functools.partial(
            nn.LayerNorm, epsilon=self.layernorm_epsilon, dtype=self.dtype,
            scale_init=_init(nn.initializers.ones, ("embed",)), bias_init=_init(nn.initializers.zeros, ("embed",)))
        y = norm(name="LayerNorm_0")(x)
        y = MultiHeadDotProductAttention(
            self.num_heads, self.attention_dropout_rate, self.dtype, self.deterministic, self.capture_attention,
            name="MultiHeadDotProductAttention_1")(y)
        y = Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
        x = _constrain(x + self._drop_path(y, drop_rate))
        y = norm(name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu_approximate, self.dtype, self.deterministic,
                     name="MlpBlock_3")(y)
        return _constrain(x + self._drop_path(y, drop_rate))


class _ScannedBlock(EncoderBlock):
    """EncoderBlock in nn.scan's (carry, x) -> (carry, y) form; the per-layer drop rate is scanned."""

    def __call__(self, x: Array, drop_rate: Array) -> tuple[Array, None]:  # type: ignore[override]
        return super().__call__(x, drop_rate), None


class PatchEmbedding(nn.Module):
    """Non-overlapping patch embedding: `nn.Conv(features, (p, p), strides=p, padding="VALID")` as one matmul.

    Same parameters (`kernel` (p, p, c, features), `bias`), initialisers and result as that conv, but computed as
    patchify (reshape) + `einsum`: one plain matmul on every backend, which XLA:CPU runs faster than its
    convolution, forward and backward, and which takes the float32-accumulating bf16 path of `einsum`.
    """

    features: int
    patch_size: int
    dtype: Any = jnp.float32
    kernel_init: Any = _init(nn.initializers.lecun_normal(), (None, None, None, "embed"))
    bias_init: Any = _init(nn.initializers.zeros, ("embed",))

    @nn.compact
    def __call__(self, x: Array) -> Array:
        p = self.patch_size
        batch, height, width, channels = x.shape
        kernel = self.param("kernel", self.kernel_init, (p, p, channels, self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        rows, cols = height // p, width // p  # VALID: a remainder smaller than a patch is dropped
        x = x[:, :rows * p, :cols * p].reshape(batch, rows, p, cols, p, channels).astype(self.dtype)
        y = einsum("bxiyjc,ijcd->bxyd", x, jnp.asarray(kernel, self.dtype))
        return y + jnp.asarray(bias, self.dtype)


class AddPositionEmbs(nn.Module):
    """Adds learned 1-D position embeddings (one per token, the class token's included)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        pos_embedding = self.param(
            "pos_embedding", _init(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
            (1, x.shape[1], x.shape[2]), jnp.float32)
        return x + jnp.asarray(pos_embedding, x.dtype)


class Encoder(nn.Module):
    """Position embeddings, `num_layers` encoder blocks (optionally remat / scan), final LayerNorm."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth: float = 0.0
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    remat: bool = False
    scan: bool = False
    dtype: Any = jnp.float32
    capture_attention: bool = False
    axial: bool = False  # Axial-ViT blocks over a patch grid of `grid_shape` (vit_jax.models.axial)
    grid_shape: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: Array, *, train: bool) -> Array:
        x = AddPositionEmbs(name="posembed_input")(x)
        x = Dropout(self.dropout_rate)(x, deterministic=not train)
        x = _constrain(x)
        # Stochastic depth grows linearly from 0 at the first block to `stochastic_depth` at the last.
        drop_rates = np.linspace(0.0, self.stochastic_depth, self.num_layers, dtype=np.float32)
        block_args = dict(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate, use_stochastic_depth=self.stochastic_depth > 0,
            gelu_approximate=self.gelu_approximate, layernorm_epsilon=self.layernorm_epsilon, dtype=self.dtype,
            deterministic=not train, capture_attention=self.capture_attention)
        block, scanned_block = EncoderBlock, _ScannedBlock
        if self.axial:
            # Imported here: axial.py builds on EncoderBlock from this module.
            from vit_jax.models.axial import AxialEncoderBlock, ScannedAxialEncoderBlock

            block, scanned_block = AxialEncoderBlock, ScannedAxialEncoderBlock
            block_args["grid_shape"] = tuple(self.grid_shape)
        if self.scan:
            block_cls = nn.remat(scanned_block) if self.remat else scanned_block
            scanned = nn.scan(
                block_cls, variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True}, length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(**block_args, name="encoderblock")(x, jnp.asarray(drop_rates))
        else:
            block_cls = nn.remat(block) if self.remat else block
            for i in range(self.num_layers):
                x = block_cls(**block_args, name=f"encoderblock_{i}")(x, float(drop_rates[i]))
        return nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=self.dtype, name="encoder_norm",
                            scale_init=_init(nn.initializers.ones, ("embed",)),
                            bias_init=_init(nn.initializers.zeros, ("embed",)))(x)


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding (after an optional BiT trunk), encoder, token/GAP pooling, head.

    `__call__` returns float32 logits; the pooled pre-logits and encoded tokens are sown under
    `intermediates` for analysis (`mutable=["intermediates"]`). With `masked_patch_classes > 0` it returns
    per-patch logits (batch, patches, masked_patch_classes) instead, and takes the corruption of the patch
    embeddings as `patch_source` / `patch_mask` (see `corrupt_patches`).
    """

    num_classes: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    classifier: str = "token"
    representation_size: int = 0
    resnet_layers: tuple[int, ...] = ()
    resnet_width: int = 1
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth: float = 0.0
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    head_bias_init: float = 0.0
    dtype: Any = jnp.float32
    remat: bool = False
    scan: bool = False
    capture_attention: bool = False
    axial: bool = False
    masked_patch_classes: int = 0

    @nn.compact
    def __call__(self, images: Array, *, train: bool = False, patch_source: Array | None = None,
                 patch_mask: Array | None = None) -> Array:
        if self.classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
        if self.axial and self.classifier != "gap":
            raise ValueError(f"axial=True needs classifier='gap' (got {self.classifier!r}): the class token has no "
                             "row or column in the patch grid; see vit_jax/models/axial.py")
        if not self.masked_patch_classes and (patch_source is not None or patch_mask is not None):
            raise ValueError("patch_source / patch_mask corrupt patches for masked patch prediction; build the model "
                             "with masked_patch_classes > 0 (vit_jax.masked_patch.build_pretraining_model)")
        x = images.astype(self.dtype)
        embed_patch = self.patch_size
        if self.resnet_layers:
            x = resnet_trunk(x, self.resnet_layers, 64 * self.resnet_width, self.dtype)
            embed_patch = self.patch_size // resnet_stride(tuple(self.resnet_layers))
        x = PatchEmbedding(self.hidden_size, embed_patch, self.dtype, name="embedding")(x)
        batch, height, width, channels = x.shape
        x = jnp.reshape(x, (batch, height * width, channels))
        if self.masked_patch_classes:
            mask_embedding = self.param(
                "mask_embedding", _init(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
                (1, 1, channels), jnp.float32)
            x = corrupt_patches(x, jnp.asarray(mask_embedding, x.dtype), patch_source, patch_mask)
        if self.classifier == "token":
            cls = self.param("cls", _init(nn.initializers.zeros, (None, None, "embed")), (1, 1, channels))
            x = jnp.concatenate([jnp.tile(jnp.asarray(cls, x.dtype), (batch, 1, 1)), x], axis=1)

        encoder = Encoder(
            self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
            self.stochastic_depth, self.gelu_approximate, self.layernorm_epsilon, self.remat, self.scan,
            self.dtype, self.capture_attention, self.axial, (height, width), name="Transformer")
        x = encoder(x, train=train)
        self.sow("intermediates", "encoded", x)
        if self.masked_patch_classes:
            patches = x[:, 1:] if self.classifier == "token" else x
            logits = nn.Dense(self.masked_patch_classes, dtype=self.dtype, dot_general=dot_general,
                              name="masked_patch_head",
                              kernel_init=_init(nn.initializers.zeros, ("embed", "classes")),
                              bias_init=_init(nn.initializers.zeros, ("classes",)))(patches)
            return logits.astype(jnp.float32)
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)

        if self.representation_size:
            x = nn.Dense(self.representation_size, dtype=self.dtype, dot_general=dot_general, name="pre_logits",
                         kernel_init=_init(nn.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=_init(nn.initializers.zeros, ("mlp",)))(x)
            x = jnp.tanh(x)
        self.sow("intermediates", "pre_logits", x)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, dot_general=dot_general, name="head",
                          kernel_init=_init(nn.initializers.zeros, ("embed", "classes")),
                          bias_init=_init(nn.initializers.constant(self.head_bias_init), ("classes",)))(x)
        return logits.astype(jnp.float32)


def corrupt_patches(tokens: Array, mask_embedding: Array, patch_source: Array | None,
                    patch_mask: Array | None) -> Array:
    """Patch token j of each image becomes its patch `patch_source[:, j]`, then `mask_embedding` where `patch_mask`.

    `tokens` (batch, patches, embed); `patch_source` (batch, patches) int, the identity where a patch is not
    swapped; `patch_mask` (batch, patches) bool. Swaps stay within an image, so a batch-sharded array needs
    no communication.
    """
    if patch_source is not None:
        tokens = jnp.take_along_axis(tokens, patch_source.astype(jnp.int32)[..., None], axis=1)
    if patch_mask is not None:
        tokens = jnp.where(patch_mask[..., None], mask_embedding, tokens)
    return tokens


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, **overrides: Any) -> VisionTransformer:
    """The VisionTransformer a config's `model` section describes, with `num_classes` outputs."""
    m = model_config
    kwargs = dict(
        num_classes=num_classes, patch_size=m.patch_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_heads=m.num_heads, mlp_dim=m.mlp_dim, classifier=m.classifier,
        representation_size=m.representation_size, resnet_layers=tuple(m.resnet_layers),
        resnet_width=m.resnet_width, dropout_rate=m.dropout_rate, attention_dropout_rate=m.attention_dropout_rate,
        stochastic_depth=m.stochastic_depth, gelu_approximate=m.gelu_approximate,
        layernorm_epsilon=m.layernorm_epsilon, head_bias_init=m.head_bias_init, dtype=jnp.dtype(m.dtype),
        remat=m.remat, scan=m.scan, axial=m.axial)
    kwargs.update(overrides)
    return VisionTransformer(**kwargs)


def stack_blocks(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Per-block params (`encoderblock_{i}`) -> one `encoderblock` stacked over depth (the scan layout)."""
    params = jax.tree.map(lambda a: a, dict(params))
    transformer = dict(params["Transformer"])
    blocks = [transformer.pop(f"encoderblock_{i}") for i in range(num_layers)]
    transformer["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    params["Transformer"] = transformer
    return params


def unstack_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
    """The scan layout (`encoderblock` stacked on axis 0) -> per-block `encoderblock_{i}` params."""
    params = dict(params)
    transformer = dict(params["Transformer"])
    stacked = transformer.pop("encoderblock")
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        transformer[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    params["Transformer"] = transformer
    return params
