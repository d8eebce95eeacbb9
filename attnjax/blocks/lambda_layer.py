"""Lambda layer: each position's query applied to a linear function (a lambda) of its context.

Paper: Irwan Bello (2021), "LambdaNetworks: Modeling Long-Range Interactions Without Attention", ICLR.

What it computes, for NHWC ``x`` with C channels at the M = H*W positions n (context positions m),
h heads, key depth k (16) and value depth v = C / h::

    q, K, V = W_Q x, W_K x, W_V x                1x1 convs C -> h*k, k, v, no bias
    q = BN(q), split into h heads of depth k     (N, M, h, k)
    V = BN(V)                                    (N, M, v)
    K_bar = softmax of K over the M positions    (N, M, k), for each of the k key channels
    lambda_c = K_bar^T V                         content lambda, (N, k, v), shared by all positions
    lambda_p[n] = sum_m E[m - n]^T V[m]          position lambdas, (N, M, k, v): relative embeddings E
    y[n, head] = q[n, head] (lambda_c + lambda_p[n])     (N, M, h, v), reshaped to C = h*v channels

The relative position embeddings ``E[dy, dx]`` (each a k-vector, for the offset m - n of the context
position from the query's) are one parameter, ``embedding``, a centred table of shape

- ``(r, r, k)`` with ``position_embedding="local"`` (default, r = 9): the paper's "lambda
  convolution", a 3-D conv with kernel (r, r, 1) of the values that gives each position the lambda of
  its r x r neighbourhood (zero padding, any H, W);
- ``(2H-1, 2W-1, k)`` with ``"global"``: every position sees every other; the parameters are made for
  the H, W of initialisation and the block then accepts only that size.

Both are computed by :func:`relative_position_lambdas` as one dot (row-shifted values times a banded
matrix built from the table): the same numbers as the conv, about 9x faster for the train step on
XLA:CPU than a conv with one input channel, for W/r times the conv's multiply-adds.

Sown map: ``intermediates/keys``, the normalised keys ``K_bar`` of shape ``(N, H, W, k)``: for each
image and key channel a softmax over the positions (they sum to 1 over axes (1, 2)). They are the
weights with which the content lambda pools the values, as GC's attention pools its context.

Choices and deviations (timm's ``LambdaLayer`` decides what the paper leaves open):

- Defaults as timm's: 4 heads, key depth ``dim_head = 16`` (timm's ``qk_ratio`` only applies when
  ``dim_head`` is unset, so it is not an option here), r = 9 (timm's; the paper's LambdaResNets use
  a 23 x 23 scope), intra-depth |u| = 1 (timm's; the paper's default multi-query layer), no biases
  on the q, K, V projection (timm's ``qkv_bias=False``). The global table is timm's ``r=None``
  variant (timm marks it as not fully verified; here it is checked against a PyTorch reference
  and against a lambda conv that covers the whole map).
  q, K, V come from three 1x1 convs ``query``, ``key``, ``value``, the paper's W_Q, W_K, W_V (timm
  fuses them into one ``qkv`` conv, whose weight is theirs stacked [h*k, k, v]: the same function);
  separate dots also round a little more evenly across batch sizes on XLA:CPU. Heads are
  channel-major (query channel ``head*k + j``, output channel ``head*v + c``) as in timm.
- Heads that C does not divide (the block must run on any C): with ``num_heads=None`` (the default)
  the number of heads used is the largest divisor of C that is at most ``max_heads`` (4), so v = C /
  heads and the output has exactly C channels: C = 64 -> 4 heads of v = 16; C = 13 or 37 (prime) -> 1
  head of v = C; C = 3 -> 3 heads of v = 1; C = 6 -> 3 heads. An explicit ``num_heads`` must divide C,
  as timm asserts (:func:`attnjax.blocks.primitives.resolve_heads`, the rule of every multi-head block).
- The lambda convolution has no bias (the paper's position lambdas are ``E^T V``, and its code's
  conv3d has none; timm's Conv3d carries PyTorch's default bias). r must be odd, so that the output
  keeps the input's size (timm's ``r // 2`` padding would grow it by one for even r).
- In-place use (out channels C, stride 1): timm's stride-2 average pool is not an option.
- Initialisation (the paper does not give one): the projection has a truncated normal of std
  1/sqrt(fan_in) (Flax's default, lecun normal; timm's too) and the global table a truncated normal
  of std 0.02 (timm's). The local table (the lambda conv kernel) has a truncated normal of std
  1/sqrt(r*r*k), its fan-in, where timm uses 1/sqrt(k): with timm's, each position lambda sums up to
  r*r = 81 taps of std 1/4 and the outputs start about 9 times larger than the inputs; with the
  fan-in they start of order 1. BN uses the shared :func:`attnjax.layers.batch_norm`
  (epsilon 1e-5, two-pass variance).
- The global table is indexed by ``m - n`` (context minus query position, as timm's
  ``rel_pos_indices``), as the lambda conv's kernel is (a cross-correlation), so a lambda conv whose
  window covers the whole map equals the global layer with the table cut from its kernel.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): ``norm_q`` and ``norm_v`` have n = N*H*W. Convert them with
``attnjax.layers.torch_running_var`` and ``flax_running_var``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import block_batch_norm, odd_size, resolve_heads, sow_map, spatial_softmax
from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError, check_nhwc

POSITION_EMBEDDINGS = ("local", "global")


def normalised_keys(keys: jax.Array) -> jax.Array:
    """``K_bar``: softmax over the positions (axes 1, 2) of ``(N, H, W, k)`` keys, per image and key channel."""
    return spatial_softmax(keys)


def content_lambda(keys: jax.Array, values: jax.Array) -> jax.Array:
    """``lambda_c = K_bar^T V``: ``(N, H, W, k)`` normalised keys and ``(N, H, W, v)`` values to ``(N, k, v)``."""
    return jnp.einsum("nyxk,nyxv->nkv", keys, values)


def relative_position_lambdas(embedding: jax.Array, values: jax.Array) -> jax.Array:
    """``lambda_p[n, y, x] = sum_{i,j} E[i - y + rh//2, j - x + rw//2]^T V[n, i, j]``: ``(N, H, W, k, v)``.

    ``embedding``: the ``(rh, rw, k)`` table of relative embeddings ``E`` (odd sizes, centred: offset 0 at
    ``(rh//2, rw//2)``); offsets outside it contribute nothing. With ``(r, r, k)`` this is the lambda
    convolution (a zero-padded r x r conv of each value channel, cross-correlation as in PyTorch); with
    ``(2H-1, 2W-1, k)`` every offset is in the table (the global relative embeddings).

    Computed as one dot: the rh row-shifted copies of the values times a banded ``(rh, W, W, k)`` matrix
    made from the table (``B[a, j, x] = E[a, j - x + rw//2]``), rather than as a conv with one input
    channel, whose train step XLA:CPU runs ~9x slower. The dot does W/rw times the conv's multiply-adds.
    """
    rh, rw, _ = embedding.shape
    _, h, w, _ = values.shape
    padded = jnp.pad(values, ((0, 0), (rh // 2, rh // 2), (0, 0), (0, 0)))
    rows = jnp.stack([padded[:, a : a + h] for a in range(rh)], axis=2)  # (N, H, rh, W, v): V[n, y + a - rh//2, j]
    offset = jnp.arange(w)[:, None] - jnp.arange(w)[None, :] + rw // 2  # (j, x): j - x + rw//2
    inside = (offset >= 0) & (offset < rw)
    banded = jnp.where(inside[None, :, :, None], embedding[:, jnp.clip(offset, 0, rw - 1)], 0)  # (rh, W, W, k)
    return jnp.einsum("nyajv,ajxk->nyxkv", rows, banded)


def apply_lambdas(queries: jax.Array, content: jax.Array, position: jax.Array) -> jax.Array:
    """``y[n, head] = q[n, head] (lambda_c + lambda_p[n])``, heads concatenated: ``(N, H, W, heads * v)``.

    ``queries``: ``(N, H, W, heads, k)``; ``content``: ``(N, k, v)``; ``position``: ``(N, H, W, k, v)``.
    """
    y = jnp.einsum("nyxhk,nkv->nyxhv", queries, content) + jnp.einsum("nyxhk,nyxkv->nyxhv", queries, position)
    return y.reshape(*y.shape[:3], -1)


class LambdaLayer(nn.Module):
    """Lambda layer: queries applied to a content lambda (softmax keys^T values) plus relative position lambdas.

    NHWC in, same shape out; C is read from the input (heads: ``num_heads``, or for ``None`` the largest
    divisor of C up to ``max_heads``). ``train`` selects batch statistics. Sows the normalised keys
    ``(N, H, W, k)`` as ``intermediates/keys``.
    """

    num_heads: int | None = None  # None: the largest divisor of C up to max_heads
    max_heads: int = 4
    dim_head: int = 16  # the query/key depth k
    r: int = 9  # the lambda convolution's local context (odd); used with position_embedding="local"
    position_embedding: str = "local"  # "local": lambda conv of size r; "global": (2H-1, 2W-1, k) relative table
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        who = type(self).__name__
        check_nhwc(x, who)
        if self.dim_head < 1:
            raise InputError(f"{who}: dim_head must be >= 1, got {self.dim_head}")
        if self.position_embedding not in POSITION_EMBEDDINGS:
            raise InputError(
                f"{who}: position_embedding must be one of {', '.join(POSITION_EMBEDDINGS)}, "
                f"got {self.position_embedding!r}"
            )
        if self.position_embedding == "local":
            odd_size(self.r, "r", who, "so that the output keeps the input's size; timm uses 9")
        n, h, w, channels = x.shape
        heads = resolve_heads(channels, self.num_heads, self.max_heads, who)
        k, v = self.dim_head, channels // heads

        def projection(features, name):
            return nn.Conv(features, (1, 1), use_bias=False, dtype=self.dtype, name=name)(x)

        q, keys, values = projection(heads * k, "query"), projection(k, "key"), projection(v, "value")
        q = block_batch_norm(self, train, "norm_q")(q)
        values = block_batch_norm(self, train, "norm_v")(values)
        logits, keys = keys, normalised_keys(keys)  # keys in float32 (the map); the lambdas in the logits' dtype
        content = content_lambda(keys.astype(logits.dtype), values)

        if self.position_embedding == "local":
            table_shape, init = (self.r, self.r, k), nn.initializers.truncated_normal(stddev=(self.r**2 * k) ** -0.5)
        else:
            table_shape, init = (2 * h - 1, 2 * w - 1, k), nn.initializers.truncated_normal(stddev=0.02)
        if self.position_embedding == "global" and self.has_variable("params", "embedding"):
            made = self.get_variable("params", "embedding").shape
            if tuple(made) != table_shape:
                raise InputError(
                    f"{who} with position_embedding='global' has relative embeddings of shape {tuple(made)}, made "
                    f"for {(made[0] + 1) // 2}x{(made[1] + 1) // 2} maps (and key depth {made[2]}); got {h}x{w} maps "
                    f"(key depth {k}). The global table ties the block to one size; use position_embedding='local' "
                    "for any size."
                )
        embedding = self.param("embedding", init, table_shape)
        embedding, values = promote_dtype(embedding, values, dtype=self.dtype)
        position = relative_position_lambdas(embedding, values)

        sow_map(self, "keys", keys)
        return apply_lambdas(q.reshape(n, h, w, heads, k), content, position)
