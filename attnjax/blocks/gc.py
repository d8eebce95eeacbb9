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
  C >= 128; the floor keeps small C working. timm's block uses C/8 (see below).

Naming and options, against timm 1.0.29 (``timm/layers/global_context.py``): this block is timm's
``create_attn('gca')``, ``GlobalContext(fuse_add=True, fuse_scale=False)``; timm's ``create_attn('gc')`` is
attnjax's ``gca`` (:mod:`attnjax.blocks.gca`), the sigmoid-gated one. The defaults are attnjax's, and
differ from timm's in the width (C/16 floored at 8 against timm's C/8: 16 against 32 at C = 256) and the
LayerNorm epsilon (1e-5 against timm's ``LayerNorm2d``'s 1e-6). timm's options, under timm's names:

- ``rd_ratio``, ``rd_channels``, ``rd_divisor``: timm's width rule instead of ``reduction``'s (giving both is
  an error): ``rd_channels`` if given, else C * ``rd_ratio`` (default timm's 1/8) rounded to the nearest
  multiple of ``rd_divisor`` (default 1), at least one (:func:`attnjax.blocks.primitives.bottleneck_width`);
- ``act_layer``: the transform's activation by timm's name (``relu``, default; ``gelu``, ``silu``, ... :
  :data:`attnjax.blocks.primitives.ACTIVATIONS`);
- ``norm_eps``: the LayerNorm's epsilon (not a timm option: timm's ``LayerNorm2d`` fixes 1e-6);
- ``use_attn=False``: the context is the plain mean over the positions (timm's ``use_attn=False``); the
  sown ``attention`` map is then the uniform weights 1/(H W), whose weighted sum is that mean.

``GlobalContext(rd_ratio=1/8, norm_eps=1e-6)`` has timm's ``'gca'`` parameters (``context`` =
``conv_attn``, ``reduce``/``norm``/``expand`` = ``mlp_add.fc1``/``norm``/``fc2``) and its output, except timm's
``conv_attn.bias``, which is left out because it cancels in the softmax. timm's ``fuse_add=True,
fuse_scale=True`` (both fusions, two transforms) has no attnjax block; its ``init_last_zero`` is unused by
timm (its additive transform's last conv is always zero-initialised, as ``zero_init_last=True`` here).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.blocks.primitives import activation_function, attention_pool, bottleneck_width, global_avg_pool, sow_map
from attnjax.layers import layer_norm
from attnjax.validate import InputError, check_nhwc

TIMM_RD_RATIO = 1 / 8  # timm's GlobalContext default, for both fusions


def context_transform(
    context: jax.Array,
    channels: int,
    hidden: int,
    *,
    zero_init_last: bool,
    dtype: Any = None,
    activation=nn.relu,
    epsilon: float = 1e-5,
) -> jax.Array:
    """The GC transform ``t = conv1x1(relu(LayerNorm(conv1x1(c))))``, C -> ``hidden`` -> ``channels``.

    Builds its layers ``reduce``, ``norm`` and ``expand`` in the calling module: call it inside a
    compact method. ``zero_init_last`` zero-initialises ``expand``'s kernel (its bias starts at 0
    either way); otherwise it gets Flax's default kernel initialiser. ``activation`` replaces the
    ReLU; ``epsilon`` is the LayerNorm's.
    """
    t = nn.Conv(hidden, (1, 1), dtype=dtype, name="reduce")(context)
    t = activation(layer_norm(epsilon=epsilon, dtype=dtype, name="norm")(t))
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
    rd_ratio: float | None = None  # timm's width rule instead of reduction's: C * rd_ratio (timm: 1/8), ...
    rd_channels: int | None = None  # ... or exactly rd_channels ...
    rd_divisor: int | None = None  # ... rounded to a multiple of rd_divisor (timm: 1)
    act_layer: str = "relu"  # the transform's activation, by timm's name
    norm_eps: float = 1e-5  # the LayerNorm's epsilon (PyTorch's; timm's LayerNorm2d: 1e-6)
    use_attn: bool = True  # False: the context is the mean over the positions (timm's use_attn=False)
    dtype: Any = None

    def fuse(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """Fusion by addition: ``y = x + t``, the transform broadcast over the positions."""
        return x + t

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # LayerNorm, no batch statistics
        check_nhwc(x, type(self).__name__)
        n, height, width, channels = x.shape
        hidden = bottleneck_width(
            channels, self.reduction, self.rd_ratio, self.rd_channels, self.rd_divisor, timm_ratio=TIMM_RD_RATIO
        )
        activation = activation_function(self.act_layer)
        if not self.norm_eps >= 0:
            raise InputError(f"norm_eps must be >= 0 (timm's LayerNorm2d uses 1e-6), got {self.norm_eps}")

        if self.use_attn:
            logits = nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, name="context")(x)
            context, weights = attention_pool(x, logits)
        else:
            context = global_avg_pool(x)
            weights = jnp.full((n, height, width, 1), 1 / (height * width), context.dtype)
        t = context_transform(
            context,
            channels,
            hidden,
            zero_init_last=self.zero_init_last,
            dtype=self.dtype,
            activation=activation,
            epsilon=self.norm_eps,
        )

        sow_map(self, "attention", weights)
        return self.fuse(x, t)
