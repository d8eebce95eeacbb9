"""`python -m attnjax.train` interrupted as users' machines interrupt it: kill -9, SIGTERM, and one host of two.

Each run is a real subprocess on the embedded digits (8 fake CPU devices, from conftest's
XLA_FLAGS). The reference is the same command left alone.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from test_multihost import environment, free_port

from attnjax.train import (
    PROGRESS_FILE,
    TIMING_FIELDS,
    Config,
    checkpoint,
    create_model,
    create_train_state,
    learning_rate_schedule,
)
from attnjax.train.exits import EXIT_INTERRUPTED

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

TIMEOUT = 300
ROOT = Path(__file__).resolve().parents[2]


def command(workdir, *options):
    return [sys.executable, "-m", "attnjax.train", "--workdir", str(workdir), *options]


def start(cmd, env=None):
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or os.environ.copy(), cwd=ROOT
    )


def finish(proc, timeout=TIMEOUT):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def reached_step(workdir) -> int:
    try:
        return int((Path(workdir) / PROGRESS_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def wait_for_step(proc, workdir, step, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while reached_step(workdir) < step:
        assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def final_state(workdir, config):
    """The train state of the run's latest checkpoint, as host arrays."""
    schedule = learning_rate_schedule(config.lr_schedule, config.learning_rate, 1)  # the same optimizer state
    template = create_train_state(jax.random.key(0), create_model(config, 10), (8, 8, 1), schedule)
    with checkpoint.Checkpoints(str(workdir)) as reader:
        state, record = reader.restore(template)
    return checkpoint.to_host(state), record


def test_kill_9_at_three_random_moments_then_reruns_end_like_the_uninterrupted_run(tmp_path):
    options = ["--epochs", "2", "--batch-size", "32", "--checkpoint-every-steps", "5", "--seed", "4"]
    config = Config(epochs=2, batch_size=32, seed=4)

    code, out, err = finish(start(command(tmp_path / "reference", *options)))
    assert code == 0, err

    # Seeded moments (a failure can be replayed): after a random step of the run, plus a random
    # delay that lets the kill land inside a step, a save or an evaluation.
    rng = np.random.default_rng(9)
    total = 2 * (1437 // 32)
    targets = np.sort(rng.choice(np.arange(3, total - 2), size=3, replace=False))
    workdir = tmp_path / "killed"
    for target in targets:
        proc = start(command(workdir, *options))
        wait_for_step(proc, workdir, int(target))
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        code, _, err = finish(proc)
        assert code == -signal.SIGKILL, err
    code, out, err = finish(start(command(workdir, *options)))
    assert code == 0, err
    assert "attnjax: resumed from" in out
    assert metrics(workdir) == metrics(tmp_path / "reference")
    got, got_record = final_state(workdir, config)
    want, want_record = final_state(tmp_path / "reference", config)
    assert got_record["step"] == want_record["step"] == 2 * (1437 // 32)
    for (path, a), (_, b) in zip(checkpoint._leaves(got), checkpoint._leaves(want), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=path)
    assert (workdir / checkpoint.VARIABLES_FILE).read_bytes() == (
        tmp_path / "reference" / checkpoint.VARIABLES_FILE
    ).read_bytes()


def test_sigterm_saves_the_step_exits_75_and_the_rerun_loses_nothing(tmp_path):
    options = ["--epochs", "1", "--batch-size", "8"]  # 179 steps: the signal lands mid-epoch
    proc = start(command(tmp_path, *options))
    wait_for_step(proc, tmp_path, 20)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert "rerun the same command to continue" in err.lower()
    saved = int(err.split("checkpoints/")[1].split(" ")[0])
    assert 20 <= saved < 179 and (tmp_path / "checkpoints" / str(saved) / checkpoint.COMMIT_MARKER).exists()

    code, out, err = finish(start(command(tmp_path, *options)))
    assert code == 0, err
    assert f"resumed from {tmp_path}/checkpoints/{saved} (step {saved}, epoch 1, batch {saved} of 179" in out
    assert "0 steps lost" in out
    assert [r["epoch"] for r in metrics(tmp_path)] == [1]


def test_two_processes_sigterm_to_one_both_save_the_same_step_and_the_rerun_resumes(tmp_path):
    """2 processes x 2 devices (jax.distributed, gloo): JAX's preemption sync point picks one step for both."""
    options = ["--epochs", "1", "--batch-size", "8", "--checkpoint-every-minutes", "0.02"]
    env = environment(2, x64=False)

    def launch():
        port = free_port()
        extra = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
        return [start(command(tmp_path, *options, *extra, "--process-id", str(i)), env) for i in range(2)]

    procs = launch()
    try:
        wait_for_step(procs[0], tmp_path, 15)
        procs[1].send_signal(signal.SIGTERM)  # the non-writing process: the other learns it through JAX
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    steps = []
    for code, _, err in results:
        assert code == EXIT_INTERRUPTED, err[-3000:]
        steps.append(int(err.split("checkpoints/")[1].split(" ")[0]))
    assert steps[0] == steps[1] and (tmp_path / "checkpoints" / str(steps[0]) / checkpoint.COMMIT_MARKER).exists()

    procs = launch()
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/{steps[0]} (step {steps[0]}" in results[0][1]
    assert [r["epoch"] for r in metrics(tmp_path)] == [1]


def test_two_processes_refuse_a_workdir_they_do_not_share(tmp_path):
    """Each host's own disk: process 1 would resume from nothing. Both stop at once with the fix."""
    env = environment(2, x64=False)
    port = free_port()
    extra = ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--epochs", "1"]
    procs = [start(command(tmp_path / f"host{i}", *extra, "--process-id", str(i)), env) for i in range(2)]
    results = [finish(p) for p in procs]
    for code, _, err in results:
        assert code == 2, err[-3000:]
        assert "is not shared by all processes: process(es) [1] cannot see" in err and "Traceback" not in err
    assert not (tmp_path / "host0" / "checkpoints").exists()


# Faults injected into a real run (the real trainer, the real Orbax), by name, before its CLI starts.
FAULTS = """
import os, resource, signal, sys, time
from orbax.checkpoint._src.path import atomicity
from attnjax.train import checkpoint, cli, workdir

fault = sys.argv.pop(1)
if fault == "kill-after-the-first-metrics-line":
    commit = atomicity.on_commit_callback

    def held_commit(*args, **kwargs):
        time.sleep(3)  # the asynchronous commit held open: the first epoch's window, made wide and certain
        return commit(*args, **kwargs)

    atomicity.on_commit_callback = held_commit
    write_epoch = workdir.Workdir.write_epoch

    def write_then_die(self, variables, record):
        write_epoch(self, variables, record)
        os.kill(os.getpid(), signal.SIGKILL)

    workdir.Workdir.write_epoch = write_then_die
elif fault == "disk-full-at-the-first-epoch-end":
    save = checkpoint.Checkpoints.save

    def save_on_a_full_disk(self, step, state, record, **kwargs):
        if kwargs.get("test_accuracy") is not None:  # the epoch end's save; the disk stays full from here
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return save(self, step, state, record, **kwargs)

    checkpoint.Checkpoints.save = save_on_a_full_disk
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("fault", ["kill-after-the-first-metrics-line", "disk-full-at-the-first-epoch-end"])
def test_a_run_stopped_before_its_first_checkpoint_commits_continues_with_the_same_command(tmp_path, fault):
    options = ["--epochs", "2"]
    code, _, err = finish(start(command(tmp_path / "reference", *options)))
    assert code == 0, err
    workdir = tmp_path / "run"
    code, _, err = finish(start([sys.executable, "-c", FAULTS, fault, "--workdir", str(workdir), *options]))
    if fault.startswith("kill"):
        assert code == -signal.SIGKILL, err
    else:
        assert code == 4 and "Traceback" not in err, err
        assert "File too large" in err and "rerun the same command to continue" in err
    code, _, err = finish(start(command(workdir, *options)))  # the same command: it must keep its word
    assert code == 0, err
    assert metrics(workdir) == metrics(tmp_path / "reference")
    assert (workdir / checkpoint.VARIABLES_FILE).read_bytes() == (
        tmp_path / "reference" / checkpoint.VARIABLES_FILE
    ).read_bytes()
