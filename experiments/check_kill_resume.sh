#!/usr/bin/env bash
# The issue's "done when", as a user would check it: train once undisturbed, then train the same
# command again in another workdir while killing it with kill -9 at three random moments and
# rerunning it each time; the two runs must end with the same metrics (timing aside) and the
# same final checkpoint, bit for bit.
#
#   experiments/check_kill_resume.sh OUT --dataset fashion_mnist --data-dir DIR --epochs 4 --checkpoint-every-steps 100
set -euo pipefail
out=$1; shift
python=${PYTHON:-python}
mkdir -p "$out"
$python -m attnjax.train "$@" --workdir "$out/reference" > "$out/reference.log" 2>&1
step_of() { local v; v=$( { tr -d ' \n' < "$1"; } 2>/dev/null ) || true; echo "${v:-0}"; }
total=$(step_of "$out/reference/progress")
echo "uninterrupted: $total steps"
# Three random moments, one in each third of the run: after a random step (read from the run's
# progress file), plus up to a second, so that a kill can land inside a step, a save or an evaluation.
for third in 0 1 2; do
  target=$(shuf -i $(( third * total / 3 + 1 ))-$(( (third + 1) * total / 3 - 1 )) -n 1)
  $python -m attnjax.train "$@" --workdir "$out/killed" >> "$out/killed.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$(step_of "$out/killed/progress")" -lt "$target" ]; do
    sleep 0.2
  done
  sleep "0.$(( RANDOM % 10 ))"
  kill -9 "$pid" 2>/dev/null && echo "kill -9 after step $target" || echo "the run ended before step $target"
  wait "$pid" 2>/dev/null || true
done
$python -m attnjax.train "$@" --workdir "$out/killed" >> "$out/killed.log" 2>&1
grep "resumed from\|no checkpoint yet" "$out/killed.log" || true
$python - "$out" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from attnjax.train import checkpoint
out = Path(sys.argv[1])
timing = ("images_per_second", "epoch_seconds")
def metrics(run):
    return [{k: v for k, v in json.loads(l).items() if k not in timing} for l in (out / run / "metrics.jsonl").read_text().splitlines()]
def arrays(run):
    folder = out / run / "checkpoints"
    step = max(int(n) for n in __import__("os").listdir(folder) if n.isdigit())
    with checkpoint.Checkpoints(str(out / run)) as reader:
        return step, dict(reader.manager.restore(step)["state"])
same_metrics = metrics("reference") == metrics("killed")
(s1, a), (s2, b) = arrays("reference"), arrays("killed")
leaves_a, leaves_b = checkpoint._leaves(a), checkpoint._leaves(b)
same_arrays = s1 == s2 and all(np.array_equal(x, y) for (_, x), (_, y) in zip(leaves_a, leaves_b, strict=True))
print(f"final test accuracy: {metrics('reference')[-1]['test_accuracy']} vs {metrics('killed')[-1]['test_accuracy']}")
print(f"metrics.jsonl equal (timing aside): {same_metrics}; final checkpoint step {s1} vs {s2}, "
      f"{len(leaves_a)} arrays equal bit for bit: {same_arrays}")
sys.exit(0 if same_metrics and same_arrays else 1)
PY
