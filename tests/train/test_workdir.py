"""The workdir: any path that works is used, one that would lose the run is refused up front,
one process writes it at a time, and a refusal leaves no file behind (real runs, real files)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_input import run_cli, snapshot

from attnjax.train import TIMING_FIELDS, Config, Interrupted, Preemption, exits, train_and_evaluate
from attnjax.train.workdir import LOCK_FILE, WorkdirLock

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["exp[1]", "exp]1[", "exp\\1"])
def test_a_path_orbax_cannot_read_back_is_refused_before_any_file(tmp_path, capsys, name):
    workdir = tmp_path / name
    code, err = run_cli(["--epochs", "1", "--workdir", str(workdir)], capsys)
    assert code == exits.EXIT_BAD_INPUT and "Traceback" not in err
    assert err.startswith("error: --workdir ") and "cannot read them back" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_a_folder_above_the_workdir_with_brackets_is_refused_too(tmp_path, capsys, monkeypatch):
    above = tmp_path / "project[2]"
    above.mkdir()
    monkeypatch.chdir(above)  # a relative --workdir under it is as unreadable
    code, err = run_cli(["--epochs", "1", "--workdir", "runs/plain"], capsys)
    assert code == exits.EXIT_BAD_INPUT and "holds [ ]" in err
    assert os.listdir(above) == []


class StopAt(Preemption):
    """The real handler, and a real SIGTERM at tick ``at``, raised in the main thread: handled before it returns."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def requested(self, tick: int) -> bool:
        if tick == self.at:
            signal.raise_signal(signal.SIGTERM)
        return super().requested(tick)


def lines(workdir: Path) -> list[dict]:
    """``metrics.jsonl`` without the timing fields."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.slow
def test_spaces_and_non_ascii_letters_go_through_an_interrupt_and_resume(tmp_path):
    config = Config(epochs=2, checkpoint_every_steps=4)
    plain, unusual = tmp_path / "plain", tmp_path / "a run é ü 実験" / "résumé 1"
    train_and_evaluate(config, str(plain))
    with pytest.raises(Interrupted):
        train_and_evaluate(config, str(unusual), preemption=StopAt(16))
    train_and_evaluate(config, str(unusual))
    assert lines(unusual) == lines(plain)
    assert (unusual / "variables.msgpack").read_bytes() == (plain / "variables.msgpack").read_bytes()


def test_a_held_workdir_is_refused_in_one_line_naming_the_holder_and_left_as_it_is(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with WorkdirLock(str(workdir)) as lock:
        assert lock.acquire() is None
        before = snapshot(workdir)
        code, err = run_cli(["--epochs", "1", "--workdir", str(workdir)], capsys)
        assert snapshot(workdir) == before
    assert code == exits.EXIT_BAD_INPUT and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"is in use by another attnjax process (pid {os.getpid()} on " in err and "pass another --workdir" in err
    assert WorkdirLock(str(workdir)).holder() is None  # released with the holder


def test_the_lock_is_taken_even_when_the_first_check_found_it_free(tmp_path):
    """Two processes that both pass the early check race for the lock: one wins, the other is refused."""
    first, second = WorkdirLock(str(tmp_path)), WorkdirLock(str(tmp_path))
    assert first.holder() is None and second.holder() is None
    assert first.acquire() is None
    refusal = second.acquire()
    assert refusal is not None and f"pid {os.getpid()}" in refusal
    first.release()
    assert second.acquire() is None
    second.release()


def start(workdir: Path, *options):
    return subprocess.Popen(
        [sys.executable, "-m", "attnjax.train", "--workdir", str(workdir), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def wait_for_lock(proc, workdir: Path, timeout=300):
    deadline = time.monotonic() + timeout
    while WorkdirLock(str(workdir)).holder() is None:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run never took its workdir's lock"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_second_process_on_a_live_run_exits_at_once_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    workdir = tmp_path / "run"
    first = start(workdir, "--epochs", "30")
    try:
        wait_for_lock(first, workdir)
        second = start(workdir, "--epochs", "30")
        _, err = second.communicate(timeout=300)
        assert second.returncode == exits.EXIT_BAD_INPUT, err
        assert (
            err.strip().splitlines() == [line for line in err.strip().splitlines() if line.startswith("error: ")]
            and len(err.strip().splitlines()) == 1
        )
        assert f"(pid {first.pid} on " in err
        assert first.poll() is None  # the live run goes on
    finally:
        first.kill()  # kill -9: the kernel drops the lock with the process
        first.wait()
    assert (workdir / LOCK_FILE).exists() and WorkdirLock(str(workdir)).holder() is None
    code = subprocess.run(
        [sys.executable, "-m", "attnjax.train", "--workdir", str(workdir), "--epochs", "1"],
        capture_output=True,
        check=False,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    # The killed run had 30 epochs: --epochs 1 is another run, refused by its options, not by a lock.
    assert code.returncode == exits.EXIT_BAD_INPUT and "in use" not in code.stderr and "--epochs" in code.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "4096"], "--batch-size"),
        (["--image-size", "32"], "--image-size"),
        (["--dataset", "folder:{tmp}/no-such-folder"], "no-such-folder"),
        (["--grad-accum", "20"], "--grad-accum"),
    ],
)
def test_a_refusal_that_needs_the_dataset_leaves_no_workdir(tmp_path, capsys, options, message):
    workdir = tmp_path / "new-run"
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    code, err = run_cli([*options, "--epochs", "1", "--workdir", str(workdir)], capsys)
    assert code == exits.EXIT_BAD_INPUT and "Traceback" not in err and message in err
    assert not workdir.exists()


@pytest.mark.parametrize("name", ["progress", LOCK_FILE])
def test_a_folder_in_place_of_the_progress_or_lock_file_is_one_line_naming_it(tmp_path, capsys, name):
    workdir = tmp_path / "run"
    (workdir / name).mkdir(parents=True)
    code, err = run_cli(["--epochs", "1", "--workdir", str(workdir)], capsys)
    assert code == exits.EXIT_BAD_INPUT and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{workdir / name} cannot be opened" in err and "remove it and rerun the same command" in err
