"""Interrupted runs continue bit for bit: real signals, real Orbax checkpoints, the real training loop.

An interruption is a real SIGTERM or SIGINT that the test raises in its own main thread at a
chosen moment (``SignalAt``: after the N-th train step or evaluation batch), handled by
the same :class:`attnjax.train.preemption.Preemption` that the CLI uses. The interrupted run
saves and raises :class:`Interrupted`; calling ``train_and_evaluate`` again with the same
config continues it, and the end must equal an uninterrupted run exactly: every leaf of
the train state and every ``metrics.jsonl`` line apart from the timing fields.

Digits: 1,437 training images, batch 128, so 11 steps per epoch; 360 test images, so 3
evaluation batches. Ticks (train steps and evaluation batches) 1-11 train epoch 1, 12-14
evaluate it, 15-25 train epoch 2.
"""

import dataclasses
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from attnjax.train import (
    METRICS_FILE,
    TIMING_FIELDS,
    Config,
    Interrupted,
    Preemption,
    TrainingDiverged,
    checkpoint,
    train_and_evaluate,
)

pytestmark = pytest.mark.slow

# No checkpoints by wall-clock time (the default is every 10 minutes): which steps are saved,
# and so which checkpoint a resume starts from, must not depend on how loaded the machine is.
BASE = Config(epochs=2, checkpoint_every_minutes=0.0)


class SignalAt(Preemption):
    """The real preemption handler, plus a real signal raised in this process's main thread at tick ``at``.

    ``signal.raise_signal`` targets the calling thread and runs the Python handler before it
    returns, so the flag is set when :meth:`requested` reads it: the run stops at tick ``at``
    exactly. A signal from outside the test (before ``at``) fails the test naming it, rather
    than passing for an interruption at the wrong step.
    """

    def __init__(self, at: int, signum: int = signal.SIGTERM):
        super().__init__()
        self.at, self.signum = at, signum

    def requested(self, tick: int) -> bool:
        if self.received is not None and tick <= self.at:
            raise AssertionError(
                f"{signal.Signals(self.received).name} reached the process by tick {tick}, before the test raised "
                f"its own at tick {self.at}: it did not come from this test"
            )
        if tick == self.at:
            signal.raise_signal(self.signum)
            assert self.received == self.signum, "the handler did not run before raise_signal returned"
        return super().requested(tick)


def metrics(workdir) -> list[dict]:
    lines = (workdir / METRICS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def assert_same_state(got, want):
    got, want = checkpoint.to_host(got), checkpoint.to_host(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), (_, b) in zip(checkpoint._leaves(got), checkpoint._leaves(want), strict=True):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=path)


_REFERENCES = {}


def reference(config: Config, devices, tmp_path_factory):
    """An uninterrupted run of ``config`` (cached per config and device count)."""
    key = (config, len(devices))
    if key not in _REFERENCES:
        workdir = tmp_path_factory.mktemp("reference")
        state, _ = train_and_evaluate(config, str(workdir), devices=devices)
        _REFERENCES[key] = (jax.device_get(state), metrics(workdir))
    return _REFERENCES[key]


def interrupt_and_resume(config, workdir, devices, at, signum=signal.SIGTERM, resume_devices=None):
    with pytest.raises(Interrupted, match="Rerun the same command to continue"):
        train_and_evaluate(config, str(workdir), devices=devices, preemption=SignalAt(at, signum))
    record = saved_record(workdir)
    state, _ = train_and_evaluate(config, str(workdir), devices=resume_devices or devices)
    return state, record


def saved_record(workdir) -> dict:
    with open(workdir / checkpoint.CHECKPOINTS_DIR / str(latest_step(workdir)) / "record" / "metadata") as f:
        return json.load(f)


def latest_step(workdir) -> int:
    return max(int(name) for name in os.listdir(workdir / checkpoint.CHECKPOINTS_DIR) if name.isdigit())


@pytest.mark.parametrize(
    "at, where",
    [(5, "mid-epoch 1"), (12, "during the evaluation of epoch 1"), (18, "mid-epoch 2"), (15, "after the boundary")],
)
def test_pmap_on_8_devices_resumes_bit_for_bit(devices, tmp_path, tmp_path_factory, at, where):
    want_state, want_metrics = reference(BASE, devices, tmp_path_factory)
    # Checkpoint intervals may differ between runs: they never change what is computed.
    config = dataclasses.replace(BASE, checkpoint_every_steps=4)
    state, record = interrupt_and_resume(config, tmp_path, devices, at)
    if at == 12:  # evaluation interrupted: the epoch's training is kept, evaluation runs again
        assert (record["epoch"], record["batch"], record["step"]) == (1, 11, 11)
    else:
        assert (record["step"], record["reason"]) == (at - (3 if at > 14 else 0), "on SIGTERM")
    assert_same_state(state, want_state)
    assert metrics(tmp_path) == want_metrics


def test_resume_from_an_epoch_end_checkpoint_after_a_kill(devices, tmp_path, tmp_path_factory):
    """As if killed before the preemption save: the epoch-end checkpoint (step 11) is the latest that exists."""
    want_state, want_metrics = reference(BASE, devices, tmp_path_factory)
    with pytest.raises(Interrupted):
        train_and_evaluate(BASE, str(tmp_path), devices=devices, preemption=SignalAt(17))
    shutil.rmtree(tmp_path / checkpoint.CHECKPOINTS_DIR / "14")
    state, _ = train_and_evaluate(BASE, str(tmp_path), devices=devices)
    assert_same_state(state, want_state)
    assert metrics(tmp_path) == want_metrics


@pytest.mark.parametrize(
    "options",
    [{"parallel": "jit"}, {"batch_size": 64, "grad_accum": 2}, {"dtype": "float16"}],
    ids=["jit", "grad-accum-2", "float16"],
)
def test_jit_grad_accum_and_float16_resume_bit_for_bit(devices, tmp_path, tmp_path_factory, options):
    config = dataclasses.replace(BASE, **options)
    want_state, want_metrics = reference(config, devices, tmp_path_factory)
    state, record = interrupt_and_resume(config, tmp_path, devices, at=18, signum=signal.SIGINT)
    assert record["reason"] == "on SIGINT" and 0 < record["batch"] < 11 and record["epoch"] == 2
    if config.dtype == "float16":
        assert state.loss_scale is not None
    assert_same_state(state, want_state)  # the loss scale's state included
    assert metrics(tmp_path) == want_metrics


def test_a_checkpoint_from_8_devices_resumes_on_4(devices, tmp_path, tmp_path_factory):
    """The same global batch on another device count: equal to float32 rounding."""
    want_state, want_metrics = reference(BASE, devices, tmp_path_factory)
    state, _ = interrupt_and_resume(BASE, tmp_path, devices, at=18, resume_devices=devices[:4])
    got_metrics = metrics(tmp_path)
    assert got_metrics[0] == want_metrics[0]  # epoch 1 ran on 8 devices before the interruption
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert got_metrics[1][key] == pytest.approx(want_metrics[1][key], rel=1e-5)
    for (path, got), (_, want) in zip(
        checkpoint._leaves(checkpoint.to_host(state.params)),
        checkpoint._leaves(checkpoint.to_host(want_state.params)),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=path)


def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_used(devices, tmp_path, tmp_path_factory, capsys):
    want_state, want_metrics = reference(BASE, devices, tmp_path_factory)
    config = dataclasses.replace(BASE, checkpoint_every_steps=4)
    with pytest.raises(Interrupted):
        train_and_evaluate(config, str(tmp_path), devices=devices, preemption=SignalAt(20))
    steps = sorted(int(n) for n in os.listdir(tmp_path / checkpoint.CHECKPOINTS_DIR) if n.isdigit())
    assert steps == [11, 16, 17]  # the latest two and the best (the only epoch end)
    largest = max(
        (p for p in (tmp_path / "checkpoints" / "17" / "state").rglob("*") if p.is_file()), key=os.path.getsize
    )
    data = bytearray(largest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    largest.write_bytes(bytes(data))
    state, _ = train_and_evaluate(config, str(tmp_path), devices=devices)
    err = capsys.readouterr().err
    assert "checkpoint step 17 was set aside" in err
    assert (tmp_path / checkpoint.SET_ASIDE_DIR / "17").is_dir()
    assert_same_state(state, want_state)
    assert metrics(tmp_path) == want_metrics


def test_the_nan_guard_stops_at_the_first_non_finite_step_and_keeps_a_finite_checkpoint(tmp_path):
    config = Config(epochs=1, learning_rate=1e30, checkpoint_every_steps=1)
    with pytest.raises(
        TrainingDiverged, match=r"training diverged at step (\d+).*last good checkpoint is .*step"
    ) as info:
        train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
    message = str(info.value)
    bad_step = int(message.split("at step ")[1].split(" ")[0])
    good = latest_step(tmp_path)
    assert 1 <= good < bad_step and f"checkpoints/{good} (step {good})" in message
    with checkpoint.Checkpoints(str(tmp_path)) as reader:
        restored = reader.manager.restore(good)
    assert checkpoint.first_non_finite(dict(restored["state"])) is None
