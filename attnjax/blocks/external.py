"""External attention: attention to two small learnable memories shared by all images, with double normalisation.

Paper: Meng-Hao Guo, Zheng-Ning Liu, Tai-Jiang Mu and Shi-Min Hu (2021),
"Beyond Self-attention: External Attention using Two Linear Layers for Visual Tasks", IEEE TPAMI 2022.

The paper's external attention (its Algorithm 1) on features F with one row per position
(F is (N, H*W, C), here kept as NHWC), memories M_k of shape (C, S) and M_v of shape (S, C), S = 64::

    logits = F M_k                                         (N, H, W, S): each position against each memory unit
    A^     = softmax over the H*W positions of logits      per image and memory unit
    A      = A^ / (1e-9 + sum over the S units of A^)      l1 over the memory units ("double normalisation")
    F_out  = A M_v                                         (N, H, W, C)

As a block, wrapped as in the paper's official code (its segmentation head's ``External_attention``)::

    F = conv1x1(x)                                         C -> C, with bias
    y = relu(x + BN(conv1x1(F_out)))                       C -> C, no bias (BN follows)

Sown map: ``intermediates/attention``, A of shape (N, H, W, S): non-negative, and over the S memory
units of each position it sums to 1 (up to the 1e-9 guard, far below float32 resolution; a position
whose softmax weights all underflow to 0 gets all zeros).

The BN is ``attnjax.layers.batch_norm(train)``: batch statistics when ``train`` (synchronised across
devices under pmap), running averages otherwise, so in evaluation an image's output does not depend on
the rest of the batch. Everything else works per image.

Choices and deviations:

- The block is the official code's residual unit around the paper's external attention (1x1 conv in,
  memories, 1x1 conv + BN out, residual add, ReLU). The paper's Algorithm 1 alone maps features to
  ``A M_v``, which would replace x by a mixture of memory rows; the residual keeps x. The pure function
  :func:`external_attention` is exactly Algorithm 1. The final ReLU (official code) makes the output
  non-negative; the block is not the identity at initialisation.
- The softmax runs over the positions and the l1 normalisation over the memory units, in that order, as
  in the paper's double-normalisation equations and the official code. The 1e-9 added to the l1
  denominator is the official code's (the paper has none): a guard against 0/0 where every softmax weight
  of a position underflows.
- Initialisation, where the paper is silent, from the official code: M_v starts as the transpose of M_k
  (``memory_value = memory_key.T`` at init; they are separate parameters afterwards), and the memories
  and both 1x1 kernels are drawn from N(0, 2 / C). Biases start at 0, the BN at scale 1 and shift 0.
- Multi-head external attention (the paper's EAMLP variant for transformers) is not implemented: this is
  the single-head block of its CNN experiments. S (``memory_units``) defaults to the paper's 64 and does
  not depend on C.

Batch-norm running variance: the running averages take in the biased batch variance (Flax's convention);
PyTorch's ``BatchNorm2d`` takes in the unbiased one, n/(n-1) times larger, n being the values per
channel in the batch. Outputs agree with PyTorch, but running variances imported from or exported to
PyTorch differ by up to n/(n-1): ``conv_out_bn`` has n = N*H*W. Convert them with
``attnjax.layers.torch_running_var`` and ``flax_running_var``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from attnjax.blocks.primitives import block_batch_norm, sow_map, spatial_softmax
from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError, check_nhwc

L1_EPSILON = 1e-9  # the official code's guard in the l1 normalisation


def double_normalisation(logits: jax.Array, epsilon: float = L1_EPSILON) -> jax.Array:
    """The paper's double normalisation of (N, H, W, S) ``logits``.

    ``a^ = softmax over (H, W)`` per image and memory unit, then ``a = a^ / (epsilon + sum over S of a^)``
    per position.
    """
    a = spatial_softmax(logits)
    return a / (epsilon + jnp.sum(a, axis=-1, keepdims=True))


def external_attention(
    features: jax.Array, memory_key: jax.Array, memory_value: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The paper's external attention: ``A = double_normalisation(F M_k)``, ``F_out = A M_v``.

    ``features`` is NHWC (N, H, W, C), ``memory_key`` (C, S), ``memory_value`` (S, C). Returns
    ``(F_out, A)``: F_out of the shape of ``features``, A of shape (N, H, W, S).
    """
    logits = features @ memory_key
    attention = double_normalisation(logits)  # float32 (the map); the product in the logits' dtype
    return attention.astype(logits.dtype) @ memory_value, attention


class ExternalAttention(nn.Module):
    """External attention block: y = relu(x + BN(conv1x1(EA(conv1x1(x))))), EA with two (C, S) memories.

    NHWC in, same shape out; C is read from the input. ``train`` selects batch statistics in the batch
    norm; call ``apply(..., mutable=["batch_stats"])`` then to update the running averages. Sows the
    (N, H, W, S) double-normalised attention as ``intermediates/attention``.
    """

    memory_units: int = 64  # S, the number of rows of each memory
    dtype: Any = None
    axis_name: str | None = BATCH_AXIS  # batch-norm synchronisation axis (Flax's), used where bound; set by the host

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_nhwc(x, type(self).__name__)
        if self.memory_units < 1:
            raise InputError(f"memory_units must be >= 1 (the paper uses 64), got {self.memory_units}")
        channels = x.shape[-1]
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")  # N(0, 2/C), as the official code

        features = nn.Conv(channels, (1, 1), kernel_init=init, dtype=self.dtype, name="conv_in")(x)
        memory_key = self.param("memory_key", init, (channels, self.memory_units))
        # Tied at initialisation only, as in the official code: M_v starts as M_k transposed.
        memory_value = self.param("memory_value", lambda _key, _shape: memory_key.T, (self.memory_units, channels))
        features, memory_key, memory_value = promote_dtype(features, memory_key, memory_value, dtype=self.dtype)
        out, attention = external_attention(features, memory_key, memory_value)

        out = nn.Conv(channels, (1, 1), use_bias=False, kernel_init=init, dtype=self.dtype, name="conv_out")(out)
        out = block_batch_norm(self, train, "conv_out_bn")(out)
        sow_map(self, "attention", attention)
        return nn.relu(x + out)
