"""The precision rule every block follows, written once.

- Attention logits are turned into weights by a softmax computed in (at least) float32:
  :func:`softmax_in_float32`. In bfloat16 a softmax's rows sum to 1 only within about 5e-3;
  in float32 within about 1e-7. Blocks then cast the weights to the compute dtype for the
  product with the values, as fused attention kernels do, so the step's cost is that dtype's.
- Every sown map is stored in (at least) float32: :func:`sow_map`. A map is a diagnostic read by
  ``viz`` and by users; storing it in float32 costs nothing in training, where the
  ``intermediates`` collection is not collected and the cast is dead code under ``jit``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` in float32, or unchanged if its dtype is already at least as wide (float64 stays float64)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def softmax_in_float32(logits: jax.Array, axis=-1) -> jax.Array:
    """Softmax over ``axis`` (an int or a tuple), computed in at least float32 and returned in it."""
    return jax.nn.softmax(at_least_float32(logits), axis=axis)


def sow_map(module: nn.Module, name: str, value: jax.Array) -> None:
    """Sow an attention map under ``intermediates/name``, in at least float32."""
    module.sow("intermediates", name, at_least_float32(value))
