"""Every attnjax block as a Flax NNX module, through Flax's ``nnx.bridge``.

The blocks are written in Flax linen (:mod:`attnjax.blocks`). :class:`Block` wraps one in
``flax.nnx.bridge.ToNNX`` and initialises it eagerly from a dummy NHWC input, so it is built
the NNX way, from the input channel count and an ``nnx.Rngs``, and owns its state::

    import jax.numpy as jnp
    import optax
    from flax import nnx

    import attnjax.nnx


    class Net(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.conv = nnx.Conv(3, 32, (3, 3), rngs=rngs)
            self.attention = attnjax.nnx.Block("cbam", channels=32, rngs=rngs, reduction=8)
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x, train: bool = False):
            x = nnx.relu(self.conv(x))
            x = self.attention(x, train=train)  # NHWC in, same shape out
            return self.head(x.mean(axis=(1, 2)))


    model = Net(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


    @nnx.jit
    def train_step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss


    loss = train_step(model, optimizer, jnp.ones((4, 16, 16, 3)), jnp.zeros(4, dtype=jnp.int32))
    model.attention.intermediates()  # {'channel': (gate,), 'spatial': (gate,)}: the last call's maps

What the wrapper keeps, and where:

- **Parameters** are ``nnx.Param`` variables and **batch-norm running averages** ``nnx.BatchStat``
  variables of the block (``nnx.state(block, nnx.BatchStat)``), at the linen variable paths under
  ``block.linen`` (the ``ToNNX`` module): linen's ``params/bn/scale`` is ``block.linen.bn["scale"]``.
  ``block(x, train=True)`` normalises with the batch statistics and updates the running averages in
  place (under ``nnx.jit``/``nnx.value_and_grad`` too), as ``nnx.BatchNorm`` does; ``train=False``
  uses the running averages and changes nothing. ``axis_name`` is the blocks' own (see
  :func:`attnjax.layers.batch_norm`): the batch statistics are averaged over that mapped axis where
  it is bound.
- **Sown maps**: ``nnx.bridge`` turns the linen ``intermediates`` collection into ``nnx.Intermediate``
  variables of the module, as NNX's own ``Module.sow`` does. Each call first drops the previous
  call's maps (linen's ``sow`` would otherwise append to them), so :meth:`Block.intermediates`
  returns the last call's maps in linen's layout, ``{"attention": (map,)}``, and
  ``nnx.pop(model, nnx.Intermediate)`` takes them out of a whole model, NNX-style.
  ``keep_intermediates=False`` skips them (``mhsa`` then never materialises its attention matrix).
  The maps are part of the module's state, so ``nnx.jit`` traces a step twice: once before the
  first call (no maps yet), once after (with ``keep_intermediates=False``, once).
- **Random numbers**: ``ToNNX`` keeps a fork of ``rngs`` and draws a key per stream at each call
  (``nnx.RngState``); no block uses one at apply.
- **Linen variables**: :meth:`Block.variables` gives ``{"params": ..., "batch_stats": ...}`` for the
  linen block (``block.linen_module.apply(block.variables(), x)``); :meth:`Block.load_variables`
  copies linen variables (a linen checkpoint) in.

``init_size`` is the spatial size of the dummy input used at construction (default 8 x 8). Most
blocks work at any size afterwards; a block whose parameters depend on the spatial size seen at
initialisation must be built with the size it will be called with: ``init_size=(H, W)``.

The bridge runs the linen block's ``apply`` at each call: the same computation, so outputs,
gradients and sown maps equal the linen block's with the same variables.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge

from attnjax import blocks
from attnjax.layers import BATCH_AXIS
from attnjax.validate import InputError

# The linen collection of the sown maps; the bridge stores it as nnx.Intermediate variables.
INTERMEDIATES = "intermediates"


def _linen_block(block: str | nn.Module, dtype: Any, axis_name: str | None, options: dict) -> nn.Module:
    """The linen block: built from the registry by name (options checked), or given as a module."""
    if isinstance(block, nn.Module):
        if options:
            raise InputError(f"options {sorted(options)} are for a block given by name; set them on the module")
        return block
    return blocks.build(blocks.factory(block, **options), name=None, dtype=dtype, axis_name=axis_name)


def _nested(flat: dict[tuple, Any]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested


@nnx.jit
def _initialise(linen: bridge.ToNNX, x: jax.Array) -> None:
    """``lazy_init`` from the dummy input ``x``, compiled once rather than run op by op."""
    bridge.lazy_init(linen, x, train=False)
    nnx.pop(linen, nnx.Intermediate)  # the dummy input's maps


class Block(nnx.Module):
    """An attnjax attention block as an NNX module: ``Block(name, channels, rngs=..., **options)``.

    Args:
      block: a registered block name (``attnjax.blocks.names()``) or a linen block instance.
      channels: the input's channel count C.
      rngs: the ``nnx.Rngs`` that initialise the parameters.
      init_size: (H, W) of the dummy input the block is initialised from.
      init_batch: N of that dummy input.
      dtype: the computation dtype of the block (its ``dtype`` field); parameters stay float32.
      axis_name: the mapped axis batch norm synchronises over where it is bound (blocks with batch norm).
      keep_intermediates: keep the sown maps of each call (:meth:`intermediates`).
      **options: the block's options (``attnjax.blocks.options(name)``), checked.

    Call it as ``block(x, train=False)`` on NHWC ``x`` with ``channels`` channels.
    """

    def __init__(
        self,
        block: str | nn.Module,
        channels: int,
        *,
        rngs: nnx.Rngs,
        init_size: tuple[int, int] = (8, 8),
        init_batch: int = 2,
        dtype: Any = None,
        axis_name: str | None = BATCH_AXIS,
        keep_intermediates: bool = True,
        **options,
    ):
        module = _linen_block(block, dtype, axis_name, options)
        self.keep_intermediates = keep_intermediates
        self.linen = bridge.ToNNX(module, rngs=rngs)
        height, width = init_size
        _initialise(self.linen, jnp.zeros((init_batch, height, width, channels), jnp.float32))

    @property
    def linen_module(self) -> nn.Module:
        """The wrapped linen block (apply it to :meth:`variables` for the same result)."""
        return self.linen.to_nnx__module

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """``x`` (N, H, W, C) -> the same shape; ``train`` uses and updates batch statistics."""
        nnx.pop(self.linen, nnx.Intermediate)  # the previous call's maps: sow would append to them
        mutable = (["batch_stats"] if train else []) + ([INTERMEDIATES] if self.keep_intermediates else [])
        return self.linen(x, train=train, mutable=mutable or False)

    def intermediates(self) -> dict:
        """The maps the last call sowed, as linen's ``intermediates`` collection: ``{"attention": (map,)}``."""
        return nnx.to_pure_dict(nnx.state(self.linen, nnx.Intermediate))

    def variables(self) -> dict:
        """The block's variables as linen's, by collection: ``{"params": ..., "batch_stats": ...}``.

        Sown maps and the random-number state are not variables of the linen block; the arrays are
        the module's own (not copies).
        """
        by_collection: dict[str, dict[tuple, Any]] = {}
        state = nnx.state(self.linen, nnx.Not(nnx.Any(nnx.Intermediate, nnx.RngState)))
        for path, variable in nnx.to_flat_state(state):
            collection = nnx.variable_name_from_type(type(variable))
            by_collection.setdefault(collection, {})[tuple(path)] = variable.get_value()
        return {collection: _nested(flat) for collection, flat in by_collection.items()}

    def load_variables(self, variables: Mapping[str, Any]) -> None:
        """Copy linen ``variables`` (``{"params": ..., "batch_stats": ...}``) into the module.

        They must have this block's structure and shapes (the linen block's ``init`` for the same
        input shape); sown maps in them are ignored.
        """
        current = self.variables()
        given = {k: v for k, v in variables.items() if k != INTERMEDIATES}
        shapes = jax.tree.map(jnp.shape, current)
        if jax.tree.map(jnp.shape, dict(given)) != shapes:
            raise InputError(
                f"the variables do not fit this {type(self.linen_module).__name__}: expected shapes {shapes}, "
                f"got {jax.tree.map(jnp.shape, dict(given))}"
            )
        for tree in given.values():  # NNX paths are the linen paths within each collection
            nnx.update(self.linen, jax.tree.map(jnp.asarray, dict(tree)))


def create(block: str | nn.Module, channels: int, *, rngs: nnx.Rngs, **options) -> Block:
    """``Block(block, channels, rngs=rngs, **options)``: the block registered as ``block``, as an NNX module."""
    return Block(block, channels, rngs=rngs, **options)


def names() -> list[str]:
    """The registered block names (:func:`attnjax.blocks.names`): each one works here."""
    return blocks.names()


__all__ = ["Block", "create", "names"]
