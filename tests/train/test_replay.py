"""--config: a run replayed from its config.json gives the same metrics; flags override; hand-written files work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnjax.train import TIMING_FIELDS
from attnjax.train.cli import parse_args

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "attnjax.train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ.copy(),
    )


def metrics(workdir):
    lines = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS} for line in lines]


def test_a_run_replayed_from_its_config_json_gives_the_same_metrics(tmp_path):
    first = tmp_path / "first"
    options = ["--epochs", "2", "--block", "cbam", "--block-option", "reduction=4", "--optimizer", "adamw"]
    proc = run(*options, "--weight-decay", "0.05", "--seed", "4", "--workdir", str(first))
    assert proc.returncode == 0, proc.stderr
    replay = tmp_path / "replay"
    proc = run("--config", str(first / "config.json"), "--workdir", str(replay))
    assert proc.returncode == 0, proc.stderr
    assert metrics(replay) == metrics(first)
    assert (
        json.loads((replay / "config.json").read_text())["config"]
        == json.loads((first / "config.json").read_text())["config"]
    )


def test_flags_after_config_override_only_their_fields(tmp_path):
    saved = {"config": {"block": "se", "seed": 4, "block_option": ["reduction=4"], "epochs": 3}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    base, _, _ = parse_args(["--config", str(path), "--workdir", "w"])
    assert (base.block, base.seed, base.block_option, base.epochs) == ("se", 4, ("reduction=4",), 3)
    changed, _, _ = parse_args(["--config", str(path), "--seed", "5", "--block-option", "reduction=2"])
    assert changed.seed == 5 and changed.block_option == ("reduction=2",)
    assert {k: v for k, v in changed.to_dict().items() if k not in ("seed", "block_option")} == {
        k: v for k, v in base.to_dict().items() if k not in ("seed", "block_option")
    }
    flat = tmp_path / "hand.json"  # written by hand: a plain object of options
    flat.write_text(json.dumps({"block": "eca", "learning_rate": 0.002}))
    hand, _, _ = parse_args(["--config", str(flat)])
    assert hand.block == "eca" and hand.learning_rate == 0.002 and hand.model == "attention_net"


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"blok": "se"}', "unknown option(s) blok; valid: dataset"),
        ("[1, 2]", "holds no JSON object of options"),
        ("{not json", "cannot be read"),
    ],
)
def test_a_bad_config_file_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    proc = run("--config", str(path), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()
