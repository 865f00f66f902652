"""The model's building blocks that are fast on CPU and unchanged elsewhere: matmuls, dropout, Dense.

- `einsum` / `dot_general`: bf16/f16 matmuls accumulating in float32, forward and backward.
- `Dropout`: `nn.Dropout` with a cheaper mask on CPU.
- `broadcast_leading`: in bf16/f16 a broadcast whose gradient (a bias gradient: a sum over rows) is a matmul on CPU.
- `Dense`: `nn.Dense` / `nn.DenseGeneral` with the same parameters, initialisation and result, built from the above;
  on CPU a multi-axis kernel is one matrix.
- `softmax`: `jax.nn.softmax`; on CPU a leaner gradient, and optionally reductions kept apart from matmuls.

CPU-only choices go through `jax.lax.platform_dependent`, decided when lowering for a platform, so a TPU step
compiled on a CPU host (`vit_jax.plan`) is the TPU program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from jax.extend.random import threefry_2x32

Array = jax.Array


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
# a fused kernel; on CPU/TPU it is the same XLA code minus float32 accumulation of probs @ values). On CPU, skinny
# bf16 matmuls multiply float32 copies (XLA:CPU has no bf16 -> f32 kernel for them; see
# `_einsum_f32acc_impl`; on TPU that upcast would cost a multi-pass f32 dot) and dropout draws a cheaper mask
# (`Dropout`). Those two use `jax.lax.platform_dependent`, decided when lowering for a platform, so a TPU step
# compiled on a CPU host (`vit_jax.plan`) is the TPU program.

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MIN_BF16_DIM = 64  # on CPU, a bf16 matmul with a smaller M, K or N multiplies float32 copies (see below)


def _einsum_f32acc_impl(spec: str, a: Array, b: Array, keep_f32: bool = False) -> Array:
    """The einsum as one canonical (batch, M, K) x (batch, K, N) -> f32 dot_general between explicit transposes.

    XLA:CPU's library matmuls (YNNPACK) take bf16 x bf16 -> f32 in that form, batched ones (attention's) included;
    a dot whose operands it would have to transpose itself can fall back to a generic kernel that has no
    bf16 -> f32 variant ("Unsupported element type for DotThunk"). XLA:CPU sends skinny matmuls (a dimension
    below 64: the head's, where M or K = batch; attention in models with small heads) to that kernel whatever
    their form, so on CPU those multiply float32 copies of the bf16 operands: the same products and float32 sums,
    at the float32 rate (the head is ~0.01% of ViT-B/16's FLOPs). Batched bf16 matmuls used to take that path
    too; on jaxlib 0.10 they run natively, 2-2.7x faster than float32 copies (the bf16 training step 3.9 -> 4.4
    img/s).
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

    if min(a2.shape[1], a2.shape[2], b2.shape[2]) < _MIN_BF16_DIM:
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
    if jnp.result_type(a, b) not in LOW_PRECISION:
        return jnp.einsum(spec, a, b)
    return _einsum_f32acc(spec, a, b, keep_f32)


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def dot_general(lhs: Array, rhs: Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, keep_f32: bool = False, **kwargs: Any) -> Array:
    """`lax.dot_general` with float32 accumulation for bf16/f16 (see `einsum`); what the Dense layers use.

    Rewrites the contraction as an einsum spec (output: batch, lhs free, rhs free dims, as dot_general orders
    them). An explicit `precision` / `preferred_element_type`, or a float32 / float64 dot, goes to
    `lax.dot_general` unchanged. `keep_f32` as in `einsum`.
    """
    dtype = jnp.result_type(lhs, rhs)
    if dtype not in LOW_PRECISION or precision is not None or preferred_element_type is not None or kwargs:
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
    return einsum(spec, lhs.astype(dtype), rhs.astype(dtype), keep_f32=keep_f32)


def check_rate(name: str, rate: Any) -> None:
    """Refuse a dropout / drop-path rate outside [0, 1] (1 drops everything); a traced rate is not checked.

    Out of range, `Dropout` failed on a uint16 overflow (rate < 0) or returned zeros in silence (rate > 1).
    """
    if isinstance(rate, jax.core.Tracer):
        return
    if isinstance(rate, bool) or not 0.0 <= float(rate) <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"{name}={rate!r} is invalid: expected a rate in [0, 1]")


def _keep_mask(key: Array, rate: float, shape: tuple[int, ...]) -> Array:
    """A bool mask, True with probability 1 - `rate`, from 16-bit random numbers (see `Dropout`)."""
    data = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    threefry = data.shape == (2,) and data.dtype == jnp.uint32 and (
        not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) or "threefry" in str(jax.random.key_impl(key)))
    if not threefry:
        return jax.random.bernoulli(key, 1.0 - rate, shape)

    def cheap(data: Array) -> Array:
        size = int(np.prod(shape, dtype=np.int64))
        seed = threefry_2x32(data, jnp.arange(2, dtype=jnp.uint32))  # one threefry draw per mask
        # lowbias32 (C. Wellons' integer hash: 2 multiplies, 3 xor-shifts) of a seeded counter: 2 halves per word
        x = (jax.lax.iota(jnp.uint32, -(-size // 2)) + seed[0]) ^ seed[1]
        x = (x ^ (x >> 16)) * np.uint32(0x7FEB352D)
        x = (x ^ (x >> 15)) * np.uint32(0x846CA68B)
        x = x ^ (x >> 16)
        halves = jax.lax.bitcast_convert_type(x, jnp.uint16).reshape(-1)[:size].reshape(shape)
        return halves >= np.uint16(min(65535, round(rate * 65536)))

    # Chosen when lowering for a platform: a TPU step compiled on a CPU host (vit_jax.plan) draws as on TPU.
    return jax.lax.platform_dependent(data, cpu=cheap,
                                      default=lambda data: jax.random.bernoulli(key, 1.0 - rate, shape))


class Dropout(nn.Module):
    """Inverted dropout, `nn.Dropout(rate)(x, deterministic=...)`'s behaviour with a cheaper mask on CPU.

    `nn.Dropout` draws each element's mask from `jax.random.bernoulli`: one threefry2x32 evaluation (64 random
    bits) per element. On CPU those random numbers cost about as much as ViT-B/16's matmuls in a training step,
    so there this module draws one threefry seed per mask and hashes a counter with it (lowbias32: 32 bits per
    two elements, 16 bits each, the rate exact to 1/65536): 2x cheaper than one threefry evaluation per four
    elements, which itself was 9x cheaper than `bernoulli`.
    Elsewhere (TPU/GPU, where random bits are cheap and this flat draw would not shard with the batch), and
    with a non-threefry key, it draws like `nn.Dropout`. Keys come from the "dropout" rng collection.
    A rate outside [0, 1] is a ValueError (also in evaluation, where it is unused).
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        check_rate("rate", self.rate)
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        mask = _keep_mask(self.make_rng("dropout"), self.rate, x.shape)
        return jnp.where(mask, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------------------------------
# Softmax.


def _reduce(x: Array, axis: int, kind: str, variadic: bool) -> Array:
    """The max or sum ("max" / "sum") of `x` over `axis`, kept as a size-1 axis.

    `variadic`: as one reduce of (x, x), its two equal results combined (the max of both, half their sum: exact).
    Both are used because XLA drops a variadic reduce's unused operand, which would make it a plain reduce again.
    """
    if not variadic:
        return (jnp.max if kind == "max" else jnp.sum)(x, axis=axis, keepdims=True)
    op, init = (jnp.maximum, -np.inf) if kind == "max" else (jnp.add, 0.0)
    init = np.asarray(init, x.dtype)
    a, b = jax.lax.reduce((x, x), (init, init), lambda u, v: (op(u[0], v[0]), op(u[1], v[1])), (axis,))
    out = jnp.maximum(a, b) if kind == "max" else (a + b) * np.asarray(0.5, x.dtype)
    return jnp.expand_dims(out, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _softmax(x: Array, axis: int, variadic: bool) -> Array:
    e = jnp.exp(x - _reduce(x, axis, "max", variadic))
    return e / _reduce(e, axis, "sum", variadic)


def _softmax_fwd(x: Array, axis: int, variadic: bool) -> tuple[Array, Array]:
    p = _softmax(x, axis, variadic)
    return p, p  # the probabilities are all the gradient needs


def _softmax_bwd(axis: int, variadic: bool, p: Array, g: Array) -> tuple[Array]:
    return (p * (g - _reduce(g * p, axis, "sum", variadic)),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(x: Array, axis: int = -1, apart: bool = False) -> Array:
    """`jax.nn.softmax(x, axis)`; on CPU its gradient keeps only the probabilities, and `apart` keeps it apart.

    On CPU the backward pass is p * (g - sum(g * p)) from the saved probabilities: autodiff of `jax.nn.softmax`
    also keeps a second array of their size (ViT-B/16 float32 training step, batch 8: 1892 -> 1550 MiB of peak
    temporaries, same speed). `apart=True` makes its max and sums variadic reduces: XLA:CPU's library fusion of
    reductions (see `vit_jax.xla_options`) would join single-operand reduces with attention's two matmuls into one
    YNNPACK subgraph, in a float32 forward pass 5x slower than the parts (ViT-B/16 float32 inference 10.4 -> 8.8
    img/s); variadic reduces it leaves to XLA's own loops. Elsewhere `jax.nn.softmax`.
    """
    axis = axis % x.ndim
    return jax.lax.platform_dependent(x, cpu=lambda x: _softmax(x, axis, apart),
                                      default=lambda x: jax.nn.softmax(x, axis=axis))


# ----------------------------------------------------------------------------------------------------------------
# Sums over rows: bias gradients.


def sum_leading(g: Array, ndim: int) -> Array:
    """`g` summed over all but its last `ndim` axes, in `g`'s dtype.

    On CPU a (1, rows) x (rows, n) matmul with ones, accumulating in float32: XLA:CPU sums a bf16 array over a
    leading (strided) axis 5-15x slower than that matmul (the bias gradients of a ViT-B/16 bf16 training step took
    ~0.3 s of 2.3 s; the matmul version makes the step 7% faster). Elsewhere the sum autodiff of a broadcast gives.
    """
    lead = g.ndim - ndim
    trailing = g.shape[lead:]
    rows = int(np.prod(g.shape[:lead], dtype=np.int64))
    if lead == 0:
        return g

    def by_matmul(g: Array) -> Array:
        ones = jnp.ones((1, rows), g.dtype)
        total = jax.lax.dot(ones, g.reshape(rows, -1), preferred_element_type=jnp.float32)
        return total.astype(g.dtype).reshape(trailing)

    return jax.lax.platform_dependent(g, cpu=by_matmul, default=lambda g: jnp.sum(g, axis=tuple(range(lead))))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _broadcast_leading(x: Array, shape: tuple[int, ...], ndim: int) -> Array:
    return jnp.broadcast_to(x, shape)


def _broadcast_leading_fwd(x: Array, shape: tuple[int, ...], ndim: int) -> tuple[Array, None]:
    return jnp.broadcast_to(x, shape), None


def _broadcast_leading_bwd(shape: tuple[int, ...], ndim: int, _: None, g: Array) -> tuple[Array]:
    return (sum_leading(g, ndim),)


_broadcast_leading.defvjp(_broadcast_leading_fwd, _broadcast_leading_bwd)


def broadcast_leading(x: Array, shape: tuple[int, ...]) -> Array:
    """`jnp.broadcast_to(x, shape)` where `x.shape` is the tail of `shape`; in bf16/f16 its gradient is `sum_leading`.

    In float32 it is the plain broadcast: XLA:CPU fuses that gradient's sum into the elementwise backward ops around
    it, and forcing it into a matmul made the float32 step 10% slower.
    """
    shape = tuple(shape)
    if tuple(x.shape) != shape[len(shape) - x.ndim:]:
        raise ValueError(f"broadcast_leading: shape {x.shape} is not the tail of {shape}")
    if x.dtype not in LOW_PRECISION:
        return jnp.broadcast_to(x, shape)  # float32: XLA fuses the plain sum into the backward; faster than a matmul
    return _broadcast_leading(x, shape, x.ndim)


# ----------------------------------------------------------------------------------------------------------------
# Layers.


def _flat_init(init: Any, n_in: int) -> Any:
    """`init` evaluated on the (prod(in), prod(out)) matrix and reshaped: `nn.DenseGeneral`'s kernel/bias init."""

    def wrapped(rng: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Any:
        flat = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:]))) if n_in else (int(np.prod(shape)),)
        value = init(rng, flat, dtype)
        if isinstance(value, meta.AxisMetadata):
            return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)

    return wrapped


class Dense(nn.Module):
    """`nn.Dense` (int `features`) / `nn.DenseGeneral` (tuple `features`, `axis`): same params, init and result.

    Contracts the trailing `axis` of the input (-1, or e.g. (-2, -1)) through `dot_general` (float32 accumulation
    in bf16) and adds the bias with `broadcast_leading` (its gradient a matmul on CPU), then applies the optional
    elementwise `activation`. On CPU with a bf16/f16 dtype the bias and activation are computed in float32 on the
    float32 accumulator and rounded once: XLA:CPU computes each bf16 elementwise op in float32 and rounds it, so
    a bf16 GELU cost more (1576 x 3072 with its matmul: 14.4 vs 10.2 ms alone; the ViT-B/16 bf16 training step
    ~3% faster, inference unchanged) and erred more (0.024 vs 0.016 max abs against float32).
    """

    features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros
    activation: Callable[[Array], Array] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = sorted({a % x.ndim for a in ((self.axis,) if isinstance(self.axis, int) else self.axis)})
        if axis != list(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"Dense contracts trailing axes only, got axis={self.axis} for input shape {x.shape}")
        in_shape = x.shape[x.ndim - len(axis):]
        # Initialised as the (inputs, outputs) matrix, then reshaped, as nn.DenseGeneral does (sets the fans).
        kernel = self.param("kernel", _flat_init(self.kernel_init, len(axis)), in_shape + features, jnp.float32)
        bias = self.param("bias", _flat_init(self.bias_init, 0), features, jnp.float32)
        x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
        dims = ((tuple(axis), tuple(range(len(axis)))), ((), ()))
        activation = self.activation or (lambda y: y)

        def flat_matmul(x: Array, kernel: Array, keep_f32: bool = False) -> Array:
            # The kernel as one (prod(in), prod(features)) matrix, the input's contracted axes as one (reshapes,
            # free on CPU). Left to XLA, a multi-axis kernel (attention's (768, 12, 64) / (12, 64, 768)) is
            # transposed into a copy for the forward or backward matmul on every step: 48 copies of 768 x 768 per
            # ViT-B/16 step. In float32 the leading axes become one too: the weight gradient then reads the
            # activation transposed in place, where XLA otherwise wrote a transposed copy of it (60 per step;
            # +5% on the float32 step). In bf16 they stay: flattened, a bf16 weight gradient's transpose folds
            # into a dot XLA:CPU runs on a kernel without bf16 x bf16 -> f32.
            lead = x.shape[:x.ndim - len(axis)]
            n_in = int(np.prod(in_shape, dtype=np.int64))
            rows = lead if jnp.dtype(x.dtype) in LOW_PRECISION else (-1,)
            y = dot_general(x.reshape(rows + (n_in,)), kernel.reshape(n_in, -1), (((len(rows),), (0,)), ((), ())),
                            keep_f32=keep_f32)
            return y.reshape(lead + features)

        def plain(x: Array, kernel: Array, bias: Array, flat: bool = False) -> Array:
            y = flat_matmul(x, kernel) if flat else dot_general(x, kernel, dims)
            return activation(y + broadcast_leading(bias, y.shape))

        def in_float32(x: Array, kernel: Array, bias: Array) -> Array:
            y = flat_matmul(x, kernel, keep_f32=True)
            return activation(y + broadcast_leading(bias, y.shape).astype(y.dtype)).astype(self.dtype)

        on_cpu = in_float32 if self.activation is not None and jnp.dtype(self.dtype) in LOW_PRECISION else (
            functools.partial(plain, flat=True))
        # Chosen when lowering for a platform (a TPU step compiled on a CPU host keeps DenseGeneral's dot and the
        # bf16 elementwise ops).
        return jax.lax.platform_dependent(x, kernel, bias, cpu=on_cpu, default=plain)
