"""TensorBoard scalars (``--tensorboard``), profiler traces (``--profile-steps``) and the run's ETA.

Digits: 1,437 training images, batch 128, so 11 steps per epoch; 3 evaluation batches, so a
signal at tick 17 (11 steps, 3 evaluation batches, 3 steps) arrives at step 14.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnjax import train
from attnjax.train import Config, Interrupted, Preemption, checkpoint, cli, exits, optim
from attnjax.train.hooks import tensorboard

STEPS_PER_EPOCH = 11
TRAIN_TAGS = {"train/loss", "train/accuracy", "train/learning_rate", "train/images_per_second"}
EPOCH_TAGS = {"test/loss", "test/accuracy", "epoch/train_loss", "epoch/train_accuracy", "epoch/images_per_second"}


class SignalAt(Preemption):
    """The real preemption handler, plus a real SIGTERM sent to this process at tick ``at`` (as in test_resume)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def requested(self, tick: int) -> bool:
        if tick == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().requested(tick)


def read_events(path: Path) -> list:
    """The ``Event`` protos of one event file: TFRecord framing (length, its CRC, data, its CRC), parsed with the
    protobufs that tensorboardX ships, so that reading needs neither TensorFlow nor TensorBoard."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, i = path.read_bytes(), [], 0
    while i < len(data):
        (length,) = struct.unpack("<Q", data[i : i + 8])
        events.append(Event.FromString(data[i + 12 : i + 12 + length]))
        i += 12 + length + 4
    return events


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag: [(step, value), ...]`` over every event file in ``logdir``, in file order, as TensorBoard shows them:
    a session start at step S (a resumed run's first step) drops the earlier files' points from step S on."""
    from tensorboardX.proto.event_pb2 import SessionLog

    found: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in read_events(path):
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                found = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in found.items()}
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
    return found


def steps(points) -> list[int]:
    return [step for step, _ in points]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """Two epochs through the CLI with TensorBoard and a profile of steps 3-4, in a fresh interpreter."""
    workdir = tmp_path_factory.mktemp("tb")
    argv = ["--epochs", "2", "--tensorboard", "--log-every-steps", "4", "--profile-steps", "3:2"]
    argv += ["--workdir", str(workdir)]
    code = f"import sys; from attnjax.train import cli; cli.main({argv!r}); print('tensorflow' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ.copy()
    )
    assert proc.returncode == 0, proc.stderr
    return proc, workdir


def test_a_run_with_tensorboard_never_imports_tensorflow(cli_run):
    proc, _ = cli_run
    assert proc.stdout.strip().splitlines()[-1] == "False"


def test_the_event_file_holds_every_tag_at_its_global_steps(cli_run):
    _, workdir = cli_run
    found = scalars(workdir / tensorboard.TB_DIR)
    assert set(found) == TRAIN_TAGS | EPOCH_TAGS | {"epoch/epoch"}
    for tag in TRAIN_TAGS:
        assert steps(found[tag]) == [4, 8, 12, 16, 20], tag  # every 4 steps, counted over the whole run
    for tag in EPOCH_TAGS:
        assert steps(found[tag]) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], tag  # each epoch's last step
    schedule = train.learning_rate_schedule("cosine", 1e-3, 2 * STEPS_PER_EPOCH)
    for step, rate in found["train/learning_rate"]:
        assert rate == pytest.approx(optim.learning_rate_at(schedule, step - 1), rel=1e-6)
    assert all(v > 0 for _, v in found["train/images_per_second"])
    assert all(np.isfinite(v) for _, v in found["train/loss"])
    metrics = [line for line in (workdir / train.METRICS_FILE).read_text().splitlines() if line]
    assert [v for _, v in found["epoch/epoch"]] == [1.0, 2.0] and len(metrics) == 2
    last_accuracy = json.loads(metrics[-1])["test_accuracy"]
    assert found["test/accuracy"][-1][1] == pytest.approx(last_accuracy, rel=1e-6)


def test_the_profiler_writes_a_trace_of_the_chosen_steps(cli_run):
    _, workdir = cli_run
    traces = list((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_the_epoch_lines_end_with_the_run_eta(cli_run):
    proc, _ = cli_run
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert "  run ETA " in epochs[0] and epochs[0].rsplit(" ", 1)[1].count(":") == 2
    assert "ETA" not in epochs[1]  # nothing remains after the last epoch


def test_a_resumed_run_continues_the_curves_without_repeating_steps(devices, tmp_path):
    """Killed at step 14 with only the step-11 checkpoint kept: steps 12-14 run again, and are logged once."""
    config = Config(epochs=2, tensorboard=True, log_every_steps=2)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(config, str(tmp_path), devices=devices, preemption=SignalAt(17))
    shutil.rmtree(tmp_path / checkpoint.CHECKPOINTS_DIR / "14")
    train.train_and_evaluate(config, str(tmp_path), devices=devices)
    logdir = tmp_path / tensorboard.TB_DIR
    first, second = sorted(logdir.glob("events.out.tfevents.*"))  # one file per run
    killed = {e.step for e in read_events(first) for v in e.summary.value if v.tag == "train/loss"}
    assert max(killed) == 14  # the killed run had logged steps 12 and 14, which the resumed run repeats
    assert [e.step for e in read_events(second) if e.HasField("session_log")] == [12]  # so TensorBoard drops them
    found = scalars(logdir)
    assert steps(found["train/loss"]) == list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))
    assert steps(found["test/accuracy"]) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_the_eta_counts_the_compiling_epoch_only_while_it_is_alone():
    assert train.run_eta([30.0], 3) == 90.0
    assert train.run_eta([30.0, 4.0, 6.0], 2) == 10.0
    assert train.run_eta([30.0, 4.0], 0) is None
    assert train.format_duration(3725.4) == "1:02:05"


@pytest.mark.parametrize(
    "options, message",
    [
        (["--profile-steps", "5"], "--profile-steps '5' is invalid: use START:COUNT"),
        (["--profile-steps", "a:2"], "--profile-steps 'a:2' is invalid: use START:COUNT"),
        (["--profile-steps", "0:2"], "--profile-steps '0:2' is invalid: use START:COUNT"),
        (["--profile-steps", "3:0"], "--profile-steps '3:0' is invalid: use START:COUNT"),
        (["--profile-steps", "3:2:1"], "--profile-steps '3:2:1' is invalid: use START:COUNT"),
        (["--epochs", "1", "--profile-steps", "12:1"], "--profile-steps 12:1 starts after the run's last step"),
        (["--log-every-steps", "0"], "--log-every-steps 0 is invalid"),
    ],
)
def test_bad_profile_and_log_options_are_one_line_errors(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as info:
        cli.main([*options, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == exits.EXIT_BAD_INPUT
    assert message in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_tensorboard_without_tensorboardx_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed: importing it fails
    with pytest.raises(SystemExit) as info:
        cli.main(["--tensorboard", "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == exits.EXIT_BAD_INPUT
    assert err.strip() == f"error: --tensorboard needs tensorboardX, which is not installed: {tensorboard.INSTALL}"
    assert not (tmp_path / "run").exists()  # refused before any work
