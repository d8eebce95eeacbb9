"""A workdir written before the trainer's split into ``attnjax/train/`` continues after it, bit for bit.

``legacy_workdir/workdir`` was interrupted at step 24 by the trainer of commit d0b7238 (its
README says how). Continuing a copy with today's trainer must end exactly where an
uninterrupted run of today's trainer ends (every leaf of the state, every metrics line apart
from timing), and its metrics must be those that the old trainer's uninterrupted run wrote.

Bit for bit holds where this machine computes as the one that wrote the workdir did: its
uninterrupted run's first epoch equals the old run's exactly. A CPU of another kind (AVX-512
and AMX against AVX2, say) rounds XLA's kernels differently from the first step: measured on
a Sapphire Rapids CPU, train loss 2.1268096 against the writer's 2.1268139. There the
continuation must still be the old run's to 1e-6, and today's fresh run's to 1e-3 in loss
(4e-5 measured) and 0.01 in accuracy (one training image of 1,408 measured).

Both runs happen in one fresh process whose backend starts with the XLA flags the old run had
(conftest's, without attnjax's XLA:CPU options): XLA's options change results in the last
digits, and a test that ran ``cli.main`` in this process may have started its backend with them.

The workdir also predates the rename of ``resnet18`` to ``cifar_resnet18`` (its records carry no
registry version): it continues as ``cifar_resnet18``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnjax import xla_options
from attnjax.train import TIMING_FIELDS

LEGACY = Path(__file__).parent / "legacy_workdir"

SCRIPT = """
import json, sys
import jax
from attnjax.train import Config, checkpoint, recorded_config, train_and_evaluate

expected, legacy, fresh = sys.argv[1:]
config = Config.from_dict(recorded_config(json.load(open(expected))))  # "resnet18" then: cifar_resnet18 now
out = {}
for name, workdir in (("resumed", legacy), ("fresh", fresh)):
    state, history = train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    out[name] = {"digest": checkpoint.digest(checkpoint.to_host(state)), "history": history}
print("RESULT " + json.dumps(out))
"""


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in history]


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_workdir_of_the_old_trainer_continues_bit_identically(tmp_path):
    expected = json.loads((LEGACY / "expected.json").read_text())
    workdir = tmp_path / "legacy"
    shutil.copytree(LEGACY / "workdir", workdir)
    flags = os.environ.get("XLA_FLAGS", "").split()
    kept = " ".join(flag for flag in flags if flag.lstrip("-").split("=")[0] not in xla_options.OPTIONS)
    env = {**os.environ, "XLA_FLAGS": kept, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-c", SCRIPT, str(LEGACY / "expected.json"), str(workdir), str(tmp_path / "fresh")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(step 24, epoch 2, batch 2 of 22, saved on SIGTERM)" in proc.stdout
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    resumed, fresh = result["resumed"], result["fresh"]

    old = expected["metrics"]
    if without_timing(fresh["history"])[:1] == old[:1]:  # this machine computes as the writer did
        assert resumed["digest"] == fresh["digest"]
        assert without_timing(resumed["history"]) == without_timing(fresh["history"])
    else:
        for line, reference in zip(without_timing(resumed["history"]), without_timing(fresh["history"]), strict=True):
            for key, value in reference.items():  # SGD at 0.05 amplifies the first steps' rounding
                scale = reference["test_examples"] if key == "test_correct" else 1  # a count of examples
                tolerance = {"atol": 0.01 * scale} if "accuracy" in key or key == "test_correct" else {"rtol": 1e-3}
                np.testing.assert_allclose(line[key], value, err_msg=key, **tolerance)
    written = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(written) == without_timing(resumed["history"])
    assert [line["epoch"] for line in written] == [line["epoch"] for line in old] == [1, 2]
    for line, reference in zip(without_timing(written), old, strict=True):
        assert line.keys() == reference.keys()
        for key, value in reference.items():
            np.testing.assert_allclose(line[key], value, rtol=1e-6, err_msg=key)


@pytest.mark.subprocess
def test_the_old_command_with_model_resnet18_is_refused_naming_cifar_resnet18(tmp_path):
    """``resnet18`` is timm's network now: the legacy run's own command line gets one line with the new name."""
    workdir = tmp_path / "legacy"
    shutil.copytree(LEGACY / "workdir", workdir)
    before = {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}
    config = json.loads((LEGACY / "workdir" / "config.json").read_text())["config"]
    assert config["model"] == "resnet18" and config["model_option"] == ["stage_sizes=1"]
    command = [
        "--model",
        "resnet18",
        "--block",
        "se",
        "--block-option",
        "reduction=8",
        "--model-option",
        "stage_sizes=1",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.train", *command, "--epochs", "2", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "pass --model cifar_resnet18" in proc.stderr and "stage_sizes" in proc.stderr
    assert {p: p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()} == before
