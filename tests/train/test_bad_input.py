"""Every bad option fails up front with one line naming the option, the value and what works, and touches nothing."""

import hashlib
import os
from pathlib import Path

import pytest

from attnjax.train import cli, exits


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its size, mtime and content digest."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run whose workdir the bad commands must leave as it is."""
    workdir = tmp_path_factory.mktemp("run")
    cli.main(["--epochs", "1", "--workdir", str(workdir)])
    return workdir


def run_cli(argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--epochs", "0"], "--epochs 0 is invalid: use a whole number of at least 1"),
        (["--epochs", "-1"], "--epochs -1 is invalid: use a whole number of at least 1"),
        (["--batch-size", "0"], "--batch-size 0 is invalid: use a whole number of at least 1"),
        (["--grad-accum", "0"], "--grad-accum 0 is invalid: use a whole number of at least 1"),
        (["--learning-rate", "nan"], "--learning-rate nan is invalid: use a finite number above 0"),
        (["--learning-rate", "inf"], "--learning-rate inf is invalid: use a finite number above 0"),
        (["--learning-rate", "0"], "--learning-rate 0.0 is invalid: use a finite number above 0"),
        (
            ["--checkpoint-every-steps", "-5"],
            "--checkpoint-every-steps -5 is invalid: use 0 (off) or a number of steps",
        ),
        (["--checkpoint-every-minutes", "nan"], "--checkpoint-every-minutes nan is invalid: use 0 (off) or a number"),
        (["--weight-decay", "-0.1"], "--weight-decay -0.1 is invalid: use 0 (off) or a finite number above 0"),
        (
            ["--weight-decay", "0.05"],
            "--weight-decay 0.05 is invalid: --optimizer adam takes none: use --optimizer adamw",
        ),
        (["--clip-grad-norm", "nan"], "--clip-grad-norm nan is invalid: use 0 (off) or a finite number above 0"),
        (["--optimizer", "sgd", "--momentum", "1"], "--momentum 1.0 is invalid: use a number from 0 (none) up to"),
        (
            ["--warmup-epochs", "12"],
            "--warmup-epochs 12.0 is invalid: use 0 (off) or a number of epochs below --epochs 12",
        ),
        (["--nesterov"], "--nesterov is invalid with --optimizer adam and --momentum 0.9: Nesterov momentum needs"),
        (
            ["--epochs", "1", "--optimizer", "adamw"],
            "holds a run with other options, and continuing it with these would not reproduce it:\n"
            "  --optimizer: the run has 'adam', this command 'adamw'",
        ),
        (
            ["--block", "cbam"],
            "holds a run with other options, and continuing it with these would not reproduce it:\n"
            "  --block: the run has 'seed', this command 'cbam'",
        ),
        (
            ["--epochs", "3", "--seed", "2"],
            "  --seed: the run has 0, this command 2\n  --epochs: the run has 1, this command 3",
        ),
        (
            ["--epochs", "1", "--no-resume"],
            "holds a run (config.json, metrics.jsonl, checkpoints) and --no-resume refuses",
        ),
    ],
)
def test_bad_options_fail_up_front_and_leave_the_workdir_untouched(finished_run, capsys, options, message):
    before = snapshot(finished_run)
    code, err = run_cli([*options, "--workdir", str(finished_run)], capsys)
    assert code == exits.EXIT_BAD_INPUT
    assert message in err and err.startswith("error: ")
    assert "Traceback" not in err
    assert snapshot(finished_run) == before


def test_rerunning_a_finished_run_reports_its_result_and_changes_nothing(finished_run, capsys):
    before = snapshot(finished_run)
    metrics = (finished_run / "metrics.jsonl").read_text()
    cli.main(["--epochs", "1", "--workdir", str(finished_run)])
    out = capsys.readouterr().out
    assert "this run had already finished" in out and out.strip().splitlines()[-1].startswith("final test accuracy: ")
    assert (finished_run / "metrics.jsonl").read_text() == metrics
    contents = {name: digest for name, (_, _, digest) in before.items()}
    assert {name: digest for name, (_, _, digest) in snapshot(finished_run).items()} == contents


@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "a-file" / "run", lambda tmp: Path("/proc/attnjax-run")])
def test_a_workdir_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys, make_path):
    (tmp_path / "a-file").write_text("not a folder")
    workdir = make_path(tmp_path)
    code, err = run_cli(["--workdir", str(workdir)], capsys)
    assert code == exits.EXIT_BAD_INPUT
    assert f"error: --workdir {workdir} cannot be created or written" in err and "pass a folder you can write to" in err
    assert not os.path.exists(workdir)


@pytest.mark.parametrize("options", [["--block", "nosuch"], ["--epochs", "two"], ["--no-such-option"]])
def test_an_option_argparse_refuses_is_one_line_pointing_to_help(tmp_path, capsys, options):
    code, err = run_cli([*options, "--workdir", str(tmp_path / "run")], capsys)
    assert code == exits.EXIT_BAD_INPUT and len(err.strip().splitlines()) == 1
    assert err.startswith("python -m attnjax.train: error: ") and err.strip().endswith("--help)")
    assert not (tmp_path / "run").exists()
