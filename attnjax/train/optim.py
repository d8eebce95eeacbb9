"""Optimizers and learning-rate schedules, composed from optax by name.

Small pure functions, one job each: :func:`schedule` builds the learning rate per step,
:func:`warmup_then` puts a linear warm-up in front of any schedule, :func:`decay_mask` says
which parameters weight decay touches, and :func:`optimizer` chains gradient clipping, decay
and the update rule into one ``optax.GradientTransformation``.

``optimizer("adam", lr)`` with no clipping is exactly ``optax.adam(lr)``, state and all, so
runs and checkpoints from before these options existed continue unchanged.
"""

from __future__ import annotations

import jax
import optax

OPTIMIZERS = ("adam", "adamw", "sgd", "lamb")
SCHEDULES = ("cosine", "constant")
# The optimizers that take --weight-decay. Plain adam refuses it (see train.check_config): decay added to
# the gradient before Adam's rescaling is not the decoupled decay people mean by it; that is adamw.
DECAYING = ("adamw", "sgd", "lamb")

LearningRate = float | optax.Schedule


def decay_mask(params):
    """True for the parameters weight decay shrinks: those with two or more dimensions.

    That is the convolution and dense kernels and embeddings. Biases, batch-norm and
    layer-norm scales and offsets (all one-dimensional) and scalar gains are left alone,
    as in timm and big_vision: decaying them only fights the normalisation. Positional
    embeddings, being two-dimensional, are decayed.
    """
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def warmup_then(schedule_fn: LearningRate, warmup_steps: int, peak: float) -> LearningRate:
    """A linear warm-up from 0 to ``peak`` over ``warmup_steps`` steps, then ``schedule_fn`` from its step 0.

    ``schedule_fn`` (a schedule or a constant) should start at ``peak``. With no warm-up steps
    it is returned unchanged, so a run without warm-up computes exactly what it did before.
    """
    if warmup_steps <= 0:
        return schedule_fn
    after = schedule_fn if callable(schedule_fn) else optax.constant_schedule(schedule_fn)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def schedule(name: str, peak: float, total_steps: int, warmup_steps: int = 0) -> LearningRate:
    """The learning rate per step over a run of ``total_steps`` steps, the first ``warmup_steps`` warming up.

    ``constant``: ``peak`` throughout (the tutorial's); ``cosine``: from ``peak`` down to 0 at
    ``total_steps``, over the steps after the warm-up. Without warm-up, ``constant`` is the plain
    float, which optax treats exactly as before.
    """
    if name == "constant":
        after = peak
    elif name == "cosine":
        after = optax.cosine_decay_schedule(init_value=peak, decay_steps=max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown learning-rate schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return warmup_then(after, warmup_steps, peak)


def learning_rate_at(learning_rate: LearningRate, step: int) -> float:
    """The learning rate ``learning_rate`` (a schedule or a constant) gives at optimizer step ``step``, for logging."""
    return float(learning_rate(step)) if callable(learning_rate) else float(learning_rate)


def optimizer(
    name: str,
    learning_rate: LearningRate,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
    clip_grad_norm: float = 0.0,
) -> optax.GradientTransformation:
    """The optimizer ``name`` at ``learning_rate`` (a float or a schedule), as one optax transformation.

    - ``adam``: Adam, the default (the tutorial's, at 1e-3). Takes no weight decay: use ``adamw``.
    - ``adamw``: Adam with decoupled weight decay ``weight_decay`` (0.05 is typical for attention nets).
    - ``sgd``: SGD with ``momentum`` (0 for none) and optionally ``nesterov``; ``weight_decay`` is
      added to the gradient before momentum (L2 decay, as PyTorch's SGD does).
    - ``lamb``: LAMB (Adam with a per-layer trust ratio, for large batches) with decoupled ``weight_decay``.

    Decay touches only :func:`decay_mask`'s parameters; 0 means none. With ``clip_grad_norm`` > 0
    the gradients are first scaled down to that global norm when they exceed it.
    """
    if name == "adam":
        if weight_decay:
            raise ValueError("adam takes no weight decay; use adamw for decoupled weight decay")
        tx = optax.adam(learning_rate)
    elif name == "adamw":
        tx = optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay_mask)
    elif name == "lamb":
        tx = optax.lamb(learning_rate, weight_decay=weight_decay, mask=decay_mask)
    elif name == "sgd":
        tx = optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)
        if weight_decay:
            tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask), tx)
    else:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
    return tx
