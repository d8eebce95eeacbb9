"""Multi-head dot-product attention, ``o = softmax(q k^T / sqrt(d)) v`` per head, in two formulations.

``fused``: ``jax.nn.dot_product_attention``, which XLA turns into a fused kernel (cuDNN) on GPU.
On XLA:CPU the same call adds layout copies and several passes over the ``(P, P)`` weights,
forward and backward.

``einsum``: the default on CPU. Batched matmuls in an ``(N, heads, P, d)`` layout (the
transposes fall on the small q, k, v, o, never on the weights), ``1/sqrt(d)`` folded into q,
and a ``jax.custom_vjp`` that keeps the softmax probabilities from the forward pass and runs
the backward pass by hand::

    dV = P^T dO        dP = dO V^T        dS = P * (dP - rowsum(dO * O))        dQ' = dS K    dK = dS^T Q'

(Q' the scaled q; autodiff applies the scale to dQ'.) ``rowsum(dO * O)`` equals
``rowsum(dP * P)`` (as ``O = P V``) but reads the small ``(P, d)`` output instead of the
``(P, P)`` weights, and the two matmuls that contract over the weights' rows (dV, dK) are
written as ``(d, P)`` products and transposed after: in that form XLA:CPU (jaxlib 0.10.2)
runs them in its YNNPACK fusions, in the ``(P, d)`` form as slower plain dots. Measured on the
mhsa block's forward + backward (experiments/bench_attention.py): 1.4x to 2.9x faster than
``fused`` on CPU. The price of the custom VJP: no forward mode (``jax.jvp``, ``jax.jacfwd``,
``jax.hessian`` raise). Reverse mode works, reverse-over-reverse too (the backward pass is
plain jax.numpy), and so do ``jit``, ``vmap`` and ``pmap``.

Precision, as in ``jax.nn.dot_product_attention``: for bfloat16/float16 inputs the logits
and the softmax are float32, the probabilities are cast to the input dtype for ``P V`` and
the output is in the input dtype. The backward pass forms ``dS`` in float32 too. Unlike the
fused path, ``1/sqrt(d)`` is applied to q in the input dtype (exact when d is a power of 4).
(On CPU the fused path does not compile for float16; this one does.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.ops import formulation


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(d)) v`` per head in the formulation :func:`attnjax.ops.formulation` picks.

    ``q``: ``(N, T, heads, d)``; ``k``, ``v``: ``(N, S, heads, d)``; returns ``(N, T, heads, d)``
    in the inputs' dtype. No mask, no bias: every query attends to every key.
    """
    if formulation("attention") == "fused":
        return jax.nn.dot_product_attention(q, k, v)
    return einsum_attention(q, k, v)


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The ``einsum`` formulation of :func:`dot_product_attention` (same arguments), whatever the backend."""
    dtype = jnp.result_type(q, k, v)

    def heads_first(t):  # (N, P, heads, d) -> (N, heads, P, d)
        return t.astype(dtype).transpose(0, 2, 1, 3)

    # The scale on q (N*T*d values) rather than on the logits (N*T*S): one pass fewer over the big tensor.
    q_scaled = heads_first(q) * jnp.asarray(q.shape[-1] ** -0.5, dtype)
    return _attention(q_scaled, heads_first(k), heads_first(v)).transpose(0, 2, 1, 3)


def _probabilities(q_scaled: jax.Array, k: jax.Array) -> jax.Array:
    """Row softmax of ``q_scaled k^T`` in float32, max subtracted; ``(N, heads, T, S)``."""
    logits = jnp.einsum("nhid,nhjd->nhij", q_scaled, k, preferred_element_type=jnp.float32)
    e = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@jax.custom_vjp
def _attention(q_scaled: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q_scaled k^T) v`` on ``(N, heads, P, d)`` inputs of one dtype."""
    return _attention_fwd(q_scaled, k, v)[0]


def _attention_fwd(q_scaled, k, v):
    p = _probabilities(q_scaled, k).astype(v.dtype)
    o = jnp.einsum("nhij,nhjd->nhid", p, v)
    return o, (q_scaled, k, v, p, o)


def _attention_bwd(residuals, do):
    q_scaled, k, v, p, o = residuals
    f32 = jnp.float32
    # (d, P) = (d, T) @ (T, S) products, transposed back on the small side; see the module docstring.
    dv = jnp.einsum("nhid,nhij->nhdj", do, p).transpose(0, 1, 3, 2)
    dp = jnp.einsum("nhid,nhjd->nhij", do, v, preferred_element_type=f32)
    rowsum = (do.astype(f32) * o.astype(f32)).sum(axis=-1, keepdims=True)  # = rowsum(dP * P)
    ds = (p.astype(f32) * (dp - rowsum)).astype(q_scaled.dtype)
    dq = jnp.einsum("nhij,nhjd->nhid", ds, k)
    dk = jnp.einsum("nhid,nhij->nhdj", q_scaled, ds).transpose(0, 1, 3, 2)
    return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)
