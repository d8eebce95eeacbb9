"""The pure steps: the train state, the loss, one optimizer step and one evaluation batch.

``train_step`` and ``eval_step`` are pure functions of ``(state, batch)``. They reduce over
devices only when given an ``axis_name``; :mod:`attnjax.train.parallel` applies ``pmap`` or
``jit`` outside them, so the same step runs on one device or many.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from attnjax.train import optim, precision
from attnjax.validate import InputError


class TrainState(train_state.TrainState):
    """Flax's TrainState (params, optimizer state, step, ``apply_fn``) plus batch-norm statistics.

    ``batch_stats`` is ``{}`` for models without batch norm.
    """

    batch_stats: Any = flax.struct.field(default_factory=dict)
    loss_scale: precision.DynamicLossScale | None = None  # float16 training only

    def variables(self, params=None) -> dict:
        """The ``variables`` argument of ``apply_fn``, with ``params`` in place of the state's if given."""
        return {"params": self.params if params is None else params, "batch_stats": self.batch_stats}


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    image_shape: tuple[int, ...],
    learning_rate: optim.LearningRate,
    loss_scaling: bool = False,
    tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """Initialise parameters for images of ``image_shape`` (H, W, C) and the optimizer ``tx``.

    ``tx`` defaults to Adam at ``learning_rate`` (a float or a schedule); a given ``tx`` carries
    its own learning rate and ``learning_rate`` is then unused. ``loss_scaling`` adds a dynamic
    loss scale, for float16 compute.
    """
    variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx if tx is not None else optim.optimizer("adam", learning_rate),
        loss_scale=precision.DynamicLossScale.create() if loss_scaling else None,
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


DROPOUT_RNG = "dropout"  # the PRNG stream a model's stochastic layers draw from in training (Flax's usual name)


def step_key(seed: int, step: jax.Array, axis_name: str | None = None) -> jax.Array:
    """The ``'dropout'`` key of optimizer step ``step``: a function of the run's seed and the step alone (so a
    resumed run draws what the uninterrupted one would), and of the device's index along ``axis_name``."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return key if axis_name is None else jax.random.fold_in(key, jax.lax.axis_index(axis_name))


def train_step(
    state: TrainState, batch: dict, axis_name: str | None = None, *, dtype=None, microbatches: int = 1, seed: int = 0
) -> tuple[TrainState, dict]:
    """One optimizer step on ``batch``; with ``axis_name``, gradients and metrics are averaged over it.

    ``metrics`` holds the batch's ``loss`` and ``accuracy`` and ``finite``: False when the loss
    or a gradient is not finite (float16: when the loss is not; overflowing gradients there
    only skip the update).

    ``dtype`` is the compute dtype (``None``: the parameters' own; parameters and optimizer
    state keep theirs, see :mod:`attnjax.precision`). With ``microbatches`` = N the batch is processed as N equal
    microbatches whose gradients are averaged before the one update: the same step as on the
    whole batch, with a Nth of the activation memory (batch-norm statistics are then per
    microbatch). Batch-norm statistics need no averaging over ``axis_name``:
    ``layers.batch_norm`` already normalises over the whole axis.

    The model is given a PRNG stream ``'dropout'`` (stochastic depth, dropout: ``drop_path_rate`` in timm's
    ResNets), keyed by ``seed``, the step, the device along ``axis_name`` and the microbatch
    (:func:`step_key`); a model without stochastic layers ignores it.
    """
    scale = 1.0 if state.loss_scale is None else state.loss_scale.scale

    key = step_key(seed, state.step, axis_name)

    def loss_fn(params, batch_stats, micro, key):
        variables = {"params": precision.cast_floats(params, dtype), "batch_stats": batch_stats}
        logits, updates = state.apply_fn(
            variables, micro["image"].astype(dtype), train=True, mutable=["batch_stats"], rngs={DROPOUT_RNG: key}
        )
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # the loss in >= float32
        loss = cross_entropy_loss(logits, micro["label"])
        accuracy = jnp.mean(jnp.argmax(logits, -1) == micro["label"])
        return loss * scale, (loss, accuracy, updates.get("batch_stats", batch_stats))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        (_, (loss, accuracy, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, key)
    else:

        def accumulate(carry, inputs):
            grads_sum, batch_stats = carry
            index, micro = inputs
            (_, (loss, accuracy, batch_stats)), grads = grad_fn(
                state.params, batch_stats, micro, jax.random.fold_in(key, index)
            )
            return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), (loss, accuracy)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, batch_stats), (losses, accuracies) = jax.lax.scan(
            accumulate,
            (zeros, state.batch_stats),
            (jnp.arange(microbatches), split_microbatches(batch, microbatches)),
        )
        grads = jax.tree.map(lambda g: g / microbatches, grads)
        loss, accuracy = losses.mean(), accuracies.mean()

    if state.loss_scale is not None:
        grads = jax.tree.map(lambda g: g / scale, grads)
    metrics = {"loss": loss, "accuracy": accuracy}
    if axis_name is not None:
        # Each device holds an equal share of the global batch, so the mean of the
        # per-device means is the global-batch mean.
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    grads_finite = precision.all_finite(grads)
    if state.loss_scale is None:
        metrics["finite"] = jnp.isfinite(metrics["loss"]) & grads_finite
    else:
        # float16: skip a step whose gradients overflowed (the same decision on every device,
        # as the gradients are already averaged) and adapt the scale. Overflowing gradients
        # are expected there; only a non-finite loss means divergence.
        new_state = precision.select_tree(grads_finite, new_state, state)
        new_state = new_state.replace(loss_scale=state.loss_scale.adjust(grads_finite))
        metrics["loss_scale"] = state.loss_scale.scale
        metrics["finite"] = jnp.isfinite(metrics["loss"])
    # ``finite`` is the NaN guard, computed here so that the loop reads one flag and never the state.
    return new_state, metrics


def split_microbatches(batch: dict, n: int) -> dict:
    """``(B, ...)`` leaves as ``(n, B / n, ...)``; microbatch m holds rows m, m + n, m + 2n, ...

    Interleaved rows keep every microbatch spread over all devices when the batch axis is sharded.
    """
    size = len(batch["label"])
    if size % n:
        raise InputError(f"a batch of {size} does not split into {n} microbatches")
    return jax.tree.map(lambda x: x.reshape(size // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def eval_step(state: TrainState, batch: dict, axis_name: str | None = None, *, dtype=None) -> dict:
    """Sums over the real (``mask`` = 1) examples of ``batch``: loss, correct predictions, count."""
    variables = {"params": precision.cast_floats(state.params, dtype), "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, precision.cast_floats(batch["image"], dtype), train=False)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    mask = batch["mask"]
    sums = {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
        "count": jnp.sum(mask),
    }
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)
