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
bf16 inputs and accumulates in float32, forward and backward (`vit_jax.models.layers`: `einsum`, `Dense`);
attention logits and softmax stay float32, logits are returned in float32. The token stream between the matmuls
stays float32, as in the reference implementations (vision_transformer's models_vit.py, big_vision's vit.py):
the patch embedding (and a hybrid's ResNet trunk) computes in bf16 and returns its float32 accumulator, the class
token and position embeddings are added in float32, and every residual add is `x + branch.astype(x.dtype)`;
only the LayerNorms feeding attention and the MLP hand bf16 to their matmuls. (A bf16 residual stream rounds
every block's sum: after 8 blocks of width 64 it was 2.0e-2 of its largest magnitude from float64, the float32
stream 3.5e-3; tests/test_vit.py.)

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `classes`, ...), which
`vit_jax.sharding` maps onto mesh axes.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models.layers import LOW_PRECISION, Dense, Dropout, broadcast_leading, check_rate, einsum, softmax
from vit_jax.models.resnet import resnet_trunk
from vit_jax.models.variants import embedding_patch

Array = jax.Array
_xavier = nn.initializers.xavier_uniform()


def _init(init, axes):
    return nn.with_logical_partitioning(init, axes)


def _at_least_float32(dtype: Any) -> Any:
    """The dtype of the token stream (patch embedding output, class token, position embeddings, residual adds) and
    of the model's end (encoder_norm, pooling, pre_logits, head): float32 under a bf16 compute dtype, as the paper's
    code (a head bias of -10 leaves bf16 logits a spacing of 0.06); float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _check_positive_int(name: str, value: Any, condition: str = "") -> None:
    """A size of the architecture (patch size, number of heads) must be a positive integer: 0 failed on a division
    by zero deep inside the model. `condition` completes the message ("dividing ...")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive integer{condition}")


def _constrain(x: Array) -> Array:
    """Pin a (batch, tokens, embed) activation's layout; a no-op outside a mesh with axis rules."""
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


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
        y = Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_init(_xavier, ("embed", "mlp")),
                  bias_init=_init(bias_init, ("mlp",)),
                  activation=functools.partial(nn.gelu, approximate=self.gelu_approximate), name="Dense_0")(x)
        y = nn.with_logical_constraint(y, ("activation_batch", "activation_length", "activation_mlp"))
        y = Dropout(self.dropout_rate)(y, deterministic=self.deterministic)
        y = Dense(features, dtype=self.dtype, kernel_init=_init(_xavier, ("mlp", "embed")),
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
        _check_positive_int("num_heads", self.num_heads, f" dividing the hidden size {features}")
        if features % self.num_heads:
            raise ValueError(f"hidden size {features} is not divisible by num_heads {self.num_heads}")
        head_dim = features // self.num_heads
        proj = functools.partial(
            Dense, features=(self.num_heads, head_dim), dtype=self.dtype,
            kernel_init=_init(_xavier, ("embed", "heads", "kv")),
            bias_init=_init(nn.initializers.zeros, ("heads", "kv")))
        query = proj(name="query")(x)
        key = proj(name="key")(x)
        value = proj(name="value")(x)
        use_dropout = self.attention_dropout_rate > 0 and not self.deterministic
        if use_dropout or self.capture_attention or jax.default_backend() != "gpu":
            # Explicit attention: probabilities asked for or dropped out, or off GPU. Off GPU
            # jax.nn.dot_product_attention is this same XLA code, except that its bf16 probs @ values dot would
            # not accumulate in float32; on GPU it may pick a fused cuDNN kernel. Logits and softmax are float32
            # (float64 in a float64 model).
            # Heads first ((batch, heads, tokens, head_dim)) for both matmuls, and back after. Left to itself,
            # XLA:CPU computes probs @ values transposed, as (values^T @ probs^T), a slower kernel with a transposed
            # result (ViT-B/16 float32 training step 3.50 -> 3.56 img/s, medians of 3 processes each; bf16 and
            # inference unchanged). TPU compiles the same program either way (vit_jax.plan: the same FLOPs and
            # memory to the byte).
            heads_first = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))  # its own inverse
            scale = 1.0 / np.sqrt(np.asarray(head_dim, _at_least_float32(query.dtype)))  # float32 in bf16
            logits = einsum("bhqd,bhkd->bhqk", heads_first(query * scale.astype(query.dtype)), heads_first(key),
                            keep_f32=True)
            logits = logits.astype(_at_least_float32(logits.dtype))
            # A float32 forward pass (inference, evaluation) compiles on CPU with individual YNNPACK matmuls
            # (`vit_jax.xla_options`): there softmax is kept apart, else XLA joins it and the two matmuls into one
            # slow subgraph. With bf16 matmuls, or in a float32 training step (compiled with fused matmuls), that
            # joined subgraph is the faster one (bf16 inference 20.2 -> 21.3 img/s, float32 training step
            # 2.85 -> 2.95, in-process A/B).
            apart = jnp.dtype(value.dtype) not in LOW_PRECISION and self.deterministic
            weights = softmax(logits, axis=-1, apart=apart)
            self.sow("intermediates", "attention", weights)
            weights = Dropout(self.attention_dropout_rate)(weights, deterministic=not use_dropout)
            out = heads_first(einsum("bhqk,bhkd->bhqd", weights.astype(value.dtype), heads_first(value)))
        else:
            out = jax.nn.dot_product_attention(query, key, value)
        return Dense(
            features, axis=(-2, -1), dtype=self.dtype,
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
        """Drop the whole residual branch per example with probability `rate` (rescaling the kept ones).

        Rate 1 drops every branch, with zero (not NaN) gradients: the kept ones are scaled by 1 / keep only where
        keep > 0 (a `where` over y / keep would send its zero cotangent through 1 / 0)."""
        check_rate("drop_rate", rate)
        if not self.use_stochastic_depth or self.deterministic:
            return y
        keep = 1.0 - jnp.asarray(rate, jnp.float32)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
        scale = jnp.where(keep > 0, 1.0 / jnp.where(keep > 0, keep, 1.0), 0.0)
        return y * (mask * scale).astype(y.dtype)

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
        x = _constrain(x + self._drop_path(y.astype(x.dtype), drop_rate))  # the residual stream keeps its dtype
        y = norm(name="LayerNorm_2")(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu_approximate, self.dtype, self.deterministic,
                     name="MlpBlock_3")(y)
        return _constrain(x + self._drop_path(y.astype(x.dtype), drop_rate))


class _ScannedBlock(EncoderBlock):
    """EncoderBlock in nn.scan's (carry, x) -> (carry, y) form; the per-layer drop rate is scanned."""

    def __call__(self, x: Array, drop_rate: Array) -> tuple[Array, None]:  # type: ignore[override]
        return super().__call__(x, drop_rate), None


class PatchEmbedding(nn.Module):
    """Non-overlapping patch embedding: `nn.Conv(features, (p, p), strides=p, padding="VALID")` as one matmul.

    Same parameters (`kernel` (p, p, c, features), `bias`), initialisers and result as that conv, but computed as
    patchify (reshape) + `einsum`: one plain matmul on every backend, which XLA:CPU runs faster than its
    convolution, forward and backward, and which takes the float32-accumulating bf16 path of `einsum`. With a
    bf16 `dtype` it multiplies bf16 inputs and returns the float32 accumulator plus the float32 bias, unrounded
    (the token stream's dtype, `_at_least_float32`).
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
        y = einsum("bxiyjc,ijcd->bxyd", x, jnp.asarray(kernel, self.dtype), keep_f32=True)
        y = y.astype(_at_least_float32(self.dtype))
        return y + broadcast_leading(jnp.asarray(bias, y.dtype), y.shape)


class AddPositionEmbs(nn.Module):
    """Adds learned 1-D position embeddings (one per token, the class token's included), in at least float32:
    bf16 tokens become float32 (the token stream's dtype), as adding the float32 parameter does in the reference."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = _at_least_float32(x.dtype)
        pos_embedding = self.param(
            "pos_embedding", _init(nn.initializers.normal(stddev=0.02), (None, None, "embed")),
            (1, x.shape[1], x.shape[2]), jnp.float32)
        return x.astype(dtype) + broadcast_leading(jnp.asarray(pos_embedding[0], dtype), x.shape)


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
        check_rate("stochastic_depth", self.stochastic_depth)
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
        return nn.LayerNorm(epsilon=self.layernorm_epsilon, dtype=_at_least_float32(self.dtype), name="encoder_norm",
                            scale_init=_init(nn.initializers.ones, ("embed",)),
                            bias_init=_init(nn.initializers.zeros, ("embed",)))(x)


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding (after an optional BiT trunk), encoder, token/GAP pooling, head.

    `__call__` returns float32 logits; the encoded tokens (`encoded`) and what the head sees (`representation`:
    pooled, after `pre_logits` if any) are sown under `intermediates` for analysis (`mutable=["intermediates"]`).
    With `masked_patch_classes > 0` it returns per-patch logits (batch, patches, masked_patch_classes) instead,
    and takes the corruption of the patch embeddings as `patch_source` / `patch_mask` (see `corrupt_patches`).
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

    def _check_images(self, images: Array) -> None:
        """Refuse a patch size or head count that is no positive integer (a division by zero inside), and what the
        model would compute something meaningless from, without an error of its own: pixels that are not floats in
        [-1, 1] (uint8 0..255), a side that is no positive multiple of the patch (the remainder was dropped; no
        patch at all left only the class token), a hybrid whose patch is no multiple of its ResNet's stride."""
        p = self.patch_size
        _check_positive_int("patch_size", p, " (the side of a square patch, in pixels)")
        _check_positive_int("num_heads", self.num_heads, f" dividing hidden_size={self.hidden_size}")
        embedding_patch(p, tuple(self.resnet_layers))  # a hybrid's patch is a multiple of its trunk's stride
        if images.ndim != 4:
            raise ValueError(f"images of shape {tuple(images.shape)}: expected (batch, height, width, channels)")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"images of dtype {images.dtype}: expected floats in [-1, 1] "
                             "(vit_jax.data.preprocess.to_unit_range converts uint8 pixels)")
        height, width = images.shape[1:3]
        if height % p or width % p or not height or not width:
            raise ValueError(f"images of {height}x{width} pixels: each side must be a positive multiple of the "
                             f"patch size {p} (e.g. {max(1, round(height / p)) * p}x{max(1, round(width / p)) * p})")

    def _check_position_embeddings(self, images: Array) -> None:
        """Refuse params whose position embeddings are of another patch grid (a model initialised or trained at
        another resolution), naming both grids and the remedy; flax's own error (ScopeParamShapeError) names
        neither. Nothing to check at init."""
        pos = self.variables.get("params", {}).get("Transformer", {}).get("posembed_input", {}).get("pos_embedding")
        if pos is None:
            return
        have = nn.unbox(pos).shape[1]
        p, prefix = self.patch_size, int(self.classifier == "token")
        height, width = images.shape[1:3]
        rows, cols = height // p, width // p
        if have == prefix + rows * cols:
            return
        plus_cls = " + the class token" if prefix else ""
        side = math.isqrt(max(have - prefix, 0))
        if side * side == have - prefix:
            theirs, fix = f"a {side}x{side} patch grid{plus_cls}, {side * p}x{side * p} pixels", (
                f" or feed images of {side * p}x{side * p} pixels (config.image_size={side * p})")
        else:
            theirs, fix = f"{have - prefix} patches{plus_cls}", ""
        raise ValueError(
            f"the position embeddings hold {have} tokens ({theirs}), but images of {height}x{width} pixels give "
            f"{prefix + rows * cols} ({rows}x{cols} patches of {p} pixels{plus_cls}): the params are of a model at "
            "another resolution. Resize the position embeddings to the new grid (vit_jax.interop.resize_posemb("
            f"pos_embedding, ({rows}, {cols}), num_prefix_tokens={prefix}); vit_jax.interop.load_pretrained(..., "
            f"image_size=...) resizes a checkpoint's){fix}")

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
        self._check_images(images)
        self._check_position_embeddings(images)
        x = images.astype(self.dtype)
        if self.resnet_layers:
            x = resnet_trunk(x, self.resnet_layers, 64 * self.resnet_width, self.dtype)
        embed_patch = embedding_patch(self.patch_size, tuple(self.resnet_layers))
        # bf16 matmul, float32 (at least) tokens: the residual stream's dtype from here on (see the module doc).
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
            logits = Dense(self.masked_patch_classes, dtype=_at_least_float32(self.dtype),
                              name="masked_patch_head",
                              kernel_init=_init(nn.initializers.zeros, ("embed", "classes")),
                              bias_init=_init(nn.initializers.zeros, ("classes",)))(patches)
            return logits.astype(jnp.float32)
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)

        if self.representation_size:
            x = Dense(self.representation_size, dtype=_at_least_float32(self.dtype), name="pre_logits",
                         kernel_init=_init(nn.initializers.lecun_normal(), ("embed", "mlp")),
                         bias_init=_init(nn.initializers.zeros, ("mlp",)))(x)
            x = jnp.tanh(x)
        self.sow("intermediates", "representation", x)  # what the head sees ("pre_logits" names a layer)
        logits = Dense(self.num_classes, dtype=_at_least_float32(self.dtype), name="head",
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
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is invalid: expected a positive integer")
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
