"""Global context block: one softmax-pooled context vector, transformed and added at every position.

Paper: Yue Cao, Jiarui Xu, Stephen Lin, Fangyun Wei and Han Hu (2019),
"GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCV Workshops.

What it computes, for NHWC ``x`` with C channels and r = 16::

    a = softmax over the H*W positions of (x W_k)             context modelling: 1x1 conv C -> 1, (N, H, W, 1)
    c = sum_{h,w} a[n, h, w] * x[n, h, w, :]                  (N, 1, 1, C)
    t = conv1x1(relu(LayerNorm(conv1x1(c))))                  transform: C -> C/r -> C
    y = x + t                                                 fusion by addition, broadcast over positions

Sown map: ``intermediates/attention``, the softmax weights ``a`` of shape (N, H, W, 1); they are
positive and sum to 1 over the positions of each image.

Choices and deviations:

- The last 1x1 conv of the transform is zero-initialised (``zero_init_last=True``), as in the official
  code, so that the block starts as the identity ``y = x``: it can be inserted into a trained network
  without changing its function, and it learns how much context to add. The paper does not state the
  initialisation.
- The context conv W_k has no bias, as in the paper's formula. The official code has one, but a
  constant added to every position's logit cancels in the softmax, so it changes nothing.
- LayerNorm uses epsilon 1e-5 (PyTorch's default, which the official code uses) instead of Flax's 1e-6,
  and the two-pass variance (:func:`attnjax.layers.layer_norm`): Flax's default one-pass variance
  E[t^2] - E[t]^2 cancels in float32 when the normalised vector's mean dwarfs its spread.
- Bottleneck width ``reduced_channels(C, r) = max(C // r, min(C, 8))``, equal to the paper's C/r for
  C >= 128; the floor keeps small C working.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from attnjax.blocks.primitives import attention_pool, reduced_channels
from attnjax.layers import layer_norm
from attnjax.validate import check_nhwc


def context_transform(
    context: jax.Array, channels: int, hidden: int, *, zero_init_last: bool, dtype: Any = None
) -> jax.Array:
    """The GC transform ``t = conv1x1(relu(LayerNorm(conv1x1(c))))``, C -> ``hidden`` -> ``channels``.

    Builds its layers ``reduce``, ``norm`` and ``expand`` in the calling module: call it inside a
    compact method. ``zero_init_last`` zero-initialises ``expand``'s kernel (its bias starts at 0
    either way); otherwise it gets Flax's default kernel initialiser.
    """
    t = nn.Conv(hidden, (1, 1), dtype=dtype, name="reduce")(context)
    t = nn.relu(layer_norm(dtype=dtype, name="norm")(t))
    last_init = nn.initializers.zeros if zero_init_last else nn.linear.default_kernel_init
    return nn.Conv(channels, (1, 1), kernel_init=last_init, dtype=dtype, name="expand")(t)


class GlobalContext(nn.Module):
    """GC block: softmax attention pooling to one context vector, bottleneck transform with LayerNorm, add.

    NHWC in, same shape out; C is read from the input. Sows the (N, H, W, 1) softmax weights as
    ``intermediates/attention``. The fusion step is the method :meth:`fuse`
    (:class:`attnjax.blocks.gca.GlobalContextGate` replaces it).
    """

    reduction: int = 16
    zero_init_last: bool = True
    dtype: Any = None

    def fuse(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """Fusion by addition: ``y = x + t``, the transform broadcast over the positions."""
        return x + t

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # LayerNorm, no batch statistics
        check_nhwc(x, type(self).__name__)
        channels = x.shape[-1]
        hidden = reduced_channels(channels, self.reduction)

        logits = nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, name="context")(x)
        context, weights = attention_pool(x, logits)
        t = context_transform(context, channels, hidden, zero_init_last=self.zero_init_last, dtype=self.dtype)

        self.sow("intermediates", "attention", weights)
        return self.fuse(x, t)
