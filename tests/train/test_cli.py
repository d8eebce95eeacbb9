"""`python -m attnjax.train` end to end, in subprocesses, as a user runs it (on 8 fake devices); its --config checks."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnjax import ops, xla_options
from attnjax.train import TIMING_FIELDS, cli
from attnjax.train.config import REGISTRY_KEY, Config
from attnjax.train.workdir import Workdir

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


# --config files are type-checked: every value against its Config field's type, in-process (nothing trains).
# A run's config.json as Workdir.write_config records it: its options under "config", then the run's description.
RUN_DESCRIPTION = {
    "augment": "none",
    "devices": 8,
    "processes": 1,
    "jax": "0.0",
    "dataset": {"name": "digits"},
    "xla_options": {},
    "formulations": {},
}


@pytest.mark.parametrize(
    "content, field, message",
    [
        ({"tensorboard": "false"}, "tensorboard", '"tensorboard" is "false" (a string); it takes true or false'),
        ({"nesterov": "false"}, "nesterov", '"nesterov" is "false" (a string); it takes true or false'),
        ({"distributed": 1}, "distributed", '"distributed" is 1 (a whole number); it takes true or false'),
        ({"epochs": "5"}, "epochs", '"epochs" is "5" (a string); it takes a whole number, such as 12'),
        ({"epochs": 2.5}, "epochs", '"epochs" is 2.5 (a decimal number); it takes a whole number'),
        ({"epochs": 3.0}, "epochs", '"epochs" is 3.0 (a decimal number); it takes a whole number'),
        ({"epochs": True}, "epochs", '"epochs" is true (a boolean); it takes a whole number'),
        ({"batch_size": [128]}, "batch_size", '"batch_size" is [128] (a list); it takes a whole number'),
        ({"seed": None}, "seed", '"seed" is null; it takes a whole number, such as 0'),
        ({"learning_rate": "1e-3"}, "learning_rate", '"learning_rate" is "1e-3" (a string); it takes a number'),
        ({"learning_rate": None}, "learning_rate", '"learning_rate" is null; it takes a number, such as 0.001'),
        ({"momentum": False}, "momentum", '"momentum" is false (a boolean); it takes a number'),
        ({"num_processes": "2"}, "num_processes", '"num_processes" is "2" (a string); it takes a whole number or null'),
        ({"data_dir": 5}, "data_dir", '"data_dir" is 5 (a whole number); it takes a string or null'),
        ({"profile_steps": 5}, "profile_steps", '"profile_steps" is 5 (a whole number); it takes a string'),
        (
            {"block_option": "reduction=8"},
            "block_option",
            '"block_option" is "reduction=8" (a string); it takes a list',
        ),
        (
            {"model_option": ["stem=cifar", 3]},
            "model_option",
            '"model_option" is ["stem=cifar", 3] (a list); it takes a list of strings',
        ),
        ({"block": ["se"]}, "block", '"block" is ["se"] (a list); it takes one of: '),
        ({"block": "squeeze"}, "block", '"block" is "squeeze" (a string); it takes one of: '),
        ({"optimizer": None}, "optimizer", '"optimizer" is null; it takes one of: '),
        ({"dataset": {"name": "digits"}}, "dataset", '"dataset" is {"name": "digits"} (an object); it takes a string'),
        ({"blok": "se"}, "blok", "unknown option(s) blok; valid: dataset"),
        ({"config": {"block": "se"}, "seed": 3}, "seed", 'has both a "config" object'),
        ({"config": "se"}, "config", '"config" is "se", not an object'),
        ({"config": {"tensorboard": "false"}, **RUN_DESCRIPTION}, "tensorboard", '"tensorboard" is "false"'),
    ],
)
def test_a_wrongly_typed_config_file_is_a_one_line_error_before_any_file(tmp_path, capsys, content, field, message):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(content))
    workdir = tmp_path / "w"
    # Parsing is where the file is read: a refusal there comes before check_config, JAX and the workdir.
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--config", str(path), "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith(f"error: --config {path}") and message in err and field in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not workdir.exists()


def test_a_runs_config_json_and_well_typed_values_are_accepted(tmp_path):
    recorded = Config(
        block="cbam",
        block_option=("reduction=4", "kernel_size=5"),
        seed=4,
        epochs=3,
        optimizer="sgd",
        nesterov=True,
        learning_rate=0.002,
        tensorboard=True,
        data_dir="/data",
        num_processes=None,
    )
    run = tmp_path / "run"
    run.mkdir()
    Workdir(str(run)).write_config(recorded, RUN_DESCRIPTION)
    assert set(json.loads((run / "config.json").read_text())) == {"config", REGISTRY_KEY, *RUN_DESCRIPTION}
    config, workdir, _ = cli.parse_args(["--config", str(run / "config.json"), "--workdir", "w"])
    assert config == recorded and workdir == "w"
    # Flags still override the file's values, and only theirs.
    config, _, _ = cli.parse_args(
        ["--config", str(run / "config.json"), "--seed", "5", "--block-option", "reduction=2"]
    )
    assert config == dataclasses.replace(recorded, seed=5, block_option=("reduction=2",))
    # A flat file: JSON integers in float fields become floats, null where a field takes it, lists as tuples.
    flat = tmp_path / "flat.json"
    flat.write_text(
        json.dumps(
            {
                "learning_rate": 1,
                "momentum": 0,
                "epochs": 2,
                "distributed": False,
                "coordinator_address": None,
                "num_processes": 2,
                "model_option": [],
                "block": "none",
                "xla_options": "default",
            }
        )
    )
    config, _, _ = cli.parse_args(["--config", str(flat)])
    assert (config.learning_rate, config.momentum, config.epochs, config.num_processes) == (1.0, 0.0, 2, 2)
    assert type(config.learning_rate) is float and type(config.momentum) is float
    assert (config.block, config.xla_options, config.model_option, config.coordinator_address) == (
        "none",
        "default",
        (),
        None,
    )
