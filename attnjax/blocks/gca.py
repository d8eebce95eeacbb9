"""Global context with a sigmoid gate: GC's softmax-pooled context, transformed, gating every channel.

Paper: Yue Cao, Jiarui Xu, Stephen Lin, Fangyun Wei and Han Hu (2019),
"GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond", ICCV Workshops. The paper's
GC block fuses by addition (attnjax's ``gc``); its ablation of the fusion step also evaluates fusion
by scaling (multiplication), which this block implements.

What it computes, for NHWC ``x`` with C channels and r = 16::

    a = softmax over the H*W positions of (x W_k)             context modelling: 1x1 conv C -> 1, (N, H, W, 1)
    c = sum_{h,w} a[n, h, w] * x[n, h, w, :]                  (N, 1, 1, C)
    t = conv1x1(relu(LayerNorm(conv1x1(c))))                  transform: C -> C/r -> C, as in ``gc``
    g = sigmoid(t)                                            (N, 1, 1, C)
    y = x * g                                                 fusion by scaling, broadcast over positions

Context modelling and the transform are :class:`attnjax.blocks.gc.GlobalContext`'s own (the block is its
subclass with another fusion step), with the same parameter names (``context``, ``reduce``, ``norm``,
``expand``).

Sown maps: ``intermediates/attention``, the softmax weights ``a`` of shape (N, H, W, 1), positive and
summing to 1 over the positions of each image; ``intermediates/channel``, the gate ``g`` of shape
(N, 1, 1, C), in (0, 1).

Naming, against timm: in timm's ``create_attn``, ``'gc'`` is ``GlobalContext`` with its defaults,
which fuse by *scaling* (sigmoid gate, this block), and ``'gca'`` is
``GlobalContext(fuse_add=True, fuse_scale=False)``, the *additive* block. attnjax names them the
other way round: ``gc`` is the paper's additive GC block and ``gca`` ("global context attention",
as this project defines it) is the sigmoid-gated one. A timm ``'gc'`` model corresponds to attnjax's
``gca``, and timm's ``'gca'`` to attnjax's ``gc``.

Choices and deviations:

- The paper gives the scaling fusion only as an ablation, without its formula; the sigmoid that turns
  the transform into a gate is what the official code (``channel_mul``) and timm (``fuse_scale``) use,
  and what this project's definition of ``gca`` specifies.
- The last 1x1 conv keeps Flax's default initialisation (``zero_init_last=False``), as timm's scale
  branch keeps PyTorch's default. The official code zero-initialises it for both fusions; with a
  sigmoid gate that does not give the identity but ``g = 0.5``, ``y = x / 2`` at initialisation
  (``zero_init_last=True`` reproduces it). The block is therefore not the identity at initialisation.
- The context conv W_k has no bias, as in the paper's formula (the official code and timm have one;
  it cancels in the softmax).
- LayerNorm: epsilon 1e-5 (PyTorch's default, used by the official code; timm's ``LayerNorm2d`` uses
  1e-6) and the two-pass variance (:func:`attnjax.layers.layer_norm`), robust in float32.
- Bottleneck width ``reduced_channels(C, r) = max(C // r, min(C, 8))`` with the paper's r = 16 (timm's
  ``GlobalContext`` defaults to C/8: 16 against 32 at C = 256), equal to the paper's C/r for C >= 128; the
  floor keeps small C working.

timm's options: ``gc``'s (``rd_ratio``, ``rd_channels``, ``rd_divisor``, ``act_layer``, ``norm_eps``,
``use_attn``; see :mod:`attnjax.blocks.gc`), and ``gate_layer``, the gate by timm's name: ``sigmoid`` (the
default) or ``hard_sigmoid`` (relu6(t + 3) / 6). ``GlobalContextGate(rd_ratio=1/8, norm_eps=1e-6)`` has the
parameters of timm's ``create_attn('gc')`` (``context`` = ``conv_attn``, ``reduce``/``norm``/``expand`` =
``mlp_scale.fc1``/``norm``/``fc2``) and its output; timm's ``conv_attn.bias`` is left out (it cancels in the
softmax).
"""

from __future__ import annotations

import jax

from attnjax.blocks.gc import GlobalContext
from attnjax.blocks.primitives import gate_function, sow_map


class GlobalContextGate(GlobalContext):
    """GC with scaling fusion: softmax attention pooling, GC's bottleneck transform, sigmoid gate, multiply.

    NHWC in, same shape out; C is read from the input. Sows the (N, H, W, 1) softmax weights as
    ``intermediates/attention`` and the (N, 1, 1, C) gate as ``intermediates/channel``. GC's layers
    and options, with ``zero_init_last=False`` by default; only the fusion differs.
    """

    zero_init_last: bool = False
    gate_layer: str = "sigmoid"  # or "hard_sigmoid", timm's names

    def fuse(self, x: jax.Array, t: jax.Array) -> jax.Array:
        """Fusion by scaling: ``g = sigmoid(t)`` (or ``gate_layer``), ``y = x * g``; sows ``g`` as
        ``intermediates/channel``."""
        gate = gate_function(self.gate_layer)(t)
        sow_map(self, "channel", gate)
        return x * gate
