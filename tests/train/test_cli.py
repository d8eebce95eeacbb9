"""`python -m attnjax.train` end to end, in subprocesses, as a user runs it (on 8 fake devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnjax import ops, xla_options
from attnjax.train import TIMING_FIELDS

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

REQUIRED_FIELDS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_second"}


def run(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "attnjax.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ.copy(),
    )


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs with the same seed, two epochs each."""
    results = []
    for name in ("a", "b"):
        workdir = tmp_path_factory.mktemp(name)
        proc = run("--epochs", "2", "--seed", "3", "--workdir", str(workdir))
        assert proc.returncode == 0, proc.stderr
        results.append((proc, workdir))
    return results


def test_cli_trains_and_writes_one_metrics_line_per_epoch(two_runs):
    proc, workdir = two_runs[0]
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert REQUIRED_FIELDS <= set(record)
        assert record["test_examples"] == 360
        assert 0.0 <= record["test_accuracy"] <= 1.0 and record["images_per_second"] > 0
    assert records[-1]["test_accuracy"] > 0.8  # the embedded digits are learnt within 2 epochs
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    lines = proc.stdout.strip().splitlines()
    assert sum(line.startswith("epoch ") for line in lines) == 2
    assert lines[-1] == f"final test accuracy: {records[-1]['test_accuracy']:.4f} ({records[-1]['test_correct']}/360)"
    config = json.loads((Path(workdir) / "config.json").read_text())
    assert config["config"]["seed"] == 3 and config["devices"] == 8 and config["dataset"]["name"] == "digits"
    # The CLI put attnjax's XLA:CPU options into XLA_FLAGS (beside the 8-device flag) and recorded them.
    assert config["config"]["xla_options"] == "tuned"
    assert config["xla_options"] == {name: flag for name, (_, flag, _) in xla_options.OPTIONS.items()}
    assert config["formulations"] == ops.chosen()


def test_same_seed_gives_identical_metrics_apart_from_timing(two_runs):
    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]

    (_, first), (_, second) = two_runs
    assert strip(read_metrics(first)) == strip(read_metrics(second))


def test_help_explains_every_option():
    proc = run("--help")
    assert proc.returncode == 0
    for option in (
        "--dataset",
        "--model",
        "--block",
        "--epochs",
        "--batch-size",
        "--learning-rate",
        "--seed",
        "--workdir",
    ):
        assert option in proc.stdout


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "attnjax-train"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--block" in proc.stdout


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--block", "squeeze", ["invalid choice: 'squeeze'", "none", "seed", "softmax", "cbam"]),
        ("--model", "vgg", ["invalid choice: 'vgg'", "attention_net"]),
        ("--dataset", "no_such_dataset_xyz", ["unknown dataset 'no_such_dataset_xyz'", "digits", "folder:PATH"]),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path, option, value, expected):
    proc = run(option, value, "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    for text in expected:
        assert text in proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_that_does_not_split_is_a_one_line_error(tmp_path):
    proc = run("--batch-size", "100", "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert "error: batch size 100 does not split over 8 devices: use a multiple of 8" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_python_m_attnjax_train_imports_the_training_module_once_and_no_cycle():
    """``python -m attnjax.train`` runs a small ``__main__``: the training module is loaded once, as attnjax.train."""
    script = (
        "import runpy, sys\n"
        "sys.argv = ['attnjax.train', '--help']\n"
        "try:\n"
        "    runpy.run_module('attnjax.train', run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n"
        "    pass\n"
        "main = sys.modules['__main__']\n"
        "print(hasattr(main, 'train_and_evaluate'), hasattr(sys.modules['attnjax.train'], 'train_and_evaluate'))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False True"
    training = (Path(__file__).parents[2] / "attnjax" / "train" / "__init__.py").read_text()
    assert "attnjax.train.cli" not in training.replace(
        "(see :mod:`attnjax.train.cli`", ""
    )  # the CLI imports training, not back
