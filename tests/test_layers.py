"""Tests of vit_jax.models.layers: float32-accumulating bf16 matmuls, dropout, broadcast gradients, Dense."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import xla_options
from vit_jax.models import layers

# ---------------------------------------------------------------------------------------------------------------
# Low-precision numerics: bf16 matmuls accumulate in float32 (layers.einsum / dot_general).

def _bf16_round(x):
    return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)


def _dot_generals(jaxpr):
    """(preferred_element_type, operand dtypes) of every dot_general in `jaxpr` and its sub-jaxprs (pjit, cond
    branches of `platform_dependent`, custom_vjp calls)."""
    from jax.extend import core as jcore

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((eqn.params["preferred_element_type"], tuple(v.aval.dtype for v in eqn.invars)))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jcore.ClosedJaxpr):
                    found += _dot_generals(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    found += _dot_generals(sub)
    return found


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("mk,kn->mn", (64, 2048), (2048, 96)),  # a Dense layer
    ("bhqd,bhkd->bhqk", (2, 3, 70, 512), (2, 3, 70, 512)),  # attention logits (batched, heads first)
    ("bhqk,bhkd->bhqd", (2, 3, 70, 70), (2, 3, 70, 128)),  # attention-weighted values
    ("bqhd,bkhd->bhqk", (2, 70, 3, 512), (2, 70, 3, 512)),  # batched, batch axes apart (einsum transposes)
    ("mk,kn->mn", (8, 2048), (2048, 96)),  # skinny (the head)
])
def test_bf16_einsum_accumulates_in_float32_forward_and_backward(spec, shape_a, shape_b):
    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, shape_a).astype(jnp.bfloat16)
    b = jax.random.normal(kb, shape_b).astype(jnp.bfloat16)
    out, vjp = jax.vjp(lambda x, y: layers.einsum(spec, x, y), a, b)
    g = jax.random.normal(kg, out.shape).astype(jnp.bfloat16)
    grad_a, grad_b = vjp(g)
    assert out.dtype == grad_a.dtype == grad_b.dtype == jnp.bfloat16
    # Structure: XLA:CPU upcasts bf16 dots internally, so the numbers below would also pass for plain jnp.einsum
    # (a bf16 -> bf16 dot_general). Every dot of the forward pass and of both gradients asks for float32 results.
    def forward_and_backward(x, y, g):
        out, vjp = jax.vjp(lambda x, y: layers.einsum(spec, x, y), x, y)
        return out, vjp(g)

    dots = _dot_generals(jax.make_jaxpr(forward_and_backward)(a, b, g).jaxpr)
    assert len(dots) >= 3 and len(dots) % 3 == 0, dots  # out, grad_a, grad_b (x2: skinny CPU/default branches)
    assert all(preferred == jnp.float32 for preferred, _ in dots), dots
    assert sum(operands == (jnp.bfloat16, jnp.bfloat16) for _, operands in dots) == 3, dots  # no mixed-dtype dot
    a64, b64, g64 = _bf16_round(a), _bf16_round(b), _bf16_round(g)
    inputs, result = spec.split("->")
    sa, sb = inputs.split(",")
    expected = {"out": (np.einsum(spec, a64, b64), out), "a": (np.einsum(f"{result},{sb}->{sa}", g64, b64), grad_a),
                "b": (np.einsum(f"{sa},{result}->{sb}", a64, g64), grad_b)}
    for name, (want, got) in expected.items():
        # float32 accumulation then one rounding to bf16: within bf16's half-ulp (2^-9 relative) of the exact
        # float64 sum, plus float32 summation error. bf16 accumulation over K >= 70 terms errs by far more.
        err = np.abs(np.asarray(got, np.float64) - want)
        assert np.all(err <= 2.0**-8 * np.abs(want) + 1e-3 * np.sqrt(shape_a[-1])), (name, float(err.max()))


def test_dot_general_spec_matches_lax_for_dense_general_dims():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 4, 6))
    dims = (((2, 3), (0, 1)), ((), ()))  # DenseGeneral(axis=(-2, -1)), like attention's `out`
    want = jax.lax.dot_general(x, kernel, dims, precision="highest")
    got = layers.dot_general(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), dims)
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=5e-2)
    np.testing.assert_array_equal(layers.dot_general(x, kernel, dims), jax.lax.dot_general(x, kernel, dims))



@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_drops_at_rate_and_rescales_kept(rate):
    x = jnp.full((4, 197, 768), 2.0)
    for key in (jax.random.PRNGKey(0), jax.random.key(1)):  # raw and typed threefry keys
        y = np.asarray(layers.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key}))
        dropped = float(np.mean(y == 0))
        # 605,184 Bernoulli draws: 5 standard deviations is < 0.004
        assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / y.size) + 1e-4, dropped
        np.testing.assert_allclose(y[y != 0], 2.0 / (1 - rate), rtol=1e-6)
        masks = y.reshape(-1) != 0  # neighbouring elements come from one random word: check independence
        assert abs(np.corrcoef(masks[:-1], masks[1:])[0, 1]) < 0.01
    assert layers.Dropout(rate).apply({}, x, deterministic=True) is x
    # masks of two keys are independent: both drop an element with probability rate^2
    a, b = (np.asarray(layers.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(k)}))
            == 0 for k in (2, 3))
    both = float(np.mean(a & b))
    assert abs(both - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / a.size), both
    other = layers.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    assert not np.array_equal(np.asarray(other) == 0, np.asarray(
        layers.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)})) == 0)


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
def test_dropout_rate_outside_zero_one_is_refused(rate):
    """-0.1 failed on a uint16 overflow, 1.5 returned zeros in silence; refused in evaluation too."""
    x = jnp.ones((2, 8))
    for deterministic in (False, True):
        with pytest.raises(ValueError, match=re.escape(f"rate={rate!r} is invalid: expected a rate in [0, 1]")):
            layers.Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": jax.random.key(0)})


def test_dropout_rate_one_drops_everything():
    x = jnp.ones((2, 8))
    y = layers.Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(y, np.zeros((2, 8)))


# ---------------------------------------------------------------------------------------------------------------
# broadcast_leading: the bias gradient as a matmul on CPU (bf16/f16).

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,tail", [((8, 197, 96), (96,)), ((4, 10, 3, 16), (3, 16)), ((5, 7), (7,))])
def test_broadcast_leading_gradient_is_the_sum_over_leading_axes(dtype, shape, tail):
    x = jax.random.normal(jax.random.key(0), tail).astype(dtype)
    g = jax.random.normal(jax.random.key(1), shape).astype(dtype)
    out, vjp = jax.vjp(lambda x: layers.broadcast_leading(x, shape), x)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.broadcast_to(np.asarray(x, np.float32), shape))
    (grad,) = jax.jit(vjp)(g)
    assert grad.dtype == dtype and grad.shape == tail
    want = np.asarray(g, np.float64).reshape(-1, *tail).sum(0)  # float64 reference
    rows = int(np.prod(shape)) // int(np.prod(tail))
    # bf16: one rounding of a float32 sum (half an ulp, 2^-9 relative) plus float32 error; f32: float32 error only
    rel = 2.0**-8 if dtype == jnp.bfloat16 else 1e-6
    err = np.abs(np.asarray(grad, np.float64) - want)
    assert np.all(err <= rel * np.abs(want) + 1e-5 * np.sqrt(rows)), float(err.max())


def test_broadcast_leading_rejects_a_shape_it_is_not_the_tail_of():
    with pytest.raises(ValueError, match=r"\(3,\) is not the tail of \(4, 5\)"):
        layers.broadcast_leading(jnp.zeros(3), (4, 5))


# ---------------------------------------------------------------------------------------------------------------
# Dense: nn.Dense / nn.DenseGeneral's parameters, initialisation and result.

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "general_out", "general_in"])
def test_dense_matches_flax_dense_and_dense_general(kind, dtype):
    x = jax.random.normal(jax.random.key(0), (2, 7, 4, 6) if kind == "general_in" else (2, 7, 24))
    init = nn.initializers.xavier_uniform()
    bias_init = nn.initializers.normal(stddev=0.5)
    if kind == "dense":
        ours, theirs = (layers.Dense(16, dtype=dtype, kernel_init=init, bias_init=bias_init),
                        nn.Dense(16, dtype=dtype, kernel_init=init, bias_init=bias_init))
    elif kind == "general_out":  # attention's query/key/value: (embed) -> (heads, head_dim)
        ours, theirs = (layers.Dense((4, 6), dtype=dtype, kernel_init=init, bias_init=bias_init),
                        nn.DenseGeneral((4, 6), dtype=dtype, kernel_init=init, bias_init=bias_init))
    else:  # attention's out: (heads, head_dim) -> embed
        ours, theirs = (layers.Dense(24, axis=(-2, -1), dtype=dtype, kernel_init=init, bias_init=bias_init),
                        nn.DenseGeneral(24, axis=(-2, -1), dtype=dtype, kernel_init=init, bias_init=bias_init))
    params = ours.init(jax.random.key(1), x)
    want_params = theirs.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, params, want_params)  # same names, shapes and initial values
    loss = lambda module, p: jnp.sum(jnp.sin(module.apply(p, x).astype(jnp.float32)))  # noqa: E731
    got, want = ours.apply(params, x), theirs.apply(params, x)
    assert got.dtype == want.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    grads, want_grads = jax.grad(lambda p: loss(ours, p))(params), jax.grad(lambda p: loss(theirs, p))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5 * tol, atol=5 * tol), grads, want_grads)


def test_dense_rejects_contracting_a_leading_axis():
    with pytest.raises(ValueError, match=r"trailing axes only, got axis=0"):
        layers.Dense(3, axis=0).init(jax.random.key(0), jnp.zeros((4, 5)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_activation_is_applied_after_the_bias_and_rounded_once_in_bf16(dtype):
    x = jax.random.normal(jax.random.key(0), (4, 9, 64))
    gelu = functools.partial(nn.gelu, approximate=True)
    layer = layers.Dense(96, dtype=dtype, bias_init=nn.initializers.normal(1.0), activation=gelu)
    params = layer.init(jax.random.key(1), x)
    got = layer.apply(params, x)
    assert got.dtype == dtype
    # reference: float64 matmul of the bf16-rounded inputs, bias (in the compute dtype), GELU, one rounding
    p = params["params"]
    rnd = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)  # noqa: E731
    pre = rnd(x) @ rnd(p["kernel"]) + rnd(p["bias"])
    want = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    err = np.abs(np.asarray(got, np.float64) - want)
    tol = 2.0**-8 * np.abs(want) + 1e-3 if dtype == jnp.bfloat16 else 1e-5 * (1 + np.abs(want))
    assert np.all(err <= tol), float(err.max())


def _transposed_copies(hlo_text, shapes):
    """Instructions of a compiled module that transpose or copy into a float32 array of one of `shapes`."""
    pattern = re.compile(rf"= f32\[({'|'.join(shapes)})\]\S* (transpose|copy)\(")
    return [line.strip()[:160] for line in hlo_text.splitlines() if pattern.search(line)]


def test_dense_kernels_and_activations_are_not_transposed_on_cpu():
    # attention's projections: (embed) -> (heads, head_dim) and back. Left to XLA, each multi-axis kernel was
    # transposed into a copy on every training step (48 per ViT-B/16 step); on CPU Dense multiplies it as one
    # (prod(in), prod(out)) matrix, which the backward pass's matmuls read in place.
    x = jax.random.normal(jax.random.key(0), (2, 197, 768))  # ViT-B/16's shapes: XLA's choice depends on them
    qkv = layers.Dense((12, 64), kernel_init=nn.initializers.normal(0.05))
    out = layers.Dense(768, axis=(-2, -1), kernel_init=nn.initializers.normal(0.05))
    p_in, p_out = qkv.init(jax.random.key(1), x), out.init(jax.random.key(2), jnp.zeros((2, 197, 12, 64)))
    loss = lambda pi, po, x: jnp.sum(out.apply(po, qkv.apply(pi, x)) ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=xla_options.compiler_options())
    text = grad.lower(p_in, p_out, x).compile().as_text()
    kernel_copies = _transposed_copies(text, ["768,12,64", "12,64,768", "768,768"])
    assert not kernel_copies, kernel_copies
    # nor the (2 x 197 rows, 768) activations for the weight gradients (float32: one matrix of rows)
    activation_copies = _transposed_copies(text, ["768,394", "768,2,197"])
    assert not activation_copies, activation_copies
    # and the gradients are flax's
    ref_in, ref_out = nn.DenseGeneral((12, 64)), nn.DenseGeneral(768, axis=(-2, -1))
    want = jax.grad(lambda pi, po, x: jnp.sum(ref_out.apply(po, ref_in.apply(pi, x)) ** 2), argnums=(0, 1, 2))(
        p_in, p_out, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 grad(p_in, p_out, x), want)


# ---------------------------------------------------------------------------------------------------------------
# softmax: jax.nn.softmax's values and gradient; on CPU, kept apart, its reductions are variadic.

@pytest.mark.parametrize("apart", [False, True])
@pytest.mark.parametrize("shape,axis", [((2, 3, 17, 17), -1), ((5, 7), 0)])
def test_softmax_matches_a_float64_reference_with_its_gradient(shape, axis, apart):
    x = jax.random.normal(jax.random.key(0), shape) * 8.0  # large logits: the max subtraction matters
    g = jax.random.normal(jax.random.key(1), shape)
    got, vjp = jax.vjp(lambda x: layers.softmax(x, axis, apart=apart), x)
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    e = np.exp(x64 - x64.max(axis, keepdims=True))
    p = e / e.sum(axis, keepdims=True)
    want_grad = p * (g64 - (g64 * p).sum(axis, keepdims=True))
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(vjp(g)[0], want_grad, rtol=1e-4, atol=1e-6)
    assert not np.isnan(np.asarray(layers.softmax(jnp.full((3, 4), 1e30), -1, apart=apart))).any()  # no overflow


@pytest.mark.parametrize("apart", [False, True])
def test_softmax_reductions_are_variadic_on_cpu_when_kept_apart(apart):
    # XLA:CPU's library fusion (xla_options' LIBRARY_FUSION_TYPE_REDUCE) joins single-result reduces with the
    # matmuls around them; in a float32 forward pass that fuses attention into one slow subgraph.
    x = jnp.zeros((2, 3, 8, 8))
    text = jax.jit(jax.grad(lambda x: jnp.sum(layers.softmax(x, apart=apart) ** 2))).lower(x).compile().as_text()
    reduces = [line for line in text.splitlines() if " reduce(" in line]
    assert len(reduces) == 3, reduces  # max, sum; sum in the backward
    assert all(("= (f32[" in line) == apart for line in reduces), reduces  # variadic: a tuple of results


def test_softmax_gradient_keeps_less_than_autodiff_of_jax_nn_softmax():
    # attention's shape of use: softmax, then a matmul. Its backward keeps only the probabilities; autodiff of
    # jax.nn.softmax keeps a second array of their size.
    x, w = jnp.zeros((4, 12, 64, 64)), jnp.ones((64, 64))

    def temp_bytes(fn):
        step = jax.jit(jax.grad(lambda x: jnp.sum(fn(x) @ w)))
        return step.lower(x).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(lambda x: layers.softmax(x, -1)) <= temp_bytes(lambda x: jax.nn.softmax(x, -1)) - x.nbytes
