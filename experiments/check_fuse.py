"""Do checkpoints commit and resume on a FUSE mount (as Colab's Drive is)? A check, not a CI test.

    apt-get install bindfs            # a FUSE file system that passes every call through
    python experiments/check_fuse.py  # mounts one, trains there, interrupts, resumes, compares

Orbax commits a step by writing it under a temporary name and renaming the folder; a FUSE
file system that did not implement directory renames, or reported them before they were
visible, would lose or half-commit checkpoints. This script runs the same short training
twice, once on local disk and once in a folder on a bindfs FUSE mount where it is sent
SIGTERM mid-epoch and rerun, and checks that the mount ended with committed steps and the
same metrics as the local run. It says plainly when no FUSE mount can be made here.
Drive's own FUSE daemon cannot be reached from here: its behaviour is documented in
TPU.md, not measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPTIONS = ["--epochs", "2", "--batch-size", "16", "--checkpoint-every-steps", "10"]
TIMING = ("images_per_second", "epoch_seconds")


def train(workdir: Path, stop_at_step: int | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "attnjax.train", "--workdir", str(workdir), *OPTIONS]
    if stop_at_step is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = workdir / "progress"
    while proc.poll() is None:
        try:
            if int(progress.read_text().strip() or 0) >= stop_at_step:
                proc.send_signal(signal.SIGTERM)
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def metrics(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def main() -> int:
    if shutil.which("bindfs") is None:
        print("no bindfs: apt-get install bindfs (FUSE), then run this again")
        return 2
    root = Path(tempfile.mkdtemp(prefix="attnjax-fuse-"))
    source, mount = root / "source", root / "mount"
    source.mkdir()
    mount.mkdir()
    if subprocess.run(["bindfs", str(source), str(mount)]).returncode:
        print("bindfs could not mount (no /dev/fuse, or no permission to mount here)")
        return 2
    try:
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(mount)], capture_output=True, text=True).stdout.strip()
        print(f"FUSE mount: {mount} (file system type {fs})")
        local = train(root / "local")
        assert local.returncode == 0, local.stderr
        first = train(mount / "run", stop_at_step=30)
        print(f"interrupted on the mount: exit {first.returncode}: {first.stderr.strip().splitlines()[-1]}")
        second = train(mount / "run")
        assert second.returncode == 0, second.stderr
        resumed = [line for line in second.stdout.splitlines() if "resumed from" in line]
        print(resumed[0] if resumed else "NOT RESUMED")
        steps = sorted(os.listdir(mount / "run" / "checkpoints"))
        committed = [s for s in steps if (mount / "run" / "checkpoints" / s / "commit_success.txt").exists()]
        print(f"checkpoint folders on the mount: {steps}; committed: {committed}")
        same = metrics(mount / "run") == metrics(root / "local")
        print(f"metrics.jsonl equal to the local run's (timing aside): {same}")
        return 0 if same and resumed and committed == steps else 1
    finally:
        subprocess.run(["fusermount", "-u", str(mount)])
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
