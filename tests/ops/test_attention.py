"""ops.attention: einsum equals fused (outputs, gradients, the mhsa block), in low precision too."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from torch_reference import random_variables

from attnjax import ops
from attnjax.blocks import MultiHeadSelfAttention
from attnjax.ops.attention import dot_product_attention, einsum_attention

pytestmark = pytest.mark.torch  # through torch_reference (its random inputs), which imports PyTorch

TOL = 1e-5
# (N, P, heads, d): one position, odd P, several heads, d = 1.
SHAPES = [(2, 1, 2, 4), (2, 7, 3, 5), (1, 16, 4, 8), (3, 5, 2, 1)]


def random_qkv(shape, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, dtype) for key in keys)


def loss(attention, q, k, v):
    """A scalar that weights every output differently, so that the gradients test every entry."""
    o = attention(q, k, v)
    return jnp.sum(jnp.sin(o.astype(jnp.float32) * jnp.arange(1, o.shape[-1] + 1)))


def value_and_grads(choice, *args):
    """Output and d loss / d(q, k, v) of ``dot_product_attention``, traced with ``attention=choice``.

    Fresh lambdas each time: JAX caches a trace by the function object, across ``jax.jit``
    wrappers, so jitting ``dot_product_attention`` itself again would reuse the first formulation.
    """
    with ops.use_formulations(attention=choice):
        output = jax.jit(lambda q, k, v: dot_product_attention(q, k, v))(*args)
        grads = jax.jit(jax.grad(lambda q, k, v: loss(dot_product_attention, q, k, v), argnums=(0, 1, 2)))(*args)
    return output, grads


def test_the_table_picks_einsum_on_cpu_and_the_override_traces_fused():
    assert ops.formulation("attention", "cpu") == "einsum"
    assert ops.formulation("attention", "gpu") == "fused"
    q, k, v = random_qkv((1, 3, 1, 2))
    with ops.use_formulations(attention="fused"):
        fused = str(jax.make_jaxpr(lambda *a: dot_product_attention(*a))(q, k, v))
    einsum = str(jax.make_jaxpr(lambda *a: dot_product_attention(*a))(q, k, v))
    assert "custom_vjp_call" in einsum and "custom_vjp_call" not in fused


@pytest.mark.parametrize("shape", SHAPES)
def test_einsum_matches_fused_in_outputs_and_gradients(shape):
    args = random_qkv(shape, seed=sum(shape))
    fused, fused_grads = value_and_grads("fused", *args)
    einsum, einsum_grads = value_and_grads("einsum", *args)
    np.testing.assert_allclose(einsum, fused, rtol=TOL, atol=TOL)
    for name, got, expected in zip("qkv", einsum_grads, fused_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL, err_msg=f"d/d{name}")


@pytest.mark.parametrize("shape, order", [((2, 7, 3, 5), 1), ((1, 4, 2, 1), 1), ((1, 3, 2, 2), 2)])
def test_custom_vjp_passes_check_grads(shape, order):
    """Reverse mode only (reverse-over-reverse at order 2): a custom VJP has no JVP, so jax.jvp raises."""
    args = random_qkv(shape, seed=3)
    check_grads(jax.jit(einsum_attention), args, order=order, modes=["rev"], atol=1e-2, rtol=1e-2)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(einsum_attention, args, args)


def test_rows_with_huge_logits_stay_finite():
    """The row max is subtracted before exp: logits of +-1e4 neither overflow nor give 0/0."""
    q, k, v = random_qkv((1, 6, 2, 4), seed=5)
    q = q * 1e3
    fused, fused_grads = value_and_grads("fused", q, k, v)
    einsum, einsum_grads = value_and_grads("einsum", q, k, v)
    assert np.isfinite(einsum).all() and all(np.isfinite(g).all() for g in einsum_grads)
    np.testing.assert_allclose(einsum, fused, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(einsum_grads[2], fused_grads[2], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_runs_and_is_close_to_float32(dtype):
    q, k, v = random_qkv((2, 9, 2, 8), seed=6)
    low = tuple(t.astype(dtype) for t in (q, k, v))
    exact, exact_grads = value_and_grads("einsum", q, k, v)
    output, grads = value_and_grads("einsum", *low)
    assert output.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = 0.05 if dtype == jnp.bfloat16 else 0.01
    np.testing.assert_allclose(np.float32(output), exact, rtol=tol, atol=tol)
    if dtype == jnp.bfloat16:  # fused float16 fails to compile on CPU (F16_F16_F32 dot precision unsupported)
        fused, _ = value_and_grads("fused", *low)
        np.testing.assert_allclose(np.float32(output), np.float32(fused), rtol=tol, atol=tol)
    for got, expected in zip(grads, exact_grads, strict=True):
        np.testing.assert_allclose(np.float32(got), expected, rtol=4 * tol, atol=4 * tol)


def test_vmap_and_pmap(devices):
    q, k, v = random_qkv((2, 3, 5, 2, 4), seed=7)  # an extra leading axis of 2
    expected = jnp.stack([einsum_attention(q[i], k[i], v[i]) for i in range(2)])
    np.testing.assert_allclose(jax.vmap(einsum_attention)(q, k, v), expected, rtol=TOL, atol=TOL)
    grad = jax.grad(functools.partial(loss, einsum_attention), argnums=(0, 1, 2))
    vmapped = jax.vmap(grad)(q, k, v)
    for i in range(2):
        for got, one in zip(vmapped, grad(q[i], k[i], v[i]), strict=True):
            np.testing.assert_allclose(got[i], one, rtol=TOL, atol=TOL)
    pmapped = jax.pmap(einsum_attention, devices=devices[:2])(q, k, v)
    np.testing.assert_allclose(pmapped, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("shape, num_heads", [((2, 5, 3, 12), 4), ((1, 4, 4, 8), 1)])
def test_mhsa_block_is_the_same_under_both_formulations(shape, num_heads):
    block = MultiHeadSelfAttention(num_heads)
    x = jax.random.normal(jax.random.key(8), shape)
    variables = random_variables(block, x)

    results = {}
    for choice in ("fused", "einsum"):
        with ops.use_formulations(attention=choice):  # fresh functions: see value_and_grads
            y = jax.jit(lambda variables, x: block.apply(variables, x))(variables, x)
            grads = jax.jit(jax.grad(lambda variables, x: jnp.sum(jnp.sin(block.apply(variables, x))), argnums=(0, 1)))(
                variables, x
            )
        results[choice] = (y, grads)
    np.testing.assert_allclose(results["einsum"][0], results["fused"][0], rtol=TOL, atol=TOL)
    flat_einsum = jax.tree.flatten_with_path(results["einsum"][1])[0]
    flat_fused = jax.tree.leaves(results["fused"][1])
    assert len(flat_einsum) == len(flat_fused) == 9  # 4 kernels, 4 biases, x
    for (path, got), expected in zip(flat_einsum, flat_fused, strict=True):
        np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL, err_msg=jax.tree_util.keystr(path))


def test_a_function_traced_before_the_override_is_traced_again_under_it():
    q = jnp.ones((1, 3, 1, 2))
    f = jax.jit(lambda q: dot_product_attention(q, q, q))
    default = str(jax.make_jaxpr(f)(q))  # CPU: the einsum formulation, a custom VJP
    with ops.use_formulations(attention="fused"):
        forced = str(jax.make_jaxpr(f)(q))
    after = str(jax.make_jaxpr(f)(q))
    assert "custom_vjp" in default and "custom_vjp" not in forced and after == default
