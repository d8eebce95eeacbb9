"""The cost of each study entry on its host network, at the dataset's input size.

:mod:`attnjax.compare.block_cost` measures a block alone on a synthetic feature map. A designer
pays for the block inside a network: this module compiles the study's real train step
(:func:`attnjax.train.train_step`, the model and optimizer of the run's config) on one device at
the run's batch size and image shape, and reports

- ``params``: trainable parameters of the whole network;
- ``train_flops_per_image``: XLA's cost analysis of the compiled train step, over the batch,
  counted with the formulations native to GPU/TPU so that it is the network's math (as in the
  block cost table);
- ``step_s``: the median wall time of the train step, timed side by side with every other
  entry (each repeat runs every step once, in an order rotated by one per repeat: the timer of
  the block table, :func:`attnjax.compare.measure.side_by_side`); ``times_s`` keeps every
  round's time, so that the study takes the ratio to the baseline round by round;
- ``temp_bytes``: XLA's temporary buffers of the compiled step (``memory_analysis()``): the
  activations kept for the backward pass and the scratch space, the step's peak beyond its
  arguments and outputs. ``None`` where the backend does not report it.

Parameters, FLOPs and temporary memory are counted as the block table counts them
(:mod:`attnjax.compare.measure`).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from attnjax import train, xla_options
from attnjax.compare import measure as measuring


@dataclasses.dataclass(frozen=True)
class NetworkCost:
    label: str
    params: int
    train_flops_per_image: float | None
    temp_bytes: int | None
    times_s: tuple[float, ...]

    @property
    def step_s(self) -> float:
        return statistics.median(self.times_s)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> NetworkCost:
        return cls(**{**record, "times_s": tuple(record["times_s"])})


def _random_batch(config: train.Config, image_shape: tuple[int, ...], num_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.standard_normal((config.batch_size, *image_shape), dtype=np.float32)),
        "label": jnp.asarray(rng.integers(0, num_classes, config.batch_size, dtype=np.int32)),
    }


@dataclasses.dataclass
class _Prepared:
    label: str
    params: int
    flops: float | None
    temp_bytes: int | None
    step: object
    state: object


def _state_and_step(config: train.Config, image_shape, num_classes: int):
    """The run's initial train state and its train step function (the trainer's own, unwrapped)."""
    model = train.create_model(config, num_classes)
    state = train.create_train_state(
        jax.random.key(config.seed), model, image_shape, 0.0, tx=train.create_optimizer(config, config.learning_rate)
    )
    step_fn = functools.partial(
        train.train_step, dtype=train.precision.compute_dtype(config.dtype), microbatches=config.grad_accum
    )
    return state, step_fn


def train_flops_per_image(
    config: train.Config, image_shape, num_classes: int, batch: dict | None = None, state_and_step=None
) -> float | None:
    """XLA's FLOP count of ``config``'s train step over its batch size, with the formulations native to GPU/TPU.

    Those formulations compute the network's math: a CPU formulation may run more (see
    :mod:`attnjax.ops`). ``None`` where the backend gives no cost analysis. ``state_and_step``:
    the config's ``(state, step_fn)`` if already built.
    """
    state, step_fn = state_and_step or _state_and_step(config, image_shape, num_classes)
    batch = batch or _random_batch(config, image_shape, num_classes, config.seed)
    flops = measuring.math_flops(step_fn, state, batch)
    return None if flops is None else flops / config.batch_size


def _prepare(label: str, config: train.Config, image_shape, num_classes: int, batch: dict) -> _Prepared:
    state, step_fn = _state_and_step(config, image_shape, num_classes)
    step = measuring.compile_fn(
        step_fn, state, batch, compiler_options=xla_options.compiler_options(config.xla_options)
    )
    return _Prepared(
        label,
        measuring.count_params({"params": state.params}),
        train_flops_per_image(config, image_shape, num_classes, batch, (state, step_fn)),
        measuring.temp_bytes_of(step),
        step,
        state,
    )


def measure(
    configs: dict[str, train.Config],
    image_shape: tuple[int, ...],
    num_classes: int,
    *,
    repeats: int = 10,
    progress: bool = True,
) -> dict[str, NetworkCost]:
    """The cost of each labelled config's train step, on one random batch of the config's batch size.

    The steps are timed side by side (:func:`attnjax.compare.measure.side_by_side`): ``repeats``
    rounds, each running every step once, in an order rotated by one per round, so that drift
    and noise fall on every entry alike.
    """
    first = next(iter(configs.values()))
    batch = _random_batch(first, image_shape, num_classes, first.seed)
    prepared: list[_Prepared] = []
    for label, config in tqdm(configs.items(), desc="cost: compile", unit="net", disable=not progress, leave=False):
        prepared.append(_prepare(label, config, image_shape, num_classes, batch))
    times = measuring.side_by_side(
        {p.label: lambda p=p: p.step(p.state, batch) for p in prepared}, repeats, progress=progress, desc="cost: time"
    )
    return {p.label: NetworkCost(p.label, p.params, p.flops, p.temp_bytes, times[p.label]) for p in prepared}


def study_seconds(
    costs: dict[str, NetworkCost], runs_left: Sequence[str], steps_per_run: int, overhead_s: float = 15.0
) -> float:
    """A rough forecast of the time the listed runs (by entry label) take: steps at the measured rate plus overhead.

    ``overhead_s`` per run covers loading the data, compiling and evaluating.
    """
    return sum(costs[label].step_s * steps_per_run + overhead_s for label in runs_left)
