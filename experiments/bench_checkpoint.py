"""What checkpointing costs: per epoch (asynchronous and synchronous saves), and from start to the first resumed step.

    python experiments/bench_checkpoint.py --data-dir /tmp/tfds --manual-dir ../shared/data/fashion-mnist

Two settings, as the CLI trains them (pmap over the local devices, batch 128, float32):

- ``attention_net`` (+ seed block) on Fashion-MNIST's 28x28x1 images (468 steps an epoch);
- ``resnet18`` (+ seed block) on 32x32x3 input, CIFAR-10's size (390 steps an epoch).

**Cost per epoch.** Windows of ``--window`` training steps are timed, alternating three kinds
in one process so that machine noise hits all alike: no save, an asynchronous save at the
window's start (``Checkpoints.save``: the arrays are copied to the host and digested, then
written by Orbax in a background thread while the steps run; the window ends by waiting
for the write), and a synchronous save. The cost of a save is the median window with it
minus the median window without; one save per epoch, it is reported as a fraction of an
epoch (steps per epoch x the median step). The epoch is computed from the step median, not
timed whole: a ResNet-18 epoch takes tens of minutes on a 2-core CPU.

**Start to first resumed step.** ``python -m attnjax.train`` is started on a workdir that
holds a checkpoint (interrupted with SIGTERM mid-epoch), and timed until it has run its
first step: Python and JAX start-up, loading the data, restoring and checking the
checkpoint, compiling. The restore alone is timed in process too.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from attnjax import data
from attnjax.train import (
    PROGRESS_FILE,
    Config,
    checkpoint,
    create_model,
    create_train_state,
    learning_rate_schedule,
    parallel,
    train_step,
)


def random_folder(root: Path, size: int = 32, classes: int = 10, per_class: int = 30) -> str:
    """A folder dataset of random RGB PNGs (train and test), for the ResNet-18 start-up timing."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class if split == "train" else 5):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return f"folder:{root}"


def epoch_cost(config: Config, image_shape, steps_per_epoch: int, window: int, repeats: int, workdir: str) -> dict:
    devices = parallel.devices_for("pmap")
    model = create_model(config, 10)
    schedule = learning_rate_schedule(config.lr_schedule, config.learning_rate, config.epochs * steps_per_epoch)
    state = parallel.replicate(create_train_state(jax.random.key(0), model, image_shape, schedule), devices)
    step = parallel.wrap_step(train_step, devices, "pmap", donate_state=True)
    rng = np.random.default_rng(0)
    batch = parallel.put_batch(
        {
            "image": rng.uniform(0, 1, (config.batch_size, *image_shape)).astype(np.float32),
            "label": rng.integers(0, 10, config.batch_size).astype(np.int32),
        },
        devices,
    )
    savers = {
        "async": checkpoint.Checkpoints(os.path.join(workdir, "async"), asynchronous=True),
        "sync": checkpoint.Checkpoints(os.path.join(workdir, "sync"), asynchronous=False),
    }
    record = {"epoch": 1, "batch": 0, "history": [], "epoch_metrics": {"loss": [], "accuracy": []}}
    windows = {"none": [], "async": [], "sync": []}
    blocking = {"async": [], "sync": []}
    step_times = []
    for r in range(repeats + 1):  # the first round compiles and warms up
        for kind in windows:
            start = time.perf_counter()
            if kind != "none":
                savers[kind].save(1000 + r, state, record)
                blocking[kind].append(time.perf_counter() - start)
            for _ in range(window):
                t = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                if kind == "none":
                    step_times.append(time.perf_counter() - t)
            if kind != "none":
                savers[kind].wait()
            if r:
                windows[kind].append(time.perf_counter() - start)
            elif kind != "none":
                blocking[kind].clear()
    for saver in savers.values():
        saver.close()
    step_median = statistics.median(step_times[window:])
    epoch = steps_per_epoch * step_median
    base = statistics.median(windows["none"])
    size = sum(x.nbytes for x in jax.tree.leaves(checkpoint.to_host(state)))
    result = {"step_ms": 1e3 * step_median, "epoch_s": epoch, "state_mb": size / 2**20}
    for kind in ("async", "sync"):
        cost = statistics.median(windows[kind]) - base
        result[kind] = {
            "cost_s": cost,
            "fraction": cost / epoch,
            "blocking_s": statistics.median(blocking[kind]),
        }
    return result


def restore_time(config: Config, image_shape, workdir: str, repeats: int = 3) -> float:
    model = create_model(config, 10)
    template = create_train_state(jax.random.key(0), model, image_shape, learning_rate_schedule("cosine", 1e-3, 1))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        with checkpoint.Checkpoints(workdir) as reader:
            reader.restore(template)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def start_to_first_resumed_step(options: list[str], workdir: Path, stop_at: int) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "attnjax.train", "--workdir", str(workdir), *options]
    progress = workdir / PROGRESS_FILE
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        try:
            if int(progress.read_text().strip() or 0) >= stop_at:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=600)
    saved = int(progress.read_text().strip())
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        try:
            if int(progress.read_text().strip() or 0) > saved:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    resumed = next((line for line in out.splitlines() if "resumed from" in line), "NOT RESUMED: " + err[-500:])
    return seconds, resumed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir (fashion_mnist is prepared there if needed)")
    parser.add_argument("--manual-dir", default=None, help="Fashion-MNIST's original files, to prepare offline")
    parser.add_argument("--window", type=int, default=20, help="training steps per timed window")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows of each kind, per setting")
    parser.add_argument("--resnet-window", type=int, default=6)
    parser.add_argument("--resnet-repeats", type=int, default=3)
    args = parser.parse_args(argv)

    data.load("fashion_mnist", data_dir=args.data_dir, manual_dir=args.manual_dir)  # prepared once, before timing
    print(
        f"jax {jax.__version__}, {jax.local_device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} CPUs; batch 128, float32, pmap"
    )
    settings = [
        (
            "attention_net + seed, Fashion-MNIST 28x28x1",
            Config(model="attention_net"),
            (28, 28, 1),
            468,
            args.window,
            args.repeats,
        ),
        (
            "cifar_resnet18 + seed, 32x32x3",
            Config(model="cifar_resnet18"),
            (32, 32, 3),
            390,
            args.resnet_window,
            args.resnet_repeats,
        ),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, shape, steps, window, repeats in settings:
            r = epoch_cost(config, shape, steps, window, repeats, os.path.join(tmp, config.model))
            print(f"{name}: state {r['state_mb']:.0f} MiB, step {r['step_ms']:.1f} ms, ", end="")
            print(f"epoch ({steps} steps) {r['epoch_s']:.1f} s")
            for kind in ("async", "sync"):
                k = r[kind]
                print(
                    f"  {kind:>5} save: {k['cost_s']:+.3f} s per save ({100 * k['fraction']:+.2f}% of an epoch), "
                    f"blocking {k['blocking_s']:.3f} s"
                )
            restored = restore_time(config, shape, os.path.join(tmp, config.model, "sync"))
            print(f"  restore (scan, read, digest check): {restored:.2f} s")

        fm = ["--dataset", "fashion_mnist", "--data-dir", args.data_dir, "--epochs", "1"]
        seconds, line = start_to_first_resumed_step(fm, Path(tmp) / "fm-run", stop_at=50)
        print(f"attention_net, Fashion-MNIST: start to first resumed step {seconds:.1f} s\n  {line}")
        folder = random_folder(Path(tmp) / "images")
        rn = ["--dataset", folder, "--model", "cifar_resnet18", "--epochs", "1", "--batch-size", "32"]
        seconds, line = start_to_first_resumed_step(rn, Path(tmp) / "rn-run", stop_at=2)
        print(f"cifar_resnet18, 32x32x3 folder: start to first resumed step {seconds:.1f} s\n  {line}")


if __name__ == "__main__":
    main()
