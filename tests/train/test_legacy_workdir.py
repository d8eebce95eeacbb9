"""A workdir written before the trainer's split into ``attnjax/train/`` continues after it, bit for bit.

``legacy_workdir/workdir`` was interrupted at step 24 by the trainer of commit d0b7238 (its
README says how). Continuing a copy with today's trainer must end exactly where an
uninterrupted run of today's trainer ends (every leaf of the state, every metrics line apart
from timing), and its metrics must be those that the old trainer's uninterrupted run wrote.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np

from attnjax import checkpoint
from attnjax.config import Config
from attnjax.train import METRICS_FILE, TIMING_FIELDS, train_and_evaluate

LEGACY = Path(__file__).parent / "legacy_workdir"


def metrics(workdir: Path) -> list[dict]:
    lines = (workdir / METRICS_FILE).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def test_a_workdir_of_the_old_trainer_continues_bit_identically(tmp_path, capsys):
    expected = json.loads((LEGACY / "expected.json").read_text())
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in expected["config"].items()})
    devices = jax.devices()[:1]
    workdir = tmp_path / "legacy"
    shutil.copytree(LEGACY / "workdir", workdir)

    resumed, _ = train_and_evaluate(config, str(workdir), devices=devices)
    assert "(step 24, epoch 2, batch 2 of 22, saved on SIGTERM)" in capsys.readouterr().out
    fresh, _ = train_and_evaluate(config, str(tmp_path / "fresh"), devices=devices)

    got, want = checkpoint.to_host(resumed), checkpoint.to_host(fresh)
    assert checkpoint.digest(got) == checkpoint.digest(want)
    assert metrics(workdir) == metrics(tmp_path / "fresh")
    old = expected["metrics"]
    assert [r["epoch"] for r in metrics(workdir)] == [r["epoch"] for r in old] == [1, 2]
    for line, reference in zip(metrics(workdir), old, strict=True):
        assert line.keys() == reference.keys()
        for key, value in reference.items():
            np.testing.assert_allclose(line[key], value, rtol=1e-6, err_msg=key)
