"""The training loop: :func:`train_and_evaluate` over a :class:`Recipe`, a :class:`Position` and hooks.

Each step: the hooks' ``before_step``, the step, the position advanced, the hooks'
``after_step`` (the progress file, the caller's callback, the profiler, TensorBoard, the bar,
the NaN guard, checkpointing). Each epoch's end: the pending metrics collected, the evaluation,
the record, the checkpoint ranked by test accuracy, ``variables.msgpack``, then the metrics
line, then the hooks' ``after_epoch``. One ``ExitStack`` closes every hook, on success and on
an error alike.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import jax
import numpy as np

from attnjax import data
from attnjax.train import checkpoint
from attnjax.train.config import Config
from attnjax.train.hooks import StepCallback
from attnjax.train.hooks.checkpointing import Checkpointing, restore_position, run_fields
from attnjax.train.hooks.nan_guard import NanGuard
from attnjax.train.hooks.profiler import Profiler
from attnjax.train.hooks.progress import ProgressReport
from attnjax.train.hooks.tensorboard import TensorBoard
from attnjax.train.hooks.tensorboard import create as create_writer
from attnjax.train.parallel import to_devices
from attnjax.train.preemption import Preemption
from attnjax.train.recipe import Recipe, check_config, resolve_devices
from attnjax.train.step import TrainState
from attnjax.train.workdir import Progress, Workdir, check_workdir, claim_workdir, versions


def evaluate(
    p_eval_step,
    state,
    dataset: data.Dataset,
    batch_size: int,
    devices,
    split: str = "test",
    kind: str = "pmap",
    stop: Callable[[], bool] | None = None,
) -> dict | None:
    """Loss and accuracy over every example of ``split`` exactly once; accuracy = correct / examples.

    ``p_eval_step`` is :func:`eval_step` under the ``kind`` wrapper over ``devices``.
    ``stop`` is asked after every batch; when it answers True, evaluation ends early and
    returns ``None`` (a preempted run evaluates again when it resumes).
    """
    batches = data.pipeline.eval_batches(
        dataset, batch_size, split=split, process_index=jax.process_index(), process_count=jax.process_count()
    )
    sums = []
    for batch in to_devices(batches, devices, kind=kind):
        sums.append(p_eval_step(state, batch))
        if stop is not None and stop():
            return None
    sums = jax.tree.map(lambda *xs: float(np.sum(xs)), *jax.device_get(sums))
    count, expected = int(round(sums["count"])), len(getattr(dataset, split))
    if count != expected:
        raise AssertionError(f"evaluation counted {count} examples, expected {expected}")
    return {
        "loss": sums["loss"] / count,
        "accuracy": sums["correct"] / count,
        "correct": int(round(sums["correct"])),
        "count": count,
    }


def train_and_evaluate(
    config: Config,
    workdir: str,
    devices=None,
    *,
    resume: bool = True,
    preemption: Preemption | None = None,
    asynchronous_checkpoints: bool = True,
    dataset: data.Dataset | None = None,
    on_step: Callable[[int], None] | None = None,
) -> tuple[TrainState, list[dict]]:
    """Train ``config.model`` on ``config.dataset``, evaluating every epoch; continue a run found in ``workdir``.

    Writes ``config.json``, one line per epoch to ``metrics.jsonl``, the model's variables to
    ``variables.msgpack`` after every epoch, and full-state checkpoints (:mod:`attnjax.train.checkpoint`)
    at every epoch end, every ``config.checkpoint_every_steps`` steps and
    ``config.checkpoint_every_minutes`` minutes, and on SIGTERM/SIGINT (``preemption``), after
    which it raises :class:`Interrupted`. A workdir with a checkpoint continues from it and
    ends bit-identical to an uninterrupted run on the same number of devices.
    ``dataset`` is ``config.dataset`` already loaded (a study loads it once for all its runs);
    ``on_step(global_step)`` is called after each optimizer step is dispatched (a study's progress bar).
    Returns the final state and the per-epoch metrics.
    """
    check_config(config)
    devices, num_devices = resolve_devices(config, devices)
    check_workdir(config, workdir, resume)
    recipe = Recipe.build(config, devices, num_devices, dataset)  # the dataset's refusals come before any file
    with claim_workdir(workdir):
        state, position = _train(recipe, Workdir(workdir), preemption, asynchronous_checkpoints, on_step)
    last = position.history[-1]  # check_config requires epochs >= 1, so there is at least one
    Workdir(workdir).say(
        f"final test accuracy: {last['test_accuracy']:.4f} ({last['test_correct']}/{last['test_examples']})", flush=True
    )
    return state, position.history


def _train(recipe: Recipe, run_dir: Workdir, preemption, asynchronous_checkpoints: bool, on_step):
    """The loop itself, in a claimed workdir; returns the final state and position."""
    config, devices = recipe.config, recipe.devices
    progress = Progress(run_dir.path, enabled=run_dir.leader)
    checkpoints = checkpoint.Checkpoints(run_dir.path, asynchronous=asynchronous_checkpoints)
    state, position = restore_position(recipe, checkpoints, progress, run_dir)
    run_dir.write_config(config, recipe.run_description())
    state = recipe.replicate(state)

    preemption = preemption if preemption is not None else Preemption()
    guard, saving, hooks = _hooks(recipe, run_dir, checkpoints, preemption, progress, position, on_step)
    with contextlib.ExitStack() as stack:
        for hook in reversed(hooks):  # checkpointing closes last: it waits for the last asynchronous save
            stack.enter_context(hook)
        stack.enter_context(preemption)
        while position.epoch <= config.epochs:
            position.segment_start = time.perf_counter()
            for hook in hooks:
                hook.before_epoch(position)
            for batch in recipe.train_batches(position.epoch, position.batch):
                for hook in hooks:
                    hook.before_step(position)
                state, metrics = recipe.train_step(state, batch)
                position.advance()
                for hook in hooks:
                    hook.after_step(position, state, metrics)
            guard.collect(position)
            seconds = position.epoch_seconds()
            stop = functools.partial(saving.evaluation_stop, position)
            test = evaluate(
                recipe.eval_step, state, recipe.dataset, config.batch_size, devices, kind=config.parallel, stop=stop
            )
            if test is None:
                position.carried_seconds = seconds
                saving.stop_here(position, state, f"during the evaluation of epoch {position.epoch}")
            record = position.finish_epoch(test, seconds, recipe.update_batch)
            saving.save_epoch(position, state, test["accuracy"])  # the first one waits for its commit
            run_dir.write_epoch(state.variables(), record)
            for hook in hooks:
                hook.after_epoch(position, record)
    return state, position


def _hooks(recipe: Recipe, run_dir: Workdir, checkpoints, preemption: Preemption, progress, position, on_step):
    """The NaN guard, checkpointing, and every hook in the order they run after each step."""
    config = recipe.config
    guard = NanGuard(checkpoints.path, config.learning_rate, run_dir.metrics_path)
    run = run_fields(config, recipe.num_devices, versions(), recipe.dataset.describe())
    saving = Checkpointing(checkpoints, preemption, config, run, before_save=guard.collect, say=run_dir.say)
    unfinished = position.epoch <= config.epochs  # a run that had already finished writes nothing new
    writer = create_writer(run_dir.path, config.tensorboard and run_dir.leader and unfinished, position.step + 1)
    hooks = [
        progress,
        StepCallback(on_step),
        Profiler(run_dir.path, recipe.profile_steps),
        TensorBoard(writer, config.log_every_steps, recipe.schedule, recipe.update_batch),
        ProgressReport(config.epochs, recipe.steps_per_epoch, run_dir.say, show_bar=run_dir.leader),
        guard,
        saving,
    ]
    return guard, saving, hooks
